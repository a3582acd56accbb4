"""HealthDetector rules and advice, without a Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.diagnosis import HealthDetector, advise
from lightning_gradguard.stats import GroupedStats, Grouping

GROUPING = Grouping(names=("first", "last"), index=(0, 1), members=(("first.w",), ("last.w",)))


def _stats(first: float, last: float) -> GroupedStats:
    norms = torch.tensor([first, last])
    return GroupedStats(grouping=GROUPING, norms=norms, max_abs=norms.abs(), present=(True, True))


def _flag(reading: torch.Tensor, detector: HealthDetector, name: str) -> bool:
    return bool(reading[detector.index(name)] > 0)


def test_vanishing_needs_a_full_window_and_one_odd_step_neither_triggers_nor_resets():
    d = HealthDetector(patience=5, vanish_ratio=1e3)
    readings = [d.update(_stats(1e-6, 1.0)) for _ in range(4)]
    assert not any(_flag(r, d, "vanishing") for r in readings)  # window not full yet
    assert _flag(d.update(_stats(1e-6, 1.0)), d, "vanishing")
    assert _flag(d.update(_stats(1.0, 1.0)), d, "vanishing")  # one healthy step: median still 1e6
    d2 = HealthDetector(patience=5, vanish_ratio=1e3)
    for _ in range(4):
        d2.update(_stats(1.0, 1.0))
    assert not _flag(d2.update(_stats(1e-6, 1.0)), d2, "vanishing")  # one odd step: no alarm


def test_vanish_floor_is_relative_to_the_deep_layer():
    d = HealthDetector(patience=3, vanish_ratio=None, vanish_floor=1e-5)
    for _ in range(3):
        r = d.update(_stats(1e-7, 1e-7))  # small everywhere (converged): not vanishing
    assert not _flag(r, d, "vanishing")
    d = HealthDetector(patience=3, vanish_ratio=None, vanish_floor=1e-5)
    for _ in range(3):
        r = d.update(_stats(1e-7, 1e-3))
    assert _flag(r, d, "vanishing")


@pytest.mark.parametrize(("jump", "spike"), [(30.0, False), (60.0, True)])
def test_spike_needs_both_zscore_and_ratio(jump, spike):
    d = HealthDetector(warmup_steps=10, spike_zscore=8.0, spike_min_ratio=50.0, max_norm=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        level = 1.0 + 0.01 * torch.rand((), generator=g).item()
        assert not _flag(d.update(_stats(level, level)), d, "exploding")
    r = d.update(_stats(jump, jump))
    assert _flag(r, d, "exploding") is spike
    assert r[d.index("zscore")].item() > 8.0  # the z-score alone would have fired both times


def test_spike_rule_waits_for_warmup_but_the_ceiling_does_not():
    d = HealthDetector(warmup_steps=20, max_norm=1e6)
    assert not _flag(d.update(_stats(1.0, 1.0)), d, "exploding")
    assert not _flag(d.update(_stats(1e5, 1e5)), d, "exploding")  # a spike, but not armed yet
    assert _flag(d.update(_stats(1e7, 1e7)), d, "exploding")  # above the ceiling


def test_nonfinite_steps_never_enter_the_statistics():
    d = HealthDetector(patience=3)
    for _ in range(5):
        d.update(_stats(1.0, 2.0))
    before = {k: v.clone() for k, v in d._state.items()}
    r = d.update(_stats(math.nan, 2.0))
    assert _flag(r, d, "nonfinite")
    for key, value in d._state.items():
        assert torch.equal(value.nan_to_num(-1), before[key].nan_to_num(-1)), key
    r = d.update(_stats(1.0, 2.0), loss_finite=torch.tensor(False))
    assert _flag(r, d, "nonfinite")


def test_fp16_overflow_becomes_nonfinite_only_when_it_persists():
    d = HealthDetector(max_consecutive_overflows=3, min_loss_scale=1.0)
    scale = torch.tensor(1024.0)
    flags = [d.update(_stats(math.inf, 1.0), scaler_active=True, loss_scale=scale) for _ in range(3)]
    assert [_flag(r, d, "overflow") for r in flags] == [True, True, True]
    assert [_flag(r, d, "nonfinite") for r in flags] == [False, False, True]
    d = HealthDetector(max_consecutive_overflows=100, min_loss_scale=1.0)
    r = d.update(_stats(math.inf, 1.0), scaler_active=True, loss_scale=torch.tensor(0.5))
    assert _flag(r, d, "nonfinite")  # the scale collapsed


def test_dead_needs_an_exact_zero_for_dead_patience_steps():
    d = HealthDetector(dead_patience=3, vanish_ratio=None)
    for _ in range(2):
        assert not _flag(d.update(_stats(0.0, 1.0)), d, "dead")
    assert _flag(d.update(_stats(0.0, 1.0)), d, "dead")
    assert d.dead_groups().tolist() == [True, False]
    assert not _flag(d.update(_stats(1e-30, 1.0)), d, "dead")  # tiny is not zero: the run resets


def test_state_dict_round_trip():
    d = HealthDetector(patience=4)
    for i in range(6):
        d.update(_stats(1.0 + i, 2.0))
    fresh = HealthDetector(patience=4)
    fresh.load_state_dict(d.state_dict())
    a, b = d.update(_stats(3.0, 2.0)), fresh.update(_stats(3.0, 2.0))
    assert torch.allclose(a.nan_to_num(0), b.nan_to_num(0))


def test_advice_fits_the_model():
    rnn = nn.Sequential(nn.RNN(3, 4))
    assert any("LSTM" in a for a in advise("exploding", rnn))
    assert any("LSTM" in a for a in advise("vanishing", rnn))
    deep_plain = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    assert any("residual" in a for a in advise("vanishing", deep_plain))
    normed = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU())])
    assert not any("without normalisation" in a for a in advise("vanishing", normed))
    assert any("bf16" in a for a in advise("nonfinite", None, scaler_active=True))
    assert not any("bf16" in a for a in advise("nonfinite", None, scaler_active=False))
