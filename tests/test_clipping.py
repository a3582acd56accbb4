"""The clipping math of lightning_gradguard.clipping, without a Trainer: unit and property tests."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_gradguard import _arrays
from lightning_gradguard.clipping import (
    PercentileThreshold,
    UnitwiseClip,
    ZScoreThreshold,
    agc,
    clip_by_norm_,
    clip_by_value_,
    clip_coefficient,
    modes,
    ops,
    scale_,
    thresholds,
)
from lightning_gradguard.stats import ParamSet, take_snapshot

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@st.composite
def tensor_lists(draw, min_size: int = 1, max_size: int = 5) -> list[torch.Tensor]:
    """Float32 tensors of mixed shapes and magnitudes (1e-6 .. 1e6), some entirely zero."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in draw(st.lists(shapes, min_size=min_size, max_size=max_size)):
        magnitude = 10.0 ** draw(st.floats(-6, 6))
        t = torch.randn(shape, generator=gen) * magnitude
        if draw(st.integers(0, 9)) == 0:
            t.zero_()
        out.append(t)
    return out


def params_with_grads(grads: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> ParamSet:
    params = []
    for i, g in enumerate(grads):
        p = nn.Parameter(weights[i].clone() if weights is not None else torch.zeros_like(g))
        p.grad = g
        params.append(p)
    return ParamSet(params=tuple(params), names=tuple(f"p{i}" for i in range(len(params))))


def norm64(tensors: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])).item()


# --------------------------------------------------------------------------------------
# coefficient and norm clipping
# --------------------------------------------------------------------------------------


def test_docstring_examples_run():
    results = [doctest.testmod(module) for module in (ops, thresholds, agc, modes)]
    assert sum(r.attempted for r in results) > 10 and sum(r.failed for r in results) == 0


@pytest.mark.parametrize(
    ("norm", "threshold", "want"),
    [
        (10.0, 2.5, 0.25),
        (2.0, 2.5, 1.0),
        (0.0, 2.5, 1.0),  # nothing to scale
        (0.0, 0.0, 1.0),
        (3.0, 0.0, 0.0),  # a zero threshold zeroes the gradient
        (math.nan, 2.5, 1.0),  # non-finite: left alone
        (math.inf, 2.5, 1.0),
        (5.0, math.inf, 1.0),  # infinite threshold: no clipping
        (math.inf, math.inf, 1.0),
        (1e-30, 1e-31, 0.1),  # tiny norms keep their ratio (no additive epsilon)
    ],
)
def test_clip_coefficient(norm, threshold, want):
    got = clip_coefficient(torch.tensor(norm), threshold).item()
    assert got == pytest.approx(want, rel=1e-6)
    # the same with a tensor threshold
    assert clip_coefficient(torch.tensor(norm), torch.tensor(threshold)).item() == pytest.approx(want, rel=1e-6)


@PROPERTY
@given(grads=tensor_lists(), log_threshold=st.floats(-7, 7))
def test_norm_clip_bounds_the_norm_and_keeps_the_direction(grads, log_threshold):
    threshold = 10.0**log_threshold
    before = [g.clone() for g in grads]
    snap = take_snapshot(params_with_grads(grads))  # the norm as the callbacks measure it
    coef = clip_by_norm_(grads, snap.total_norm, threshold)
    pre, post = norm64(before), norm64(grads)
    assert post <= threshold * (1 + 1e-6) + 1e-37, f"post-clip norm {post} > threshold {threshold}"
    c = coef.item()
    assert 0 <= c <= 1
    if pre <= threshold:
        assert c == 1.0 and all(torch.equal(a, b) for a, b in zip(before, grads)), "clipped below the threshold"
    else:
        assert post == pytest.approx(threshold, rel=1e-5), "not clipped down to the threshold"
    # direction: every element scaled by the same coefficient
    for a, b in zip(before, grads):
        torch.testing.assert_close(b, a * coef, rtol=1e-6, atol=0.0)
    if pre > 0 and post > 0:
        cos = sum((a.double() * b.double()).sum().item() for a, b in zip(before, grads)) / (pre * post)
        assert cos == pytest.approx(1.0, abs=1e-6)


