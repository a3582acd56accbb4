"""HealthDetector rules and advice, without a Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard import _arrays
from lightning_gradguard.diagnosis import (
    KINDS,
    DetectorConfig,
    DeviceReading,
    Evidence,
    Finding,
    HealthDetector,
    Reading,
    advise,
    build_finding,
)
from lightning_gradguard.stats import (
    ForwardOrder,
    GroupedStats,
    Grouping,
    ParamSet,
    UnitLayout,
    UnitStats,
    take_snapshot,
)

GROUPING = Grouping(names=("first", "last"), index=(0, 1), members=(("first.w",), ("last.w",)))
BACKENDS = {"numpy": _arrays.HOST, "torch": _arrays.DEVICE}


@pytest.fixture(autouse=True, params=list(BACKENDS))
def backend(request):
    """Every test here runs the rules twice: in numpy (what CPU statistics use) and in torch (devices)."""
    with _arrays.forced(BACKENDS[request.param]):
        yield request.param


def _stats(first: float, last: float) -> GroupedStats:
    norms = torch.tensor([first, last])
    return GroupedStats(grouping=GROUPING, norms=norms, max_abs=norms.abs(), present=(True, True))


def _flag(reading: DeviceReading, name: str) -> bool:
    return getattr(reading.to_host(), name)


def _state(detector: HealthDetector) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v).nan_to_num(-1) for k, v in detector.state_dict().items()}


def test_vanishing_needs_a_full_window_and_one_odd_step_neither_triggers_nor_resets():
    d = HealthDetector(patience=5, vanish_ratio=1e3)
    readings = [d.update(_stats(1e-6, 1.0)) for _ in range(4)]
    assert not any(_flag(r, "vanishing") for r in readings)  # window not full yet
    assert _flag(d.update(_stats(1e-6, 1.0)), "vanishing")
    assert _flag(d.update(_stats(1.0, 1.0)), "vanishing")  # one healthy step: median still 1e6
    d2 = HealthDetector(patience=5, vanish_ratio=1e3)
    for _ in range(4):
        d2.update(_stats(1.0, 1.0))
    assert not _flag(d2.update(_stats(1e-6, 1.0)), "vanishing")  # one odd step: no alarm


def test_vanish_floor_is_relative_to_the_deep_layer():
    d = HealthDetector(patience=3, vanish_ratio=None, vanish_floor=1e-5)
    for _ in range(3):
        r = d.update(_stats(1e-7, 1e-7))  # small everywhere (converged): not vanishing
    assert not _flag(r, "vanishing")
    d = HealthDetector(patience=3, vanish_ratio=None, vanish_floor=1e-5)
    for _ in range(3):
        r = d.update(_stats(1e-7, 1e-3))
    assert _flag(r, "vanishing")


@pytest.mark.parametrize(("jump", "spike"), [(30.0, False), (60.0, True)])
def test_spike_needs_both_zscore_and_ratio(jump, spike):
    d = HealthDetector(warmup_steps=10, spike_zscore=8.0, spike_min_ratio=50.0, max_norm=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        level = 1.0 + 0.01 * torch.rand((), generator=g).item()
        assert not _flag(d.update(_stats(level, level)), "exploding")
    r = d.update(_stats(jump, jump))
    assert _flag(r, "exploding") is spike
    assert r.to_host().zscore > 8.0  # the z-score alone would have fired both times


def test_spike_rule_waits_for_warmup_but_the_ceiling_does_not():
    d = HealthDetector(warmup_steps=20, max_norm=1e6, growth_total=None)  # the spike and the ceiling alone
    assert not _flag(d.update(_stats(1.0, 1.0)), "exploding")
    assert not _flag(d.update(_stats(1e5, 1e5)), "exploding")  # a spike, but not armed yet
    assert _flag(d.update(_stats(1e7, 1e7)), "exploding")  # above the ceiling


def test_nonfinite_steps_never_enter_the_statistics():
    d = HealthDetector(patience=3)
    for _ in range(5):
        d.update(_stats(1.0, 2.0))
    before = _state(d)
    r = d.update(_stats(math.nan, 2.0))
    assert _flag(r, "nonfinite")
    for key, value in _state(d).items():
        assert torch.equal(value, before[key]), key
    r = d.update(_stats(1.0, 2.0), loss_finite=torch.tensor(False))
    assert _flag(r, "nonfinite")


def test_fp16_overflow_becomes_nonfinite_only_when_it_persists():
    d = HealthDetector(max_consecutive_overflows=3, min_loss_scale=1.0)
    scale = torch.tensor(1024.0)
    flags = [d.update(_stats(math.inf, 1.0), scaler_active=True, loss_scale=scale) for _ in range(3)]
    assert [_flag(r, "overflow") for r in flags] == [True, True, True]
    assert [_flag(r, "nonfinite") for r in flags] == [False, False, True]
    d = HealthDetector(max_consecutive_overflows=100, min_loss_scale=1.0)
    r = d.update(_stats(math.inf, 1.0), scaler_active=True, loss_scale=torch.tensor(0.5))
    assert _flag(r, "nonfinite")  # the scale collapsed


def test_dead_needs_an_exact_zero_for_dead_patience_steps():
    d = HealthDetector(dead_patience=3, vanish_ratio=None)
    for _ in range(2):
        assert not _flag(d.update(_stats(0.0, 1.0)), "dead")
    assert _flag(d.update(_stats(0.0, 1.0)), "dead")
    assert d.dead_groups().tolist() == [True, False]
    assert not _flag(d.update(_stats(1e-30, 1.0)), "dead")  # tiny is not zero: the run resets


def test_state_dict_round_trip():
    d = HealthDetector(patience=4)
    for i in range(6):
        d.update(_stats(1.0 + i, 2.0))
    fresh = HealthDetector(patience=4)
    fresh.load_state_dict(d.state_dict())
    a, b = d.update(_stats(3.0, 2.0)), fresh.update(_stats(3.0, 2.0))
    assert _values(a.to_host()) == _values(b.to_host())


def _values(reading: Reading) -> list[float]:
    return [-1.0 if math.isnan(v) else v for v in reading.as_dict().values()]


def test_a_checkpoint_in_the_saved_format_loads():
    """The format of the checkpoints written so far: a dict of name -> number or list, in this order."""
    saved = {
        "count": 6.0,
        "mean": 0.5,
        "var": 0.0625,
        "vanish_seen": 6.0,
        "shallow_ring": [0.0, 0.25, 0.5, 0.75],  # float32-exact values: the copy back is exact
        "deep_ring": [1.5, 1.5, 1.5, 1.5],
        "overflow_run": 0.0,
        "dead_run": [2.0, 0.0],
    }
    d = HealthDetector(patience=4, dead_patience=3, warmup_steps=6)
    d.load_state_dict(saved)
    assert d.state_dict() == saved  # kept as loaded until the next update
    reading = d.update(_stats(0.0, 2.0)).to_host()
    assert reading.dead  # the restored run of 2 all-zero steps went on to 3
    assert math.isfinite(reading.zscore)  # 6 restored finite steps armed the spike rule
    after = d.state_dict()
    assert list(after)[: len(saved)] == list(saved)  # the old keys first, in their order
    assert set(after) - set(saved) == {"prev_log", "grow_log", "growth_seen", "total_ring", "group_ring", "unit_run"}
    assert after["count"] == 7.0 and after["vanish_seen"] == 7.0 and after["dead_run"] == [3.0, 0.0]
    assert after["shallow_ring"][2] == pytest.approx(math.log(1e-38))  # slot 6 % 4 was written


def test_a_saved_state_of_another_shape_starts_afresh_where_it_does_not_fit():
    d = HealthDetector(patience=4)
    d.load_state_dict({"count": 3.0, "mean": 1.0, "var": 0.5, "dead_run": [1.0, 1.0, 1.0]})  # three groups
    d.update(_stats(1.0, 1.0))
    state = d.state_dict()
    assert state["count"] == 4.0 and state["dead_run"] == [0.0, 0.0]


def test_reading_comes_to_the_host_in_one_transfer(monkeypatch, backend):
    d = HealthDetector(patience=2)
    reading = d.update(_stats(1.0, 2.0))
    assert all(isinstance(getattr(reading, k), torch.Tensor) and getattr(reading, k).dim() == 0 for k in KINDS)
    assert [getattr(reading, k).dtype for k in KINDS] == [torch.bool] * len(KINDS)
    assert reading.stacked().dtype == torch.float32 and len(reading.stacked()) == 9
    calls = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append("tolist") or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item") or item(t))
    host = reading.to_host()
    # computed on the host, the reading is there already; on a device, one copy
    assert calls == ([] if backend == "numpy" else ["tolist"])
    # the values themselves: nothing armed yet, the ratio of the one step (2 / 1) seen so far
    assert host.active == () and host.total_norm == pytest.approx(math.sqrt(5.0)) and host.loss_scale == 1.0
    assert math.isnan(host.zscore) and host.ratio == pytest.approx(2.0)
    assert reading.stacked()[5:].tolist()[1:] == pytest.approx([2.0, math.sqrt(5.0), 1.0])


def _random_steps(seed: int, steps: int, groups: int, units: int):
    """Per step: group norms (with NaN/Inf, zeros, spikes, slow vanishing), loss finiteness and unit zeros."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        norms = torch.rand(groups, generator=gen) * 10.0 ** torch.randint(-3, 3, (1,), generator=gen).item()
        norms[0] *= 10.0 ** (-step / 10)  # the shallow layer fades: the vanishing rule fires at some point
        pick = torch.rand(4, generator=gen).tolist()
        if pick[0] < 0.05:
            norms[int(pick[1] * groups)] = math.nan if pick[1] < 0.5 else math.inf
        elif pick[0] < 0.1:
            norms *= 1e4  # a spike
        if step // 15 % 2:  # stretches where one layer has no gradient at all
            norms[groups // 2] = 0.0
        zero = torch.rand(units, generator=gen) < (0.9 if step > 20 else 0.2)
        yield norms, pick[2] > 0.05, zero, torch.tensor(2.0 ** int(8 - step // 7))


def test_numpy_and_torch_rules_agree_step_by_step(backend):
    """The two backends run the same rules: same flags every step, same state to float32 rounding."""
    if backend == "torch":
        pytest.skip("compares both backends itself")
    groups, per_group = 5, (4, 0, 6, 3, 3)
    grouping = Grouping(
        names=tuple(f"g{i}" for i in range(groups)),
        index=tuple(range(groups)),
        members=tuple((f"g{i}.w",) for i in range(groups)),
    )
    num_units = sum(per_group)
    unit_group = torch.tensor([g for g, n in enumerate(per_group) for _ in range(n)])
    # the 6 units of g2 have no bias: looked at in 3 turns, the others every step
    in_turns = unit_group == 2
    every_all = torch.where(in_turns, 3.0, 1.0)  # one object for the run, as UnitStats.take makes it
    for scaler in (False, True):
        detectors = {name: HealthDetector(patience=6, warmup_steps=5, dead_patience=4) for name in BACKENDS}
        steps = _random_steps(seed=int(scaler), steps=90, groups=groups, units=num_units)
        for step, (norms, loss_ok, zero, scale) in enumerate(steps):
            present = [True] * groups  # zero norms elsewhere: gradients that are exactly zero (the dead rule)
            if step % 10 == 7:  # g3 has no gradient at all
                present[3], norms[3] = False, 0.0
            if step % 25 == 11:  # one layer only: no deep/shallow ratio
                present = [True] + [False] * (groups - 1)
                norms[1:] = 0.0
            stats = GroupedStats(grouping=grouping, norms=norms, max_abs=norms, present=tuple(present))
            looked = torch.tensor([u for u in range(num_units) if not in_turns[u] or u % 3 == step % 3])
            units = UnitStats(
                zero=zero[looked],
                nonzero=~zero[looked],
                looked=looked,
                every=every_all[looked],
                every_all=every_all,
                group=unit_group,
                per_group=per_group,
            )
            readings = {}
            for name, ops in BACKENDS.items():
                with _arrays.forced(ops):
                    readings[name] = (
                        detectors[name]
                        .update(
                            stats,
                            loss_finite=torch.tensor(loss_ok),
                            scaler_active=scaler,
                            loss_scale=scale if scaler else None,
                            units=units,
                        )
                        .to_host()
                    )
            a, b = readings["numpy"], readings["torch"]
            assert a.active == b.active
            for field in ("zscore", "ratio", "total_norm", "loss_scale"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5, nan_ok=True), field
            assert detectors["numpy"].dead_unit_shares().tolist() == detectors["torch"].dead_unit_shares().tolist()
            ga, gb = detectors["numpy"].layer_growth(), detectors["torch"].layer_growth()
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5, equal_nan=True)
        sa, sb = (detectors[name].state_dict() for name in BACKENDS)
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(
                torch.tensor(sa[key]), torch.tensor(sb[key]), rtol=1e-5, atol=1e-5, equal_nan=True
            )
    # the random steps exercise every rule: not a comparison of two idle detectors
    kinds = set()
    with _arrays.forced(_arrays.HOST):
        d = HealthDetector(patience=6, warmup_steps=5, dead_patience=4)
        for norms, _, _, _ in _random_steps(seed=0, steps=90, groups=groups, units=num_units):
            present = (True,) * groups  # zero norms: gradients that are exactly zero (the dead rule)
            kinds.update(
                d.update(GroupedStats(grouping=grouping, norms=norms, max_abs=norms, present=present)).to_host().active
            )
    assert kinds >= {"nonfinite", "exploding", "vanishing", "dead"}


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"max_norm": -1.0}, r"`max_norm` must be a finite number > 0 or None, got -1.0"),
        ({"spike_zscore": 0}, r"`spike_zscore` must be a finite number > 0 or None"),
        ({"spike_min_ratio": math.nan}, r"`spike_min_ratio` must be a finite number > 0 or None"),
        ({"ema_alpha": 1.0}, r"`ema_alpha` must be a finite number in \(0, 1\), got 1.0"),
        ({"ema_alpha": True}, r"`ema_alpha`"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer in \[0, 1000000000\], got -1"),
        ({"warmup_steps": 2.0}, r"`warmup_steps` must be an integer in \[0, 1000000000\]"),
        ({"vanish_ratio": 0.5}, r"`vanish_ratio` must be a finite number > 1 or None, got 0.5"),
        ({"vanish_ratio": 1}, r"`vanish_ratio` must be a finite number > 1"),
        ({"vanish_floor": math.inf}, r"`vanish_floor` must be a finite number > 0 or None"),
        ({"patience": 0}, r"`patience` must be an integer in \[1, 1000000\], got 0"),
        ({"dead_patience": 1.5}, r"`dead_patience` must be an integer in \[1, 1000000000\]"),
        ({"max_consecutive_overflows": 0}, r"`max_consecutive_overflows` must be an integer in \[1, 1000000000\]"),
        ({"min_loss_scale": None}, r"`min_loss_scale` must be a finite number > 0, got None"),
    ],
)
def test_every_setting_is_checked_by_the_config_and_the_detector(settings, match):
    with pytest.raises(ValueError, match=match):
        DetectorConfig(**settings)
    with pytest.raises(ValueError, match=match):
        HealthDetector(**settings)


