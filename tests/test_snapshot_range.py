"""One read of the gradients per snapshot: exact norms at any scale, finiteness from the norms, max |g| on demand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_gradguard import _lightning
from lightning_gradguard.stats import (
    MAX_ABS_LEARNING,
    Grouping,
    ParamSet,
    take_snapshot,
    tensor_norms,
)


def _params(*grads: torch.Tensor | None) -> ParamSet:
    ps = []
    for g in grads:
        p = nn.Parameter(torch.zeros(g.shape if g is not None else (1,), dtype=g.dtype if g is not None else None))
        p.grad = g
        ps.append(p)
    return ParamSet(params=tuple(ps), names=tuple(f"p{i}.weight" for i in range(len(ps))))


def _reference(g: torch.Tensor) -> float:
    return torch.linalg.vector_norm(g.detach().to(torch.complex128 if g.is_complex() else torch.float64)).item()


def _count_max_passes(monkeypatch) -> list[int]:
    calls = [0]
    original = _lightning.foreach_max_abs

    def counting(tensors):
        calls[0] += 1
        return original(tensors)

    monkeypatch.setattr(_lightning, "foreach_max_abs", counting)
    return calls


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_fp32_norms_equal_a_float64_norm_at_any_scale(scale):
    torch.manual_seed(0)
    grads = [torch.randn(n) * scale for n in (1, 7, 256, 2048, 100_000)]
    params = _params(*grads)
    host = take_snapshot(params).grouped(Grouping.build(params, group_by="parameter")).to_host()
    for g, got in zip(grads, host.group_norms.values()):
        assert got == pytest.approx(_reference(g), rel=1e-6)
    total = math.sqrt(sum(_reference(g) ** 2 for g in grads))
    assert host.total_norm == pytest.approx(total, rel=1e-6)
    assert host.all_finite


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        (torch.float16, 65504.0),  # fp16 max: squares and norm far beyond fp16
        (torch.float16, 2.0**-24),  # smallest fp16 subnormal
        (torch.bfloat16, 3.0e38),  # near bf16/fp32 max: the norm of 64 of them exceeds fp32... almost
        (torch.bfloat16, 1e-38),
        (torch.float32, 1.4e-45),  # smallest fp32 subnormal
    ],
)
def test_low_precision_extremes_are_exact(dtype, value):
    g = torch.full((64,), value, dtype=dtype)
    want = _reference(g)
    got = tensor_norms([g])[0].item()
    if want > torch.finfo(torch.float32).max:
        assert got == torch.finfo(torch.float32).max  # saturates: a finite gradient never reads Inf
    else:
        assert got == pytest.approx(want, rel=1e-6)


def test_complex_and_sparse_gradients_are_exact():
    c = torch.randn(33, dtype=torch.complex64) * 1e-30
    s = torch.sparse_coo_tensor([[0, 3, 3]], torch.tensor([1e-25, 2e-25, 2e-25]), (5,))
    norms = tensor_norms([c, s])
    assert norms[0].item() == pytest.approx(_reference(c), rel=1e-6)
    assert norms[1].item() == pytest.approx(math.sqrt(1e-50 + 16e-50), rel=1e-6)  # duplicates summed


def test_float64_gradients_keep_their_range():
    tiny, huge = torch.full((8,), 1e-200, dtype=torch.float64), torch.full((8,), 1e300, dtype=torch.float64)
    norms = tensor_norms([tiny, huge])
    assert norms[0].item() > 0  # reads float32's smallest value rather than 0
    assert norms[1].item() == torch.finfo(torch.float32).max and math.isfinite(norms[1].item())


def test_finiteness_comes_from_the_norms():
    ok, nan, inf = torch.ones(4), torch.tensor([1.0, math.nan]), torch.tensor([1.0, -math.inf])
    params = _params(ok, nan, inf, torch.full((4,), 1e20))
    snap = take_snapshot(params, max_abs=False)
    assert not snap.max_abs_known
    grouped = snap.grouped(Grouping.build(params, group_by="parameter"))
    assert grouped.nonfinite.tolist() == [False, True, True, False]
    assert not snap.all_finite.item() and not grouped.all_finite.item()
    host = grouped.to_host()
    assert host.nonfinite_groups == ("p1.weight", "p2.weight")
    assert not snap.max_abs_known  # nothing above needed max |g|


def test_max_abs_is_read_once_per_snapshot_only_where_asked(monkeypatch):
    params = _params(torch.randn(8), torch.randn(3, 3))
    calls = _count_max_passes(monkeypatch)
    for _ in range(MAX_ABS_LEARNING):  # the first snapshots take it, in case a reader needs it
        take_snapshot(params)
    assert calls[0] == MAX_ABS_LEARNING
    snap = take_snapshot(params)  # nobody read it: norms only from now on
    assert calls[0] == MAX_ABS_LEARNING and not snap.max_abs_known
    grouping = Grouping.build(params, group_by="total")
    host = snap.grouped(grouping).to_host()
    assert calls[0] == MAX_ABS_LEARNING
    want = max(p.grad.abs().max().item() for p in params.params)
    assert host.max_abs == pytest.approx(want)  # computed on read
    assert calls[0] == MAX_ABS_LEARNING + 1
    take_snapshot(params)  # a reader showed up: taken with the norms again
    assert calls[0] == MAX_ABS_LEARNING + 2


def test_max_abs_read_after_an_in_place_change_warns():
    params = _params(torch.full((4,), 3.0))
    params.cache["snapshots_taken"] = MAX_ABS_LEARNING
    snap = take_snapshot(params)
    params.params[0].grad.mul_(0.5)
    with pytest.warns(RuntimeWarning, match="changed in place"):
        assert snap.max_abs.item() == 1.5
    snap = take_snapshot(params)  # asked for once: up front from now on
    params.params[0].grad.mul_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert snap.max_abs.item() == 1.5


def test_scaled_snapshot_reads_max_abs_lazily_unscaled():
    g = torch.tensor([3.0, -4.0]) * 1024
    params = _params(g)
    params.cache["snapshots_taken"] = MAX_ABS_LEARNING
    snap = take_snapshot(params, scale=1024.0)
    assert snap.norms.item() == pytest.approx(5.0)
    assert snap.max_abs.item() == pytest.approx(4.0)


def test_cpu_norms_read_again_in_float64_only_the_tensors_out_of_float32_range(monkeypatch):
    # float64 accumulation costs 4-16x a float32 norm on the CPU for large tensors, and ~2x
    # for many small ones: the norms are float32, and only the tensors whose float32 norm
    # may have left the range are read again, in float64 (exact).
    n = 4097
    tiny, small, big, huge = (torch.full((n,), v) for v in (1e-25, 1e-20, 1.0, 3e38))
    with_inf = torch.randn(n)
    with_inf[3] = math.inf
    wide_reads = []
    original = _lightning.foreach_norm
    monkeypatch.setattr(
        _lightning,
        "foreach_norm",
        lambda ts, o, dtype=None, **kw: wide_reads.append((len(ts), dtype)) or original(ts, o, dtype, **kw),
    )
    calls = _count_max_passes(monkeypatch)
    snap = take_snapshot(_params(big, torch.randn(n)), max_abs=False)
    assert wide_reads == [(2, None)] and not snap.max_abs_known  # all in range: one float32 read
    wide_reads.clear()
    snap = take_snapshot(_params(tiny, small, big, huge, with_inf, torch.zeros(n)), max_abs=False)
    assert wide_reads == [(6, None), (5, torch.float64)]  # all but `big` again
    assert calls[0] == 0
    norms = snap.norms.tolist()
    for got, g in zip(norms[:3], (tiny, small, big)):
        assert got == pytest.approx(_reference(g), rel=1e-6)  # exact, not a bound
    assert norms[3] == pytest.approx(3.4028235e38, rel=1e-6)  # finite beyond float32: saturates, never Inf
    assert norms[4] == math.inf and norms[5] == 0.0
    assert snap.max_abs[2].item() == 1.0  # read on demand


def test_float64_cpu_tensors_out_of_their_range_get_bounds():
    tiny, huge = torch.full((3,), 1e-200, dtype=torch.float64), torch.full((4,), 1e200, dtype=torch.float64)
    norms = take_snapshot(_params(tiny, huge), max_abs=False).norms.tolist()
    assert norms[0] > 0  # a lower bound, saturated at float32's smallest subnormal
    assert norms[1] == pytest.approx(3.4028235e38, rel=1e-6)


def test_grouping_and_copying_do_not_count_as_reading_max_abs(monkeypatch):
    params = _params(torch.randn(8), torch.randn(3, 3))
    grouping = Grouping.build(params, group_by="parameter")
    for _ in range(MAX_ABS_LEARNING):  # eager snapshots, grouped and copied, max never read
        grouped = take_snapshot(params).grouped(grouping)
        grouped.to_host()
        assert grouped.max_abs_known and grouped.all_finite.item()
    calls = _count_max_passes(monkeypatch)
    take_snapshot(params)
    assert calls[0] == 0  # nobody read max |g|: norms only


def test_reading_an_up_front_max_abs_keeps_it_up_front(monkeypatch):
    params = _params(torch.randn(8))
    grouping = Grouping.build(params, group_by="total")
    for _ in range(MAX_ABS_LEARNING):
        host = take_snapshot(params).grouped(grouping).to_host()
    assert host.max_abs > 0  # a reader of the copied value
    calls = _count_max_passes(monkeypatch)
    take_snapshot(params)
    assert calls[0] == 1


def test_a_clipper_reuses_the_snapshot_buckets_only_for_the_very_same_gradients():
    import gc
    import weakref

    grads = [torch.randn(3), torch.randn(2, 2), None]
    params = _params(*grads)
    snap = take_snapshot(params)
    now = params.grads()
    buckets = snap.buckets_of(now)
    assert buckets is not None and [t for ts, _ in buckets.values() for t in ts] == [now[0], now[1]]
    params.params[1].grad = torch.randn(2, 2)  # replaced by someone else: bucket again
    assert snap.buckets_of(params.grads()) is None
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (3,))
    assert take_snapshot(_params(sparse, torch.randn(2))).buckets_of([sparse, None]) is None
    # the snapshot keeps no gradient alive
    ref = weakref.ref(params.params[0].grad)
    snap = take_snapshot(params)
    params.params[0].grad = None
    del now, buckets, grads
    gc.collect()
    assert ref() is None and snap.norms[0] > 0