def test_norm_clip_leaves_a_nonfinite_gradient_alone():
    grads = [torch.tensor([1.0, math.nan]), torch.tensor([1e3])]
    snap = take_snapshot(params_with_grads(grads))
    coef = clip_by_norm_(grads, snap.total_norm, 1.0)
    assert coef.item() == 1.0 and grads[1].item() == 1e3


def test_scale_handles_mixed_dtypes_none_and_empty():
    grads = [torch.ones(3), None, torch.ones(2, dtype=torch.float16), torch.ones(0), torch.ones(2, dtype=torch.float64)]
    scale_(grads, torch.tensor(0.5))
    assert grads[0].tolist() == [0.5] * 3 and grads[2].tolist() == [0.5] * 2 and grads[4].tolist() == [0.5] * 2
    assert grads[2].dtype == torch.float16


# --------------------------------------------------------------------------------------
# value clipping
# --------------------------------------------------------------------------------------


@PROPERTY
@given(grads=tensor_lists(), log_value=st.floats(-6, 6), scale_exp=st.one_of(st.none(), st.integers(-4, 16)))
def test_value_clip_bounds_every_element(grads, log_value, scale_exp):
    clip_value = 10.0**log_value
    scale = None if scale_exp is None else torch.tensor(2.0**scale_exp)
    bound = clip_value * (1.0 if scale is None else scale.item())
    bound32 = torch.tensor(bound, dtype=torch.float32).item()
    before = [g.clone() for g in grads]
    clip_by_value_(grads, clip_value, scale=scale)
    for a, b in zip(before, grads):
        assert b.abs().max().item() <= bound32, "an element exceeds the bound"
        inside = a.abs() <= bound32
        assert torch.equal(b[inside], a[inside]), "an element within the bound changed"
        assert torch.equal(b[~inside], torch.sign(a[~inside]) * bound32), "an element was not clamped to the bound"


def test_value_clip_skips_nonfinite_steps_and_fp16():
    grads = [torch.tensor([5.0, math.inf, -math.inf]), torch.tensor([math.nan, -7.0])]
    clip_by_value_(grads, 1.0, finite=torch.tensor(False))
    assert grads[0][1].item() == math.inf and grads[1][1].item() == -7.0, "a non-finite step must stay as it is"
    clip_by_value_(grads, 1.0, finite=torch.tensor(True))
    assert grads[0].tolist() == [1.0, 1.0, -1.0]
    half = [torch.tensor([3e4, -6e4, 1.0], dtype=torch.float16)]
    clip_by_value_(half, 1e5, scale=torch.tensor(65536.0))  # bound far above fp16's range: untouched
    assert half[0].tolist() == [30000.0, -60000.0, 1.0]
    clip_by_value_(half, 2.0)
    assert half[0].tolist() == [2.0, -2.0, 1.0]


# --------------------------------------------------------------------------------------
# AGC
# --------------------------------------------------------------------------------------