def test_config_keeps_numbers_as_floats_and_detector_takes_one_or_the_other():
    config = DetectorConfig(max_norm=100, ema_alpha=1 / 2, min_loss_scale=2)
    assert config == DetectorConfig(max_norm=100.0, ema_alpha=0.5, min_loss_scale=2.0)  # one state key for both
    assert all(isinstance(v, float) for v in (config.max_norm, config.ema_alpha, config.min_loss_scale))
    assert isinstance(config.patience, int)
    with pytest.raises(ValueError, match=r"`max_norm` must fit float32"):
        DetectorConfig(max_norm=1e39)  # would be inf in the float32 state
    with pytest.raises(ValueError, match=r"`patience` must be an integer in \[1, 1000000\], got 10000000"):
        DetectorConfig(patience=10**7)  # sizes a device buffer
    assert HealthDetector(config).config is config
    assert HealthDetector(patience=3).config == DetectorConfig(patience=3)
    with pytest.raises(TypeError, match="not both"):
        HealthDetector(config, patience=3)


def _evidence(detector: HealthDetector, stats: GroupedStats, **kwargs) -> Evidence:
    reading = detector.update(stats, **kwargs).to_host()
    return Evidence.collect(detector, stats, reading, scaler_active=kwargs.get("scaler_active", False))


