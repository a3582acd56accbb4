"""The two backends of the small running statistics (:mod:`lightning_gradguard._arrays`) compute the same thing.

On the CPU the rules and the combining of norms run in numpy on views of the tensors'
memory; on a device, in torch. The detector's rules are compared step by step in
``test_diagnosis``, the z-score rule in ``test_clipping``; here: the operations
themselves (NaN handling, the lower median, in-place writes) and the norm combining
of :mod:`lightning_gradguard.stats` on real gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradguard import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm, _arrays
from lightning_gradguard.stats import Grouping, ParamSet, UnitStats, reduce_norms, take_snapshot, total_norm

HOST, DEVICE = _arrays.HOST, _arrays.DEVICE
NAN, INF = math.nan, math.inf


def _host(x: torch.Tensor):
    return HOST.array(x)


@pytest.mark.parametrize(
    "values",
    [[3.0, 1.0, 2.0, 4.0], [5.0, NAN, 1.0, NAN], [NAN, NAN], [2.0], [1.0, INF, -INF, 0.0, 7.0]],
)
def test_nanmedian_is_torchs_lower_median(values):
    x = torch.tensor(values)
    want = x.nanmedian()
    got = HOST.nanmedian(_host(x))
    assert (math.isnan(want) and math.isnan(got)) or float(got) == float(want)
    assert np.asarray(got).dtype == np.float32


@pytest.mark.parametrize("a", [1.0, -2.0, NAN, INF, 0.0])
@pytest.mark.parametrize("b", [0.5, NAN, -INF, 3.0])
def test_scalar_operations_keep_torchs_nan_and_dtype(a, b):
    ta, tb = torch.tensor(a), torch.tensor(b)
    ha, hb = _host(ta), _host(tb)
    pairs = [
        (HOST.minimum(ha, hb), torch.minimum(ta, tb)),
        (HOST.clamp_min(ha, b), ta.clamp_min(b)),
        (HOST.clamp_max(ha, b), ta.clamp_max(b)),
        (HOST.where(ha > hb, ha, hb), torch.where(ta > tb, ta, tb)),
    ]
    if a >= 0 or math.isnan(a):
        pairs += [(HOST.log(ha), torch.log(ta)), (HOST.sqrt(ha), torch.sqrt(ta))]
    pairs.append((HOST.exp(ha), torch.exp(ta)))
    for got, want in pairs:
        got32 = np.float32(got)
        assert (math.isnan(want) and math.isnan(got32)) or got32 == np.float32(want.item()), (got, want)
    # flags stay numpy booleans, so that ~ negates them (a Python bool would give -1 or -2)
    flag = HOST.isfinite(ha) & (ha > hb)
    assert isinstance(flag, np.bool_) and bool(~flag) == (not bool(flag))


def test_in_place_writes_reach_the_tensors_under_both_backends():
    for ops in (HOST, DEVICE):
        count, ring = torch.zeros(()), torch.full((3,), NAN)
        s = _arrays.InPlace({"count": count, "ring": ring}, ops)
        for value in (1.5, 2.5):
            slot = ops.slot(s.count, 3)
            ops.write_row(s, "ring", slot, ops.array(torch.tensor(value)), ops.array(torch.tensor(True)))
            s.count = s.count + 1
        ops.write_row(s, "ring", ops.slot(s.count, 3), ops.array(torch.tensor(9.0)), ops.array(torch.tensor(False)))
        assert count.item() == 2 and ring[:2].tolist() == [1.5, 2.5] and math.isnan(ring[2]), ops.name


def _model_with_gradients(scale: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2, bias=False))
    net(torch.randn(5, 6)).pow(2).sum().backward()
    for p in net.parameters():
        p.grad.mul_(scale)
    net[2].bias.grad[:3] = 0  # three units of the second layer: no gradient
    return net


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30, NAN])
def test_norms_group_norms_and_unit_flags_agree(scale):
    net = _model_with_gradients(scale)
    params = ParamSet.from_module(net)
    grouping = Grouping.build(params)
    seen = {}
    for ops in (HOST, DEVICE):
        with _arrays.forced(ops):
            snap = take_snapshot(params)
            stats = snap.grouped(grouping)
            units = UnitStats.take(params, grouping, net, torch.device("cpu"))
            seen[ops.name] = (snap.total_norm, snap.all_finite, stats.norms, units.zero, units.nonzero)
    for got, want in zip(seen["numpy"], seen["torch"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want) or torch.allclose(got, want, equal_nan=True, rtol=1e-6, atol=0)
    if math.isfinite(scale):
        exact = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in net.parameters()))
        assert seen["numpy"][0].item() == pytest.approx(exact, rel=1e-6)
        assert seen["numpy"][3].tolist()[8:11] == [True, True, True]


def test_reduce_norms_saturates_and_keeps_nan_and_inf_on_the_host():
    norms = torch.tensor([3e-30, 4e-30, INF, 3e38, 3e38, NAN, 1.0])
    index = torch.tensor([0, 0, 1, 2, 2, 3, 4])
    for ops in (HOST, DEVICE):
        with _arrays.forced(ops):
            got = reduce_norms(norms, index, 6)
            assert got.dtype == torch.float32
            assert got[0].item() == pytest.approx(5e-30, rel=1e-6) and math.isinf(got[1])
            assert got[2].item() == torch.finfo(torch.float32).max and math.isnan(got[3])
            assert got[4].item() == 1.0 and got[5].item() == 0.0
            assert total_norm(torch.tensor([3e38, 3e38])).item() == torch.finfo(torch.float32).max


@pytest.mark.parametrize("cls", [VanishExplodeAlarm, AdaptiveClipper, GradientNormLogger, AmpUnscaleCheck])
def test_state_key_is_made_once_and_again_after_a_setting_changes(cls, monkeypatch):
    cb = cls()
    made = []
    generate = cb._generate_state_key
    monkeypatch.setattr(cb, "_generate_state_key", lambda **kw: made.append(1) or generate(**kw))
    key = cb.state_key
    assert cb.state_key == key and len(made) == 1  # Lightning reads it at every hook call
    cb.log_every_n_steps = 7
    assert cb.state_key != key and len(made) == 2
    assert cb.state_key == generate(**cb._key_settings())


def _two_layer_stats(first: float, last: float):
    from lightning_gradguard.stats import GroupedStats

    grouping = Grouping(names=("first", "last"), index=(0, 1), members=(("first.w",), ("last.w",)))
    norms = torch.tensor([first, last])
    return GroupedStats(grouping=grouping, norms=norms, max_abs=norms, present=(True, True))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_detector_copied_after_a_cpu_update_keeps_its_own_state(how):
    """The detector caches numpy views of its state's memory: a copy must not keep the original's views."""
    import copy
    import pickle

    from lightning_gradguard.diagnosis import HealthDetector

    d = HealthDetector(patience=3, warmup_steps=0)
    d.update(_two_layer_stats(1.0, 2.0))
    twin = copy.deepcopy(d) if how == "deepcopy" else pickle.loads(pickle.dumps(d))
    for _ in range(4):
        twin.update(_two_layer_stats(1e-6, 2.0))
    assert d.state_dict()["count"] == 1.0 and twin.state_dict()["count"] == 5.0
    assert twin.update(_two_layer_stats(1e-6, 2.0)).to_host().vanishing  # its rings did fill
    assert not d.update(_two_layer_stats(1.0, 2.0)).to_host().vanishing
    view = _arrays.InPlace({"x": torch.zeros(())})
    assert copy.copy(view) is not view  # no endless lookup while the copy has no views yet


def test_an_alarm_pickles_after_a_cpu_fit(tmp_path):
    import pickle

    import lightning.pytorch as pl
    from helpers import RecordingMLP, loader

    alarm = VanishExplodeAlarm()
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[alarm],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(RecordingMLP(), loader())
    again = pickle.loads(pickle.dumps(alarm))
    assert again.steps_checked == 3 and again.state_key == alarm.state_key


def test_host_arithmetic_raises_no_numpy_warnings():
    """Overflow and inf/inf in the host backend give what torch gives, silently (``-W error`` must not break a run)."""
    import warnings

    from lightning_gradguard.clipping import ZScoreThreshold, clip_coefficient
    from lightning_gradguard.diagnosis import HealthDetector

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clip_coefficient(torch.tensor(0.0), 10.0).item() == 1.0  # 10 / tiny overflows
        assert clip_coefficient(torch.tensor(INF), torch.tensor(INF)).item() == 1.0  # inf / inf
        rule = ZScoreThreshold(warmup_steps=2, max_norm=INF)
        for norm in (1.0, 2.0, 3e38, INF, NAN, 0.0):
            rule.observe(torch.tensor(norm), torch.tensor(True))
            rule.threshold()
        d = HealthDetector(patience=2)
        for pair in ((1.0, 2.0), (INF, 1.0), (NAN, NAN), (0.0, 0.0), (3e38, 1e-38)):
            d.update(_two_layer_stats(*pair)).to_host()


def test_the_shard_key_cache_holds_one_entry():
    from lightning_gradguard.stats import tensor_stats

    cache: dict = {}
    tensors = [torch.ones(3), torch.ones(2)]
    for _ in range(20):  # a caller that builds a new list of keys every step
        tensor_stats(tensors, [() for _ in tensors], cache=cache)
    assert sum(1 for k in cache if k == "shard keys" or (isinstance(k, tuple) and k[:1] == ("shard keys",))) == 1