def unit_norms(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape(1)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


@st.composite
def agc_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    layer_shapes = draw(
        st.lists(
            st.one_of(
                st.tuples(st.integers(1, 6)),  # bias / gain
                st.tuples(st.integers(1, 6), st.integers(1, 6)),  # linear
                st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # conv
            ),
            min_size=1,
            max_size=5,
        )
    )
    weights, grads = [], []
    for shape in layer_shapes:
        w = torch.randn(shape, generator=gen) * 10.0 ** draw(st.floats(-4, 1))
        if draw(st.integers(0, 5)) == 0:
            w.zero_()  # a zero-initialised unit: the eps floor applies
        weights.append(w)
        grads.append(torch.randn(shape, generator=gen) * 10.0 ** draw(st.floats(-5, 3)))
    clipping = 10.0 ** draw(st.floats(-3, 0))
    eps = 10.0 ** draw(st.floats(-4, -1))
    exclude = draw(st.lists(st.integers(0, len(layer_shapes) - 1), max_size=2, unique=True))
    return weights, grads, clipping, eps, exclude


@PROPERTY
@given(case=agc_cases())
def test_agc_bounds_every_units_ratio(case):
    weights, grads, clipping, eps, exclude = case
    pset = params_with_grads(grads, weights)
    before = [g.clone() for g in grads]
    agc = UnitwiseClip(pset, clipping=clipping, eps=eps, exclude=[f"^p{i}$" for i in exclude])
    snap = take_snapshot(pset)
    result = agc.clip_(snap.norms, finite=snap.all_finite)
    clipped = 0
    for i, (w, g0, p) in enumerate(zip(weights, before, pset.params)):
        g1 = p.grad
        if i in exclude:
            assert torch.equal(g1, g0), f"excluded p{i} was changed"
            continue
        limit = clipping * unit_norms(w).clamp_min(eps)
        n0, n1 = unit_norms(g0), unit_norms(g1)
        assert (n1 <= limit * (1 + 1e-5)).all(), f"p{i}: unit ratio above the clipping factor"
        over = n0 > limit
        clipped += int(over.sum())
        # units within the bound are untouched; clipped ones land on the bound, same direction
        g0u = g0.double().reshape(len(n0), -1)
        g1u = g1.double().reshape(len(n0), -1)
        assert torch.equal(g1u[~over], g0u[~over]), f"p{i}: a unit within the bound changed"
        if over.any():
            torch.testing.assert_close(n1[over], limit[over], rtol=1e-5, atol=0.0)
            coef = (n1[over] / n0[over]).unsqueeze(1)
            torch.testing.assert_close(g1u[over], g0u[over] * coef, rtol=1e-5, atol=1e-30)
    assert int(result.clipped_units) == clipped
    assert result.units == sum(1 if w.dim() <= 1 else w.shape[0] for i, w in enumerate(weights) if i not in exclude)


def test_agc_with_loss_scale_and_nonfinite_gradients():
    w = torch.ones(2, 4)  # row norm 2
    g = torch.full((2, 4), 3.0)  # row norm 6
    scale = 1024.0
    pset = params_with_grads([g * scale], [w])
    agc = UnitwiseClip(pset, clipping=0.5)
    snap = take_snapshot(pset, scale=scale)
    agc.clip_(snap.norms, inv_scale=snap.scale.reciprocal(), finite=snap.all_finite)
    # the scaled gradient is scaled by the right coefficient: unscaled row norm 0.5 * 2 = 1
    torch.testing.assert_close(unit_norms(pset.params[0].grad / scale).float(), torch.ones(2), rtol=1e-6, atol=0)
    bad = torch.full((2, 4), 3.0)
    bad[0, 0] = math.nan
    pset = params_with_grads([bad], [w])
    snap = take_snapshot(pset)
    result = UnitwiseClip(pset, clipping=0.5).clip_(snap.norms, finite=snap.all_finite)
    assert pset.params[0].grad[1].tolist() == [3.0] * 4 and int(result.clipped_units) == 0


def test_agc_rejects_bad_arguments():
    pset = params_with_grads([torch.ones(2, 2)])
    with pytest.raises(ValueError, match="agc_clipping"):
        UnitwiseClip(pset, clipping=0.0)
    with pytest.raises(ValueError, match="agc_eps"):
        UnitwiseClip(pset, eps=-1.0)
    with pytest.raises(ValueError, match="agc_exclude"):
        UnitwiseClip(pset, exclude=["("])
    with pytest.raises(ValueError, match="agc_exclude"):
        UnitwiseClip(pset, exclude="head")  # a bare string is not a list of patterns


# --------------------------------------------------------------------------------------
# learned thresholds
# --------------------------------------------------------------------------------------

norm_streams = st.lists(
    st.one_of(
        st.floats(1e-4, 1e4),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ),
    min_size=1,
    max_size=40,
)


def _expected_bounds(
    value: float,
    warm: bool,
    max_norm: float | None,
    min_norm: float | None,
    warmup_max_norm: float | None,
    early: float = math.inf,
) -> float:
    """The documented threshold: during warm-up ``early`` (warmup_factor x median so far) for ``value``."""
    if warm:
        value = early
    if min_norm is not None:
        value = max(value, min_norm)
    if max_norm is not None:
        value = min(value, max_norm)
    if warm and warmup_max_norm is not None:
        value = min(value, warmup_max_norm)
    return value


def _early(history: list[float], factor: float | None) -> float:
    """``factor`` times the median of ``history`` (float32, as the rule computes it); inf without either."""
    median = np.float32(np.median(history)) if history else np.float32(0.0)
    if factor is None or factor == math.inf or median <= 0:
        return math.inf
    return float(np.float32(median * np.float32(factor)))


@PROPERTY
@given(
    norms=norm_streams,
    percentile=st.floats(0.5, 100.0),
    window=st.integers(1, 8),
    warmup=st.integers(0, 4),
    max_norm=st.one_of(st.none(), st.floats(1.0, 1e3)),
    min_norm=st.one_of(st.none(), st.floats(1e-3, 1.0)),
    warm_norm=st.one_of(st.none(), st.floats(1e-2, 1e2)),
    factor=st.one_of(st.none(), st.floats(1.0, 20.0)),
    rejected=st.sets(st.integers(0, 39), max_size=5),
)
def test_percentile_threshold_matches_numpy(
    norms, percentile, window, warmup, max_norm, min_norm, warm_norm, factor, rejected
):
    rule = PercentileThreshold(
        percentile=percentile,
        window=window,
        warmup_steps=warmup,
        warmup_max_norm=warm_norm,
        warmup_factor=factor,
        max_norm=max_norm,
        min_norm=min_norm,
    )
    history: list[float] = []
    for i, x in enumerate(norms):
        got = rule.threshold().item()
        raw = np.percentile(history[-window:], percentile) if history else math.inf
        early = _early(history[-window:], factor)
        want = _expected_bounds(float(raw), len(history) < warmup, max_norm, min_norm, warm_norm, early)
        want = float(np.float32(want))
        if math.isinf(want):
            assert math.isinf(got), f"step {i}: {got} != inf"
        else:
            assert got == pytest.approx(want, rel=4e-6), f"step {i}: history {history[-window:]}"
        accept = i not in rejected
        rule.observe(torch.tensor(x), torch.tensor(accept))
        if accept and math.isfinite(x):
            history.append(float(np.float32(x)))
    assert rule.seen.item() == len(history)
    assert torch.isfinite(rule.buffer[: min(len(history), window)]).all()


@PROPERTY
@given(
    norms=norm_streams,
    z=st.floats(0.5, 5.0),
    decay=st.floats(0.5, 0.99),
    warmup=st.integers(0, 4),
    max_norm=st.one_of(st.none(), st.floats(1.0, 1e3)),
    min_norm=st.one_of(st.none(), st.floats(1e-3, 1.0)),
    warm_norm=st.one_of(st.none(), st.floats(1e-2, 1e2)),
    factor=st.one_of(st.none(), st.floats(1.0, 20.0)),
)
def test_zscore_threshold_follows_the_documented_rule(norms, z, decay, warmup, max_norm, min_norm, warm_norm, factor):
    rule = ZScoreThreshold(
        z_threshold=z,
        ema_decay=decay,
        warmup_steps=warmup,
        warmup_max_norm=warm_norm,
        warmup_factor=factor,
        max_norm=max_norm,
        min_norm=min_norm,
    )
    reference = ZScoreReference(z, decay, warmup, max_norm, min_norm, warm_norm, factor)
    for i, x in enumerate(norms):
        got = rule.threshold().item()
        want = reference.threshold()
        if math.isinf(want):
            assert math.isinf(got), f"step {i}: {got} != inf"
        else:
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6 * abs(reference.mean)), f"step {i}"
        rule.observe(torch.tensor(x), torch.tensor(True))
        reference.observe(x)
        assert torch.isfinite(rule.mean) and torch.isfinite(rule.var)
    assert rule.seen.item() == reference.n