def test_each_kind_has_its_finding():
    d = HealthDetector(max_norm=10.0, dead_patience=1, max_consecutive_overflows=2, vanish_ratio=1e3, patience=1)
    boom = build_finding("exploding", 0, _evidence(d, _stats(30.0, 40.0)))
    assert boom.summary.startswith("total norm 50, above the ceiling max_norm=10;") and boom.zscore is None
    assert "at the first step, before any update" in boom.summary  # so the learning rate cannot be the cause
    assert "amplifies" in boom.advice[0] and not boom.toward_input
    assert [name for name, _ in boom.layers] == ["first", "last"]  # in depth order, both within 10x of the largest
    low = build_finding("vanishing", 1, _evidence(d, _stats(1e-6, 1.0)))
    assert low.layers == [("first", pytest.approx(1e-6))] and low.ratio == pytest.approx(1e6, rel=1e-4)
    dead = build_finding("dead", 2, _evidence(d, _stats(0.0, 1.0)))
    assert dead.layers == [("first", 0.0)] and "for 1 steps in a row" in dead.summary
    scale = torch.tensor(8.0)
    evidence = _evidence(d, _stats(math.inf, 1.0), scaler_active=True, loss_scale=scale)
    overflow = build_finding("overflow", 3, evidence)
    assert overflow.layers == [("first", math.inf)] and "loss scale 8" in overflow.summary
    evidence = _evidence(d, _stats(math.inf, 1.0), scaler_active=True, loss_scale=scale)
    assert evidence.reading.nonfinite and evidence.overflow_run == 2
    nan = build_finding("nonfinite", 4, evidence)
    assert "after 2 fp16 overflow steps in a row (loss scale 8)" in nan.summary
    assert any("bf16" in a for a in nan.advice)
    with pytest.raises(ValueError, match="kind"):
        build_finding("sideways", 5, evidence)


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