class ZScoreReference:
    """The rule documented in ``ZScoreThreshold``, written out in float64 Python."""

    def __init__(self, z, decay, warmup=0, max_norm=None, min_norm=None, warmup_max_norm=None, warmup_factor=None):
        self.z, self.decay, self.warmup, self.factor = z, decay, warmup, warmup_factor
        self.bounds = dict(max_norm=max_norm, min_norm=min_norm, warmup_max_norm=warmup_max_norm)
        self.k = max(warmup, 2)
        self.n, self.mean, self.var, self.start = 0, 0.0, 0.0, []

    def _robust(self) -> tuple[float, float]:
        center = float(np.median(self.start))
        return center, 1.4826 * float(np.median(np.abs(np.array(self.start) - center)))

    def bound(self) -> float:
        """The learned value with its floor, no ceiling: what a norm is winsorized at."""
        raw = math.inf if self.n < self.k else self.mean + self.z * math.sqrt(self.var)
        return _expected_bounds(raw, False, None, self.bounds["min_norm"], None)

    def threshold(self) -> float:
        warm = self.n < self.warmup
        early = _early(self.start, self.factor) if warm else math.inf
        return _expected_bounds(self.bound(), warm, **self.bounds, early=early)

    def observe(self, x: float) -> None:
        if not math.isfinite(x):
            return
        x = float(np.float32(x))
        if self.n < self.k:
            self.start.append(x)
            self.n += 1
            if self.n == self.k:
                self.mean, spread = self._robust()
                self.var = spread * spread
            return
        entered = min(x, self.bound())
        self.n += 1
        a = max(1.0 / self.n, 1.0 - self.decay)
        d = entered - self.mean
        self.mean += a * d
        self.var = (1.0 - a) * (self.var + a * d * d)


@pytest.mark.parametrize("rule_cls", [PercentileThreshold, ZScoreThreshold])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_step_does_not_poison_the_threshold(rule_cls, bad):
    """ZClip 1.0.0 feeds a NaN norm into its EMA and never clips again; here the NaN is refused."""
    rule = rule_cls(warmup_steps=5)
    gen = torch.Generator().manual_seed(0)
    for x in 1.0 + 0.1 * torch.rand(30, generator=gen):
        rule.observe(x, torch.tensor(True))
    before = rule.threshold()
    state = rule.state_dict()
    rule.observe(torch.tensor(bad), torch.tensor(True))  # accept=True on purpose
    assert torch.equal(rule.threshold(), before)
    for name, t in rule.state_dict().items():
        assert torch.equal(t, state[name]), f"{name} changed on a non-finite step"
    # a 1000x spike is still clipped to the learned threshold
    spike = torch.tensor(1000.0)
    grads = [torch.full((4,), 500.0)]  # norm 1000
    coef = clip_by_norm_(grads, spike, rule.threshold())
    assert norm64(grads) == pytest.approx(before.item(), rel=1e-6)
    assert coef.item() < 2e-3


@pytest.mark.parametrize("rule_cls", [PercentileThreshold, ZScoreThreshold])
def test_a_host_hint_of_seen_changes_nothing(rule_cls):
    plain, hinted = rule_cls(warmup_steps=4), rule_cls(warmup_steps=4)
    stream = (torch.rand(40, generator=torch.Generator().manual_seed(3)) * 5).tolist()
    stream[10] = math.nan
    for i, x in enumerate(stream):
        assert torch.equal(plain.threshold(), hinted.threshold()), f"step {i}"
        plain.observe(torch.tensor(x), torch.tensor(True))
        hinted.observe(torch.tensor(x), torch.tensor(True))
        if i % 7 == 0:
            hinted.note_seen(int(hinted.seen))
    assert hinted.seen_at_least >= 30
    for name, t in plain.state_dict().items():
        assert torch.equal(t, hinted.state_dict()[name]), name


def test_zscore_refuses_an_update_that_would_overflow():
    rule = ZScoreThreshold()
    rule.observe(torch.tensor(1.0), torch.tensor(True))
    rule.observe(torch.tensor(3e38), torch.tensor(True))  # (x - mean)^2 overflows float32
    assert torch.isfinite(rule.var) and rule.seen.item() == 1