class _ResidualMLP(nn.Module):
    """Ten Linear layers whose residuals live in ``forward``: the modules alone look like a plain stack."""

    def __init__(self, cat: bool = False):
        super().__init__()
        self.cat = cat
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(10))

    def forward(self, x):
        for layer in self.layers:  # a dense-net join (concatenate, then fold) or a residual sum
            x = torch.cat([x, torch.relu(layer(x))], 1).view(-1, 2, 4).sum(1) if self.cat else x + torch.relu(layer(x))
        return x.sum()


@pytest.mark.parametrize("cat", [False, True], ids=["add", "cat"])
def test_skip_connections_written_in_forward_are_seen_and_residuals_are_not_advised_again(cat):
    net = _ResidualMLP(cat)
    params = ParamSet.from_module(net)
    x = torch.randn(3, 4)
    order = ForwardOrder.of(net(x), params)
    assert order.skips >= 9  # every block after the first (whose input is not an operation)
    grouping = Grouping.build(params, order=order)
    assert grouping.skips == order.skips
    assert not any("residual" in a for a in advise("vanishing", net, skips=order.skips))
    assert any("LayerNorm" in a for a in advise("vanishing", net, skips=order.skips))
    assert any("residual" in a for a in advise("vanishing", net, skips=0))
    plain = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    assert ForwardOrder.of(plain(x).sum(), ParamSet.from_module(plain)).skips == 0
    grown = advise("exploding", net, depth_problem=True, skips=order.skips)
    assert any("normalisation" in a for a in grown) and not any("residual" in a for a in grown)