@pytest.mark.parametrize("rule_cls", [PercentileThreshold, ZScoreThreshold])
def test_state_dict_round_trip_continues_bit_for_bit(rule_cls):
    kwargs = dict(warmup_steps=3, max_norm=50.0)
    a = rule_cls(**kwargs)
    gen = torch.Generator().manual_seed(1)
    stream = (torch.rand(60, generator=gen) * 10).tolist()
    for x in stream[:25]:
        a.observe(torch.tensor(x), torch.tensor(True))
    saved = a.state_dict()
    assert all(t.device.type == "cpu" for t in saved.values())
    b = rule_cls(**kwargs)
    b.load_state_dict(saved)
    for x in stream[25:]:
        ta, tb = a.threshold(), b.threshold()
        assert torch.equal(ta, tb)
        a.observe(torch.tensor(x), torch.tensor(True))
        b.observe(torch.tensor(x), torch.tensor(True))


def test_zscore_resumes_with_another_warmup_only_after_the_start():
    short = ZScoreThreshold(warmup_steps=3)
    for x in (1.0, 2.0):
        short.observe(torch.tensor(x), torch.tensor(True))
    with pytest.raises(ValueError, match="warmup_steps"):
        ZScoreThreshold(warmup_steps=5).load_state_dict(short.state_dict())
    for x in (3.0, 4.0, 5.0, 6.0):
        short.observe(torch.tensor(x), torch.tensor(True))
    longer = ZScoreThreshold(warmup_steps=5)
    longer.load_state_dict(short.state_dict())
    assert torch.equal(longer.threshold(), short.threshold())