# ---------------------------------------------------------------------- geometric growth


def _stats3(*norms: float) -> GroupedStats:
    grouping = Grouping(names=("in", "mid", "out"), index=(0, 1, 2), members=(("in.w",), ("mid.w",), ("out.w",)))
    t = torch.tensor(norms)
    return GroupedStats(grouping=grouping, norms=t, max_abs=t.abs(), present=(True, True, True))


def test_geometric_growth_is_exploding_at_its_second_step_before_any_ceiling_or_warm_up():
    d = HealthDetector(max_norm=None, growth_total=1e3, growth_step=2.0)  # spike rule not armed yet (warm-up 20)
    flags = [_flag(d.update(_stats(1.0, 1.0)), "exploding") for _ in range(3)]
    flags += [_flag(d.update(_stats(10.0, 10.0)), "exploding")]  # x10: one step is not a trend
    flags += [_flag(d.update(_stats(1e3, 1e3)), "exploding")]  # x100 more: x1e3 over two growing steps
    assert flags == [False, False, False, False, True]
    d = HealthDetector(max_norm=None, growth_total=1e3)
    for norm in (1.0, 1.5, 1.2, 1.9, 1.1, 2.0, 1.0):  # a healthy wobble never accumulates
        assert not _flag(d.update(_stats(norm, norm)), "exploding")
    d = HealthDetector(max_norm=None, growth_total=1e3)
    flags = [_flag(d.update(_stats(v, v)), "exploding") for v in (1.0, 1e3, float("inf"), 1e3, 1.5e3)]
    assert flags == [False, True, False, False, False]  # overflow steps in between neither count nor reset
    d = HealthDetector(max_norm=None, growth_total=1e3)
    flags = [_flag(d.update(_stats(v, v)), "exploding") for v in (1.0, 8.0, float("inf"), float("inf"), 64.0, 1e3)]
    assert flags == [False, False, False, False, False, True]  # x8, two fp16 overflows, x8, x16: 1e3 in all
    d = HealthDetector(max_norm=None, growth_total=1e3)
    flags = [_flag(d.update(_stats(v, v)), "exploding") for v in (1.0, 30.0, 30.0, 20.0, 1e3, 1e3)]
    assert flags == [False, False, False, False, True, False]  # the last step must rise itself
    d = HealthDetector(max_norm=None, growth_total=None)
    assert not any(_flag(d.update(_stats(v, v)), "exploding") for v in (1.0, 10.0, 1e3, 1e5))


def test_a_finding_names_the_grown_layers_in_depth_order_and_sees_growth_toward_the_input():
    d = HealthDetector(max_norm=None, growth_total=1e3)
    for norms in ((1.0, 1.0, 1.0), (30.0, 3.0, 1.0)):
        d.update(_stats3(*norms))
    ev = _evidence(d, _stats3(3e4, 3e2, 1.1))  # grows most at the input: a depth problem
    f = build_finding("exploding", 2, ev)
    assert [n for n, _ in f.layers] == ["in", "mid"]  # "out" barely moved
    assert f.toward_input and "grows toward the input" in f.summary
    assert "amplifies" in f.advice[0] and "only delays" in f.advice[2]
    d = HealthDetector(max_norm=None, growth_total=1e3)
    for norms in ((1.0, 1.0, 1.0), (1.0, 3.0, 30.0)):
        d.update(_stats3(*norms))
    f = build_finding("exploding", 2, _evidence(d, _stats3(1.2, 3e2, 3e4)))
    assert [n for n, _ in f.layers] == ["mid", "out"] and not f.toward_input
    assert f.advice[0].startswith("clip gradients by norm")


# ---------------------------------------------------------------------- dead units


def test_dead_units_need_a_share_of_a_layer_for_dead_patience_steps_and_ignore_silent_steps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    params = ParamSet.from_module(net)
    grouping = Grouping.build(params)
    d = HealthDetector(dead_patience=3, dead_unit_share=0.5)

    def step(dead_rows: int, silent: bool = False) -> bool:
        net.zero_grad()
        net(torch.randn(16, 3)).sum().backward()
        if silent:
            net[0].weight.grad.zero_()  # a step that tells nothing about its units (unused layer)
            net[0].bias.grad.zero_()
        else:  # a dead unit: no output gradient, so its weight row and bias entry are zero
            net[0].weight.grad[:dead_rows] = 0
            net[0].bias.grad[:dead_rows] = 0
        units = UnitStats.take(params, grouping, net, torch.device("cpu"))
        assert units.per_group == (8, 2)
        return d.update(params_stats(params, grouping), units=units).to_host().dead

    assert [step(5), step(5), step(5, silent=True)] == [False, False, False]  # a silent step holds the runs
    assert step(5)  # 5 of 8 units zero for 3 counted steps: 62% >= 50%
    shares = d.dead_unit_shares().tolist()
    assert shares[0] == pytest.approx(5 / 8) and shares[1] == 0.0
    assert not step(0)  # they came back
    d = HealthDetector(dead_patience=3, dead_unit_share=0.5)
    assert not any(step(3) for _ in range(5))  # 3 of 8 stay below the share


def test_embedding_and_pruned_weights_are_not_watched():
    from torch.nn.utils import prune

    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.Linear(6, 6), nn.Conv1d(1, 3, 2))
    prune.random_unstructured(net[2], "weight", amount=0.5)
    layout = UnitLayout.of(ParamSet.from_module(net), net)
    params = ParamSet.from_module(net)
    assert [params.names[i] for i in layout.positions] == ["1.weight", "3.weight"]
    assert layout.rows == (6, 3)