def test_load_state_dict_rejects_another_window():
    saved = PercentileThreshold(window=10).state_dict()
    with pytest.raises(ValueError, match="buffer"):
        PercentileThreshold(window=20).load_state_dict(saved)
    with pytest.raises(ValueError, match="mean"):
        ZScoreThreshold().load_state_dict({"seen": torch.tensor(0)})


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: PercentileThreshold(percentile=0.0), "percentile"),
        (lambda: PercentileThreshold(percentile=100.5), "percentile"),
        (lambda: PercentileThreshold(window=0), "window"),
        (lambda: PercentileThreshold(window=2.5), "window"),
        (lambda: PercentileThreshold(max_norm=-1.0), "max_norm"),
        (lambda: PercentileThreshold(min_norm=math.nan), "min_norm"),
        (lambda: PercentileThreshold(min_norm=2.0, max_norm=1.0), "min_norm"),
        (lambda: PercentileThreshold(warmup_steps=-1), "warmup_steps"),
        (lambda: ZScoreThreshold(warmup_max_norm=0.0), "warmup_max_norm"),
        (lambda: ZScoreThreshold(z_threshold=0.0), "z_threshold"),
        (lambda: ZScoreThreshold(ema_decay=1.0), "ema_decay"),
        (lambda: ZScoreThreshold(ema_decay=True), "ema_decay"),
    ],
)
def test_bad_arguments_name_themselves(factory, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        factory()


def test_percentile_100_is_the_recent_maximum_and_the_window_forgets():
    rule = PercentileThreshold(percentile=100.0, window=3)
    for x in (9.0, 1.0, 2.0, 3.0):
        rule.observe(torch.tensor(x), torch.tensor(True))
    assert rule.threshold().item() == 3.0  # 9.0 left the window


# --------------------------------------------------------------------------------------
# no host synchronisation
# --------------------------------------------------------------------------------------


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (``.item()``, ``bool()``, ...)."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNC_OPS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_per_step_math_never_reads_a_device_value():
    grads = [torch.randn(4, 3), torch.randn(3)]
    weights = [torch.randn(4, 3), torch.randn(3)]
    pset = params_with_grads(grads, weights)
    rules = [PercentileThreshold(warmup_steps=2, max_norm=10.0, min_norm=0.1), ZScoreThreshold(warmup_steps=2)]
    agc = UnitwiseClip(pset, clipping=0.05)
    with HostSyncCounter() as counter:
        for _ in range(5):
            snap = take_snapshot(pset, scale=torch.tensor(2.0))
            for rule in rules:
                thr = rule.threshold()
                clip_by_norm_(grads, snap.total_norm, thr)
                rule.observe(snap.total_norm, snap.all_finite)
            clip_by_value_(grads, 0.5, scale=snap.scale, finite=snap.all_finite)
            agc.clip_(snap.norms, inv_scale=snap.scale.reciprocal(), finite=snap.all_finite)
    assert counter.syncs == []


# --------------------------------------------------------------------------------------
# the start-up work ends when the start-up does, with or without a logger
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_class", [ZScoreThreshold, PercentileThreshold])
@pytest.mark.parametrize("free", [True, False], ids=["cpu-reads-free", "device-reads-sync"])
def test_the_start_up_work_stops_once_it_is_over_without_anyone_logging(monkeypatch, rule_class, free):
    from lightning_gradguard.clipping import thresholds

    monkeypatch.setattr(thresholds, "_reads_free", lambda t: free)
    rule = rule_class(warmup_steps=5)
    length = rule.start_length()
    percentiles = []
    original = thresholds.filled_percentile
    monkeypatch.setattr(thresholds, "filled_percentile", lambda *a: percentiles.append(1) or original(*a))
    syncs_per_step = []
    for step in range(40):
        with HostSyncCounter() as counter:
            rule.bound()
            rule.observe(torch.tensor(1.0 + 0.01 * step), torch.tensor(True))
        syncs_per_step.append(len(counter.syncs))
        if step == length:  # past the start-up: no more median work
            percentiles.clear()
    assert rule.seen_at_least >= length
    if rule_class is ZScoreThreshold:
        assert percentiles == []
    if free:
        assert sum(syncs_per_step) == 0
    else:  # one read where the start-up could first be over, none after it was seen to be
        assert sum(syncs_per_step) == 1 and syncs_per_step[length - 1] == 1


def test_reads_of_the_start_count_double_their_spacing_while_steps_are_rejected(monkeypatch):
    from lightning_gradguard.clipping import thresholds

    monkeypatch.setattr(thresholds, "_reads_free", lambda t: False)
    rule = ZScoreThreshold(warmup_steps=4)
    reads = []
    for step in range(64):
        with HostSyncCounter() as counter:
            rule.observe(torch.tensor(1.0), torch.tensor(step >= 20))  # the first 20 norms are not accepted
        if counter.syncs:
            reads.append(step)
    assert reads == [3, 7, 15, 31]  # 4, 8, 16, 32 observations; seen reaches 4 at observation 24
    assert rule.seen_at_least >= 4


@pytest.mark.parametrize("seed", [0, 1])
def test_zscore_rule_and_coefficient_agree_in_numpy_and_torch(seed):
    """On the CPU the steady z-score update and the coefficient run in numpy: the float32 numbers of torch."""
    gen = torch.Generator().manual_seed(seed)
    rules = {}
    for name, backend in (("numpy", _arrays.HOST), ("torch", _arrays.DEVICE)):
        with _arrays.forced(backend):
            rule = rules[name] = ZScoreThreshold(z_threshold=2.0, warmup_steps=3, min_norm=0.01, max_norm=50.0)
            coefs = []
            for step in range(120):
                norm = torch.rand((), generator=gen) * 10.0 ** torch.randint(-3, 3, (), generator=gen)
                if step % 17 == 5:
                    norm = torch.tensor([math.nan, math.inf, 0.0][step % 3])
                threshold = rule.threshold()
                coefs.append(clip_coefficient(norm, threshold))
                rule.observe(norm, torch.tensor(step % 11 != 3))
            rules[name] = (rule, torch.stack(coefs))
        gen = torch.Generator().manual_seed(seed)  # the same norms for the other backend
    (a, coef_a), (b, coef_b) = rules["numpy"], rules["torch"]
    assert a.seen_at_least >= a.start_size  # the steady update ran
    assert coef_a.dtype == coef_b.dtype == torch.float32 and (coef_a < 1).any() and (coef_a == 1).any()
    # float32 both, to the last bits: torch's CPU sqrt is not always correctly rounded (1 ulp), numpy's is
    torch.testing.assert_close(coef_a, coef_b, rtol=1e-6, atol=0)
    assert torch.equal(a.seen, b.seen)
    for key in ("mean", "var"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-6, atol=0)
    assert a.seen.dtype == torch.int64 and a.mean.dtype == torch.float32