def test_a_dead_unit_finding_names_layer_and_share():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = ParamSet.from_module(net)
    grouping = Grouping.build(params)
    d = HealthDetector(dead_patience=1, dead_unit_share=0.5)
    net(torch.randn(16, 3)).sum().backward()
    net[0].weight.grad[:3] = 0
    net[0].bias.grad[:3] = 0
    units = UnitStats.take(params, grouping, net, torch.device("cpu"))
    stats = params_stats(params, grouping)
    reading = d.update(stats, units=units).to_host()
    f = build_finding("dead", 0, Evidence.collect(d, stats, reading, units=units), model=net)
    assert f.units == [("0", 0.75, 4)]
    assert "0: 75% of 4" in f.summary and "units" in f.message()
    md = f.markdown()
    assert "| `0` | 75% of 4 |" in md and "**Try:**" in md and "dead ReLUs" in md


def params_stats(params: ParamSet, grouping: Grouping) -> GroupedStats:
    return take_snapshot(params).grouped(grouping)


def test_markdown_escapes_and_lists_layers_input_side_first():
    f = Finding("vanishing", 3, "a_b | c", layers=[("net.0", 1e-9), ("net.2", 1e-7)], advice=["use *He* init"])
    md = f.markdown()
    assert md.startswith("**vanishing** gradients at step 3: a\\_b \\| c")
    assert md.index("`net.0`") < md.index("`net.2`")
    assert "- use \\*He\\* init" in md


def test_many_weights_without_bias_are_looked_at_in_turns_and_a_unit_needs_two_zero_looks(monkeypatch):
    from lightning_gradguard import stats as stats_module

    monkeypatch.setattr(stats_module, "UNIT_WEIGHTS_PER_STEP", 2)
    torch.manual_seed(0)
    # 5 weights without bias: 3 turns of at most 2; one with a bias, looked at every step
    net = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(5)], nn.Linear(4, 3))
    params = ParamSet.from_module(net)
    grouping = Grouping.build(params)
    d = HealthDetector(dead_patience=1, dead_unit_share=0.5)
    flags, looked = [], []
    for step in range(7):
        net.zero_grad()
        net(torch.randn(8, 4)).sum().backward()
        net[4].weight.grad[:3] = 0  # the last bias-free layer (turn 2) has 3 of 4 units dead
        units = UnitStats.take(params, grouping, net, torch.device("cpu"), step)
        assert units.num_units == 23
        looked.append(units.looked.tolist())
        assert units.every.tolist() == [1.0] * 3 + [3.0] * (len(looked[-1]) - 3)
        flags.append(d.update(params_stats(params, grouping), units=units).to_host().dead)
    assert looked[:3] == [[0, 1, 2, *range(3, 11)], [0, 1, 2, *range(11, 19)], [0, 1, 2, *range(19, 23)]]
    assert flags == [False, False, False, False, False, True, True]  # from the second zero look of turn 2 (step 5)


def test_units_are_read_from_the_bias_where_there_is_one(monkeypatch):
    from lightning_gradguard import stats as stats_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2, bias=False))
    params = ParamSet.from_module(net)
    layout = UnitLayout.of(params, net)
    assert [params.names[i] for i in layout.positions] == ["0.weight", "2.weight"]
    assert [params.names[b] if b is not None else None for b in layout.biases] == ["0.bias", None]
    rows_read = []
    original = stats_module._row_activity
    monkeypatch.setattr(stats_module, "_row_activity", lambda g, r, d: rows_read.append(r) or original(g, r, d))
    net(torch.randn(8, 3)).sum().backward()
    net[0].bias.grad[:2] = 0  # units 0 and 1 of the first layer: no output gradient
    net[0].weight.grad[:2] = 0
    net[2].weight.grad[1] = 0
    units = UnitStats.take(params, Grouping.build(params), net, torch.device("cpu"))
    assert units.zero.tolist() == [True, True, False, False, False, False, False, True]
    assert rows_read == [2]  # only the bias-free layer's rows were read
    net[0].bias.grad = None  # a bias without a gradient (frozen alone): its weight's rows instead
    units = UnitStats.take(params, Grouping.build(params), net, torch.device("cpu"))
    assert units.zero.tolist()[:6] == [True, True, False, False, False, False]
    assert rows_read == [2, 6, 2]
