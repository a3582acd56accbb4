"""Gradient clipping math: coefficients, in-place clipping and learned thresholds.

Plain PyTorch, unit-testable without a ``Trainer``. Three rules hold throughout:

- everything stays on the device: thresholds, coefficients and statistics are 0-dim
  tensors, decisions are ``torch.where``/``clamp`` rather than Python ``if`` on a device
  value, so nothing here waits for the accelerator;
- gradients are modified in place with ``torch._foreach_*`` kernels, grouped by device
  and dtype, on the local shard of DTensor (FSDP2) gradients;
- a step whose gradient norm is not finite changes neither the gradients nor the
  statistics (``accept`` masks), so one NaN cannot poison a learned threshold.

Building blocks:

- :func:`clip_coefficient`, :func:`scale_`, :func:`clip_by_norm_`: total-norm clipping
  with a device-side coefficient (the direction of the gradient is kept);
- :func:`clip_by_value_`: element-wise clipping to ``[-bound, bound]``;
- :class:`PercentileThreshold` (AutoClip, Seetharaman et al. 2020) and
  :class:`ZScoreThreshold` (after ZClip, 2025): thresholds learned from the run's own
  history of total norms, with warm-up, floor and ceiling, and ``state_dict`` support;
- :class:`UnitwiseClip`: adaptive gradient clipping (AGC, Brock et al. 2021, NFNets),
  each unit's gradient norm bounded relative to its weight norm.

Example:
    >>> import torch
    >>> from lightning_gradguard.policies import PercentileThreshold, clip_by_norm_
    >>> grads = [torch.full((3,), 4.0), torch.full((2,), 3.0)]
    >>> rule = PercentileThreshold(percentile=50.0, window=8, warmup_steps=2)
    >>> for past in (1.0, 2.0, 3.0):
    ...     rule.observe(torch.tensor(past), accept=torch.tensor(True))
    >>> rule.threshold()
    tensor(2.)
    >>> norm = torch.linalg.vector_norm(torch.cat(grads))
    >>> coef = clip_by_norm_(grads, norm, rule.threshold())
    >>> round(float(torch.linalg.vector_norm(torch.cat(grads))), 4)
    2.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.stats import DTensor, ParamSet, local_tensor, reduce_norms, tensor_stats

__all__ = [
    "MODES",
    "LearnedThreshold",
    "PercentileThreshold",
    "UnitwiseClip",
    "ZScoreThreshold",
    "check_number",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_coefficient",
    "coalesce_sparse_grads_",
    "filled_percentile",
    "scale_",
]

#: Allowed values of ``AdaptiveClipper(mode=...)``.
MODES = ("norm", "value", "percentile", "zscore", "agc")

_INF = math.inf


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
    allow_none: bool = False,
    integer: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the range.

    Args:
        name: the argument's name, quoted in the message.
        value: what was given.
        low, high: the bounds (``None``: unbounded on that side).
        low_inclusive, high_inclusive: whether each bound itself is allowed.
        allow_none: whether ``None`` is allowed.
        integer: require an ``int``.

    Example:
        >>> check_number("percentile", 150.0, low=0.0, high=100.0)
        Traceback (most recent call last):
        ...
        ValueError: `percentile` must be a finite number in (0.0, 100.0], got 150.0.
    """
    if value is None and allow_none:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if ok:
        return
    what = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        what += f" in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    elif low is not None:
        what += f" {'>=' if low_inclusive else '>'} {low}"
    elif high is not None:
        what += f" {'<=' if high_inclusive else '<'} {high}"
    if allow_none:
        what += " or None"
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")


# --------------------------------------------------------------------------------------
# Total-norm and value clipping
# --------------------------------------------------------------------------------------


def clip_coefficient(norm: Tensor, threshold: Tensor | float) -> Tensor:
    """The factor that brings a gradient of total norm ``norm`` down to ``threshold``.

    ``min(1, threshold / norm)``, computed on the device. It is exactly 1 when the norm is
    within the threshold, when the norm is 0, and when the norm is NaN or infinite (a
    non-finite gradient is left alone: there is no meaningful way to rescale it). An
    infinite threshold means "no clipping".

    Args:
        norm: 0-dim tensor, the total L2 norm (unscaled).
        threshold: the largest norm allowed (tensor or float, >= 0).

    Returns:
        A 0-dim float32 tensor in ``[0, 1]`` on ``norm``'s device.

    Example:
        >>> clip_coefficient(torch.tensor(10.0), 2.5)
        tensor(0.2500)
        >>> clip_coefficient(torch.tensor(float("nan")), 2.5)
        tensor(1.)
    """
    norm = norm.to(torch.float32)
    if isinstance(threshold, Tensor):
        threshold = threshold.to(device=norm.device, dtype=torch.float32)
    ratio = threshold / norm.clamp_min(torch.finfo(torch.float32).tiny)  # a float stays a scalar: no copy
    coef = ratio.clamp(max=1.0)
    keep = torch.isfinite(norm) & (norm > 0) & ~torch.isnan(coef)
    return torch.where(keep, coef, torch.ones_like(coef))


def _buckets(tensors: Iterable[Tensor | None]) -> dict[tuple[torch.device, torch.dtype, bool], list[Tensor]]:
    """Local tensors grouped by (device, dtype, dense); ``None`` dropped. A plain per-tensor loop:
    it runs every step, so it does as little as possible per tensor. Sparse tensors get
    groups of their own (``dense`` False): foreach kernels are for strided tensors."""
    out: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor:  # DTensor (or another subclass): work on the local shard
            t = local_tensor(t)
        key = (t.device, t.dtype, t.layout is torch.strided)
        group = out.get(key)
        if group is None:
            out[key] = [t]
        else:
            group.append(t)
    return out


def _sparse_elements(t: Tensor) -> Tensor:
    """The stored values of a coalesced sparse COO tensor, to be changed in place.

    Raises:
        ValueError: for an uncoalesced tensor (an element-wise operation on duplicate
            entries would be wrong) or a layout other than COO.
    """
    if t.layout is not torch.sparse_coo or not t.is_coalesced():
        raise ValueError(
            f"element-wise clipping needs dense or coalesced sparse COO tensors, got layout {t.layout} "
            f"(coalesced: {t.layout is torch.sparse_coo and t.is_coalesced()}); use coalesce_sparse_grads_() first."
        )
    return t._values()


def coalesce_sparse_grads_(params: Iterable[Tensor]) -> None:
    """Replace every uncoalesced sparse COO ``.grad`` of ``params`` by its coalesced equivalent.

    The same gradient (duplicate indices summed), so optimizers see no difference; it lets
    element-wise and unit-wise clipping act on each entry once.
    """
    for p in params:
        g = p.grad
        if g is not None and g.layout is torch.sparse_coo and not g.is_coalesced():
            p.grad = g.coalesce()


def scale_(tensors: Iterable[Tensor | None], coef: Tensor) -> None:
    """Multiply every tensor in place by the 0-dim device tensor ``coef``.

    One ``torch._foreach_mul_`` per (device, dtype) group of dense tensors; sparse
    tensors are scaled one by one (a coalesced COO tensor through its values, so it stays
    coalesced); ``None`` entries are skipped and DTensors are scaled through their local
    shard. No host synchronisation.

    Example:
        >>> g = [torch.ones(2), torch.ones(3)]
        >>> scale_(g, torch.tensor(0.5))
        >>> g[1]
        tensor([0.5000, 0.5000, 0.5000])
    """
    with torch.no_grad():
        for (device, _, dense), group in _buckets(tensors).items():
            c = coef.to(device=device, non_blocking=True)
            if dense:
                torch._foreach_mul_(group, c)
                continue
            for t in group:
                if t.layout is torch.sparse_coo and t.is_coalesced():
                    t._values().mul_(c)
                else:
                    t.mul_(c)


def clip_by_norm_(tensors: Sequence[Tensor | None], norm: Tensor, threshold: Tensor | float) -> Tensor:
    """Scale ``tensors`` in place so that their total norm is at most ``threshold``.

    ``norm`` is the total norm of ``tensors`` as already measured (unscaled; when the
    tensors still carry a loss scale the same coefficient is right, because it is a
    ratio). The direction is unchanged; a non-finite ``norm`` leaves the tensors alone.

    Returns:
        The coefficient applied (0-dim device tensor); the norm after clipping is
        ``norm * coef``.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> clip_by_norm_(g, torch.tensor(5.0), 1.0)
        tensor(0.2000)
        >>> g[0]
        tensor([0.6000, 0.8000])
    """
    coef = clip_coefficient(norm, threshold)
    scale_(tensors, coef)
    return coef


def clip_by_value_(
    tensors: Iterable[Tensor | None],
    clip_value: float,
    *,
    scale: Tensor | None = None,
    finite: Tensor | None = None,
) -> None:
    """Clamp every element to ``[-clip_value, clip_value]`` in place.

    Args:
        tensors: the gradients (``None`` skipped; DTensors through their local shard;
            sparse COO tensors must be coalesced, see :func:`coalesce_sparse_grads_`).
        clip_value: the bound on the unscaled gradient, > 0.
        scale: a loss scale still applied to the tensors (the bound becomes
            ``clip_value * scale``), or ``None``.
        finite: 0-dim bool device tensor; where ``False`` the tensors are left alone (a
            clamp would turn an Inf into a finite value and hide an overflow).

    Example:
        >>> g = [torch.tensor([-3.0, 0.5, 2.0])]
        >>> clip_by_value_(g, 1.0)
        >>> g[0]
        tensor([-1.0000,  0.5000,  1.0000])
    """
    buckets = _buckets(tensors)
    if not buckets:
        return
    for (_, dtype, _), group in buckets.items():
        if dtype.is_complex:
            raise ValueError(
                f"value clipping is not defined for complex tensors (got {dtype}, shape {tuple(group[0].shape)}): "
                "clip by norm instead."
            )
    ref = next(iter(buckets.values()))[0]
    bound = torch.full((), float(clip_value), dtype=torch.float32, device=ref.device)
    if scale is not None:
        bound = bound * scale.to(bound.device)
    if finite is not None:
        bound = torch.where(finite.to(bound.device), bound, torch.full_like(bound, _INF))
    with torch.no_grad():
        for (device, dtype, dense), group in buckets.items():
            hi = bound.to(device=device, dtype=dtype)  # beyond fp16's range it becomes +inf: no bound
            lo = -hi
            if not dense:
                group = [_sparse_elements(t) for t in group]
            torch._foreach_clamp_max_(group, [hi] * len(group))
            torch._foreach_clamp_min_(group, [lo] * len(group))


# --------------------------------------------------------------------------------------
# Learned thresholds
# --------------------------------------------------------------------------------------
def filled_percentile(buffer: Tensor, count: Tensor, percentile: float) -> Tensor:
    """The ``percentile``-th percentile of the ``count`` finite entries of ``buffer``.

    Empty slots hold ``+inf``; linear interpolation between order statistics, as
    ``numpy.percentile`` does by default. ``inf`` when ``count`` is 0. No host sync.

    Example:
        >>> filled_percentile(torch.tensor([3.0, 1.0, math.inf]), torch.tensor(2), 50.0)
        tensor(2.)
    """
    ordered = torch.sort(buffer).values  # empty (inf) slots sort last
    # rank = (count - 1) * percentile / 100 in double precision where the device has it: a
    # rounding error in the fraction is multiplied by the gap between neighbours
    exact = torch.float64 if buffer.device.type in ("cpu", "cuda") else torch.float32
    scaled = (count.clamp(min=1) - 1).to(exact) * percentile
    lo = torch.floor(scaled / 100.0)
    frac = (scaled - lo * 100.0) / 100.0
    below = ordered.gather(0, lo.long().view(1))
    above = ordered.gather(0, (lo + (frac > 0).to(lo.dtype)).long().view(1))
    # at an integer rank below == above and the weight is 0; both are finite when count >= 1
    value = (below + frac.to(torch.float32) * (above - below)).squeeze(0)
    return torch.where(count > 0, value, torch.full_like(value, _INF))


class LearnedThreshold:
    """A clipping threshold learned from the total norms of previous steps.

    Subclasses keep a statistic of past norms (:meth:`raw`) and decide what enters it
    (:meth:`observe`). This class adds what every learned rule needs:

    - **warm-up**: while fewer than ``warmup_steps`` norms were observed, the threshold is
      ``warmup_max_norm`` (a fixed ceiling), or infinite (no clipping) when that is ``None``;
      the statistics learn from the raw norms meanwhile;
    - **floor**: the threshold never goes below ``min_norm``;
    - **ceiling**: the threshold never goes above ``max_norm``.

    So during warm-up ``threshold = min(warmup_max_norm, max_norm)`` and afterwards
    ``threshold = min(max(raw, min_norm), max_norm)`` (a ``None`` bound is left out).

    The state is a few tensors on one device (created on ``device``, moved by
    :meth:`to`); :meth:`state_dict` returns CPU copies and :meth:`load_state_dict` copies
    back into the existing tensors, so a resumed run continues bit for bit.

    Args:
        warmup_steps: observed norms needed before the learned value is used, >= 0.
        warmup_max_norm: the threshold during warm-up, or ``None`` (no clipping then).
        max_norm: absolute ceiling, at all times, or ``None``.
        min_norm: floor, or ``None``.
        device: where the state lives.
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 0,
        warmup_max_norm: float | None = None,
        max_norm: float | None = None,
        min_norm: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_number("warmup_steps", warmup_steps, low=0, low_inclusive=True, integer=True)
        check_number("warmup_max_norm", warmup_max_norm, low=0.0, allow_none=True)
        check_number("max_norm", max_norm, low=0.0, allow_none=True)
        check_number("min_norm", min_norm, low=0.0, allow_none=True)
        if max_norm is not None and min_norm is not None and min_norm > max_norm:
            raise ValueError(f"`min_norm` ({min_norm!r}) must not exceed `max_norm` ({max_norm!r}).")
        self.warmup_steps = warmup_steps
        self.warmup_max_norm = warmup_max_norm
        self.max_norm = max_norm
        self.min_norm = min_norm
        device = torch.device(device) if device is not None else torch.device("cpu")
        #: number of norms observed so far (int64, 0-dim)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        #: a lower bound of ``seen`` known on the host without a sync (see :meth:`note_seen`)
        self.seen_at_least = 0

    # ---------------------------------------------------------------- to override

    def raw(self) -> Tensor:
        """The statistic of past norms (0-dim float32); ``inf`` when nothing was observed."""
        raise NotImplementedError

    def observe(self, norm: Tensor, accept: Tensor) -> None:
        """Record this step's total ``norm`` where ``accept`` (0-dim bool) is true.

        Call it after :meth:`threshold` was read for the step: the step's own norm is not
        part of the history that judges it. A non-finite ``norm`` never enters.

        Args:
            norm: the pre-clip total norm of the step (0-dim tensor).
            accept: whether the step may enter the statistics (e.g. not skipped).
        """
        raise NotImplementedError

    def _tensors(self) -> dict[str, Tensor]:
        return {"seen": self.seen}

    # ---------------------------------------------------------------- shared

    @property
    def device(self) -> torch.device:
        return self.seen.device

    def learned(self) -> Tensor:
        """The learned threshold with floor and ceiling, ignoring warm-up (0-dim float32)."""
        value = self.raw()
        if self.min_norm is not None:
            value = value.clamp(min=self.min_norm)
        if self.max_norm is not None:
            value = value.clamp(max=self.max_norm)
        return value

    def threshold(self) -> Tensor:
        """The threshold in force for the next step (0-dim float32 device tensor)."""
        value = self.learned()
        if self.warmup_steps:
            bounds = [b for b in (self.warmup_max_norm, self.max_norm) if b is not None]
            warm = torch.full_like(value, min(bounds, default=_INF))
            value = torch.where(self.in_warmup(), warm, value)
        return value

    def note_seen(self, seen: int) -> None:
        """Tell the rule the value of :attr:`seen`, read on the host anyway (e.g. when logging).

        Rules may then skip work that can no longer matter (the z-score start phase). It
        never changes a result.
        """
        self.seen_at_least = max(self.seen_at_least, int(seen))

    def in_warmup(self) -> Tensor:
        """0-dim bool device tensor: fewer than ``warmup_steps`` norms observed so far."""
        return self.seen < self.warmup_steps

    def to(self, device: torch.device | str) -> LearnedThreshold:
        """Move the state to ``device`` (in place); returns ``self``."""
        for name, t in self._tensors().items():
            setattr(self, name, t.to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        """The state as CPU tensors (one host copy; call it at checkpoint time only)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self._tensors().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy a :meth:`state_dict` back into the state tensors.

        Raises:
            ValueError: if an entry is missing or has another shape (e.g. another ``window``).
        """
        for name, t in self._tensors().items():
            if name not in state:
                raise ValueError(f"{type(self).__name__} state has no entry {name!r}; keys: {sorted(state)}.")
            value = torch.as_tensor(state[name])
            if value.shape != t.shape:
                raise ValueError(
                    f"{type(self).__name__} state entry {name!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(t.shape)}."
                )
            t.copy_(value.to(device=t.device, dtype=t.dtype))
        self.seen_at_least = int(torch.as_tensor(state["seen"]))


class PercentileThreshold(LearnedThreshold):
    """AutoClip: the ``percentile``-th percentile of the last ``window`` observed norms.

    Seetharaman et al. (2020), "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", clip each step to the p-th percentile of the run's own history
    of gradient norms (they recommend p = 10). Here the history is a ring buffer of the
    last ``window`` accepted pre-clip norms kept on the device; the percentile uses
    linear interpolation between order statistics (``numpy.percentile``'s default) over
    the filled part of the buffer. The step being clipped is not part of the history it
    is clipped by: its norm enters afterwards (if finite).

    Args:
        percentile: p in (0, 100]; 100 is the largest recent norm.
        window: ring-buffer size, >= 1.
        warmup_steps, warmup_max_norm, max_norm, min_norm, device: see :class:`LearnedThreshold`.

    Example:
        >>> rule = PercentileThreshold(percentile=50.0, window=3)
        >>> for x in (1.0, 5.0, 2.0, 4.0):  # the window keeps 5, 2, 4
        ...     rule.observe(torch.tensor(x), torch.tensor(True))
        >>> rule.threshold()
        tensor(4.)
    """

    def __init__(
        self,
        *,
        percentile: float = 10.0,
        window: int = 1000,
        warmup_steps: int = 0,
        warmup_max_norm: float | None = None,
        max_norm: float | None = None,
        min_norm: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_number("percentile", percentile, low=0.0, high=100.0)
        check_number("window", window, low=1, low_inclusive=True, integer=True)
        super().__init__(
            warmup_steps=warmup_steps,
            warmup_max_norm=warmup_max_norm,
            max_norm=max_norm,
            min_norm=min_norm,
            device=device,
        )
        self.percentile = float(percentile)
        self.window = window
        #: the last ``window`` accepted norms; ``inf`` marks an empty slot
        self.buffer = torch.full((window,), _INF, dtype=torch.float32, device=self.seen.device)

    def _tensors(self) -> dict[str, Tensor]:
        return {"seen": self.seen, "buffer": self.buffer}

    def raw(self) -> Tensor:
        return filled_percentile(self.buffer, self.seen.clamp(max=self.window), self.percentile)

    def observe(self, norm: Tensor, accept: Tensor) -> None:
        norm = norm.to(device=self.device, dtype=torch.float32).reshape(1)
        ok = (accept.to(self.device) & torch.isfinite(norm)).reshape(1)
        pos = (self.seen % self.window).view(1)
        old = self.buffer.gather(0, pos)
        self.buffer.scatter_(0, pos, torch.where(ok, norm, old))
        self.seen.add_(ok.squeeze(0).to(torch.int64))


class ZScoreThreshold(LearnedThreshold):
    """A running mean/std rule in the spirit of ZClip: clip norms above ``mean + z * std``.

    The exact rule, over the norms that enter the statistics (finite, accepted):

    1. **Start.** The first ``K = max(warmup_steps, 2)`` norms are kept as they are. Once
       ``K`` are in, the statistics start from their median and their scaled median
       absolute deviation: ``mean = median``, ``var = (1.4826 * MAD)**2``. Robust
       statistics, so that a spike among the very first steps (when nothing can judge
       it yet) does not inflate the threshold for the rest of the run.
    2. **Threshold.** After the start, the learned threshold is
       ``mean + z_threshold * sqrt(var)`` of the norms *before* the step, then floor,
       ceiling and warm-up as in :class:`LearnedThreshold` (before the start is complete
       there is no learned value: the threshold is the warm-up one, or infinite). A norm
       above the threshold is scaled down to exactly the threshold; unlike ZClip's
       default ``adaptive_scaling``, larger outliers are not pulled further down.
    3. **Update.** The norm *winsorized* at the learned threshold,
       ``x = min(norm, threshold)``, enters an exponentially weighted mean and variance::

           n = number of norms that entered so far, this one included
           a = max(1 / n, 1 - ema_decay)
           d = x - mean
           mean <- mean + a * d
           var  <- (1 - a) * (var + a * d**2)

       (counting the start as ``K`` entries, a running mean and variance at first,
       an exponential moving average with decay ``ema_decay`` after ``1/(1-ema_decay)``
       entries). Winsorizing keeps an outlier from inflating the mean and variance that
       judge the next one.

    Non-finite norms never enter, and an update that would make the mean or variance
    non-finite is refused.

    Args:
        z_threshold: z, the number of standard deviations tolerated, > 0.
        ema_decay: decay of the moving averages, in (0, 1) (ZClip's ``alpha``).
        warmup_steps, warmup_max_norm, max_norm, min_norm, device: see :class:`LearnedThreshold`.

    Example:
        >>> rule = ZScoreThreshold(z_threshold=2.0, warmup_steps=3)
        >>> for x in (1.0, 2.0, 100.0):  # median 2, MAD 1: the 100 does not count
        ...     rule.observe(torch.tensor(x), torch.tensor(True))
        >>> rule.threshold()
        tensor(4.9652)
    """

    #: consistency constant: 1.4826 * MAD estimates the standard deviation of a normal sample
    MAD_SCALE = 1.4826

    def __init__(
        self,
        *,
        z_threshold: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 0,
        warmup_max_norm: float | None = None,
        max_norm: float | None = None,
        min_norm: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_number("z_threshold", z_threshold, low=0.0)
        check_number("ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)
        super().__init__(
            warmup_steps=warmup_steps,
            warmup_max_norm=warmup_max_norm,
            max_norm=max_norm,
            min_norm=min_norm,
            device=device,
        )
        self.z_threshold = float(z_threshold)
        self.ema_decay = float(ema_decay)
        self.start_size = max(warmup_steps, 2)
        dev = self.seen.device
        self.mean = torch.zeros((), dtype=torch.float32, device=dev)
        self.var = torch.zeros((), dtype=torch.float32, device=dev)
        #: the first ``start_size`` norms; ``inf`` marks an empty slot
        self.start = torch.full((self.start_size,), _INF, dtype=torch.float32, device=dev)

    def _tensors(self) -> dict[str, Tensor]:
        return {"seen": self.seen, "mean": self.mean, "var": self.var, "start": self.start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """As :meth:`LearnedThreshold.load_state_dict`; a start buffer of another size
        (another ``warmup_steps``) is accepted once both starts are over, since it no
        longer matters then."""
        start = state.get("start")
        if start is not None and tuple(torch.as_tensor(start).shape) != tuple(self.start.shape):
            seen = int(torch.as_tensor(state.get("seen", 0)))
            if seen < max(self.start_size, len(start)):
                raise ValueError(
                    f"cannot resume a z-score start phase of {len(start)} norms with warmup_steps="
                    f"{self.warmup_steps} before it is over ({seen} norms seen); keep `warmup_steps` unchanged."
                )
            for name in ("seen", "mean", "var"):
                if name not in state:
                    raise ValueError(f"ZScoreThreshold state has no entry {name!r}; keys: {sorted(state)}.")
                getattr(self, name).copy_(torch.as_tensor(state[name]).to(getattr(self, name)))
            self.seen_at_least = seen
            return
        super().load_state_dict(state)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def _robust(self, start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Median and scaled MAD of the first ``count`` entries of ``start``."""
        center = filled_percentile(start, count, 50.0)
        deviation = torch.where(torch.isfinite(start), (start - center).abs(), torch.full_like(start, _INF))
        spread = self.MAD_SCALE * filled_percentile(deviation, count, 50.0)
        return center, spread

    def raw(self) -> Tensor:
        value = self.mean + self.z_threshold * self.var.sqrt()
        return torch.where(self.seen >= self.start_size, value, torch.full_like(value, _INF))

    def observe(self, norm: Tensor, accept: Tensor) -> None:
        norm = norm.to(device=self.device, dtype=torch.float32)
        ok = accept.to(self.device) & torch.isfinite(norm)
        if self.seen_at_least >= self.start_size:  # known on the host: the start is over
            x = torch.minimum(norm, self.learned())
            weight = (self.seen + 1).to(torch.float32).reciprocal().clamp(min=1.0 - self.ema_decay)
            d = x - self.mean
            mean = self.mean + weight * d
            var = (1.0 - weight) * (self.var + weight * d * d)
            ok = ok & torch.isfinite(mean) & torch.isfinite(var)
            self.mean.copy_(torch.where(ok, mean, self.mean))
            self.var.copy_(torch.where(ok, var, self.var))
            self.seen.add_(ok.to(torch.int64))
            return
        starting = self.seen < self.start_size
        # 1. start: keep the norm; when the start is complete, initialise from median / MAD
        pos = self.seen.clamp(max=self.start_size - 1).view(1)
        start = self.start.scatter(
            0, pos, torch.where(starting & ok, norm, self.start.gather(0, pos).squeeze(0)).view(1)
        )
        center, spread = self._robust(start, (self.seen + 1).clamp(max=self.start_size))
        complete = starting & (self.seen + 1 == self.start_size)
        # 3. update with the winsorized norm
        x = torch.minimum(norm, self.learned())
        weight = (self.seen + 1).to(torch.float32).reciprocal().clamp(min=1.0 - self.ema_decay)
        d = x - self.mean
        mean = torch.where(starting, torch.where(complete, center, self.mean), self.mean + weight * d)
        var = torch.where(
            starting, torch.where(complete, spread * spread, self.var), (1.0 - weight) * (self.var + weight * d * d)
        )
        ok = ok & torch.isfinite(mean) & torch.isfinite(var)
        self.start.copy_(torch.where(ok, start, self.start))
        self.mean.copy_(torch.where(ok, mean, self.mean))
        self.var.copy_(torch.where(ok, var, self.var))
        self.seen.add_(ok.to(torch.int64))


# --------------------------------------------------------------------------------------
# Unit-wise (AGC)
# --------------------------------------------------------------------------------------


def _placements_ok(p: Tensor) -> bool:
    """Whether every unit (row) of a sharded parameter lives whole on one rank."""
    if DTensor is None or not isinstance(p, DTensor):
        return True
    return all(not pl.is_shard() or pl.dim == 0 for pl in p.placements)


@dataclass
class _Group:
    """Matrices whose gradients share device, dtype and row length: one concatenation."""

    row: int
    members: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # local rows of each member
    weights: list[Tensor] | None = None  # cached (rows, row) views of plain parameters


@dataclass
class _Layout:
    vectors: list[int]
    vector_index: Tensor
    vectors_sharded: bool
    groups: list[_Group]
    sparse: list[int] = field(default_factory=list)  # matrices with a sparse COO gradient (embeddings)


def _rows(t: Tensor, rows: int, row: int) -> Tensor:
    """``t`` as a ``(rows, row)`` real matrix: complex numbers count as two real coordinates."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(rows, row)


@dataclass
class AGCResult:
    """What one :meth:`UnitwiseClip.clip_` call did (device tensors, no host sync).

    Attributes:
        units: number of units the rule looked at on this rank (host int; with sharded
            parameters, the rows of the local shards).
        clipped_units: how many of them were scaled down (0-dim int64 device tensor).
    """

    units: int
    clipped_units: Tensor


class UnitwiseClip:
    r"""Adaptive gradient clipping (AGC), unit-wise, as in NFNets.

    Brock et al. (2021), "High-Performance Large-Scale Image Recognition Without
    Normalization": each unit's gradient ``G_i`` is rescaled so that
    ``||G_i|| / max(||W_i||, eps) <= clipping``::

        G_i <- G_i * min(1, clipping * max(||W_i||, eps) / ||G_i||)

    A unit is a row (output unit) of a weight of two or more dimensions (the norm runs
    over every dimension but the first: a Linear row, a conv filter), and the whole
    tensor for biases, gains and other vectors. The paper uses ``eps = 1e-3``, recommends
    smaller ``clipping`` for larger batches (0.01 at batch 4096) and does not clip the
    final linear classifier; ``exclude`` takes regular expressions searched in the
    qualified parameter names (e.g. ``[r"^head\."]``) for parameters left alone.

    Per step the weight and gradient row norms take one concatenation and one norm
    kernel per (device, dtype, row length) group, vectors take a ``torch._foreach_norm``,
    and the coefficients are applied with one ``torch._foreach_mul_``; nothing is copied
    to the host. FSDP2 gradients sharded along their first dimension (the default) keep
    every row whole on one rank, so row norms are local; vector norms are combined
    across ranks by :func:`~lightning_gradguard.stats.tensor_stats`.

    Args:
        params: the parameters (one optimizer's :class:`~lightning_gradguard.stats.ParamSet`).
        clipping: the largest gradient/weight norm ratio per unit, > 0.
        eps: floor of the weight norm (so that zero-initialised units can move), > 0.
        exclude: regular expressions; parameters whose name matches any are not clipped.

    Raises:
        ValueError: on a bad argument or a pattern that is not a regular expression.
        RuntimeError: for a DTensor sharded along another dimension than the first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradguard.stats import ParamSet
        >>> lin = nn.Linear(4, 2)
        >>> _ = lin.weight.data.fill_(1.0)  # every row has norm 2
        >>> lin(torch.ones(1, 4)).sum().mul(100).backward()
        >>> agc = UnitwiseClip(ParamSet.from_module(lin), clipping=0.1, exclude=[r"bias"])
        >>> grad_norms = torch.stack([lin.weight.grad.norm(), lin.bias.grad.norm()])
        >>> _ = agc.clip_(grad_norms)
        >>> lin.weight.grad.norm(dim=1)  # each row now 0.1 * 2
        tensor([0.2000, 0.2000])
    """

    def __init__(
        self,
        params: ParamSet,
        *,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Sequence[str] | None = None,
    ) -> None:
        check_number("agc_clipping", clipping, low=0.0)
        check_number("agc_eps", eps, low=0.0)
        patterns = compile_patterns("agc_exclude", exclude)
        self.params = params
        self.clipping = float(clipping)
        self.eps = float(eps)
        self.exclude = tuple(exclude or ())
        self.excluded: tuple[str, ...] = tuple(n for n in params.names if any(r.search(n) for r in patterns))
        #: patterns of ``exclude`` that match no parameter name (most likely a typo)
        self.unmatched: tuple[str, ...] = tuple(
            text for text, r in zip(self.exclude, patterns) if not any(r.search(n) for n in params.names)
        )
        skip = set(self.excluded)
        self.matrices: tuple[int, ...] = ()
        self.vectors: tuple[int, ...] = ()
        mats, vecs = [], []
        for i, (name, p) in enumerate(zip(params.names, params.params)):
            if name in skip:
                continue
            if p.dim() >= 2:
                if not _placements_ok(p):
                    raise RuntimeError(
                        f"AGC needs every row of {name!r} on one rank, but it is sharded as {p.placements}; "
                        "only Shard(0) (FSDP2's default) and Replicate are supported."
                    )
                mats.append(i)
            else:
                vecs.append(i)
        self.matrices, self.vectors = tuple(mats), tuple(vecs)
        self._cache: dict[Any, Any] = {}

    def _layout(self, device: torch.device) -> _Layout:
        """Which units to clip this step and how they are grouped, cached per set of present gradients."""
        params = self.params.params
        present = tuple(params[i].grad is not None for i in self.matrices + self.vectors)
        key = (device, present)
        layout = self._cache.get(key)
        if layout is not None:
            return layout
        vectors = [i for i in self.vectors if params[i].grad is not None]
        groups: dict[tuple[Any, ...], _Group] = {}
        sparse: list[int] = []
        for i in self.matrices:
            grad = params[i].grad
            if grad is None:
                continue
            if grad.layout is not torch.strided:
                if grad.layout is not torch.sparse_coo or grad.sparse_dim() != 1:
                    raise ValueError(
                        f"AGC cannot clip the gradient of {self.params.names[i]!r}: layout {grad.layout} with "
                        f"{grad.sparse_dim()} sparse dimension(s); only dense gradients and sparse COO gradients "
                        "indexed by row (nn.Embedding(sparse=True)) are supported. Leave it out with `agc_exclude`."
                    )
                sparse.append(i)
                continue
            local = local_tensor(grad)
            row = math.prod(local.shape[1:]) * (2 if local.is_complex() else 1)
            group = groups.setdefault((local.device, local.dtype, row), _Group(row=row))
            group.members.append(i)
            group.rows.append(int(local.shape[0]))
        for group in groups.values():
            weights = [local_tensor(params[i]) for i in group.members]
            if not any(DTensor is not None and isinstance(params[i], DTensor) for i in group.members):
                # plain parameters keep their storage (optimizers update in place): reshape once
                group.weights = [_rows(w.detach(), r, group.row) for w, r in zip(weights, group.rows)]
        layout = _Layout(
            vectors=vectors,
            vector_index=torch.tensor(vectors, dtype=torch.long, device=device),
            vectors_sharded=any(self.params.reduce_keys[i] for i in vectors),
            groups=list(groups.values()),
            sparse=sparse,
        )
        self._cache[key] = layout
        return layout

    def clip_(
        self,
        grad_norms: Tensor,
        *,
        inv_scale: Tensor | None = None,
        finite: Tensor | None = None,
    ) -> AGCResult:
        """Apply AGC to the current gradients of ``params`` in place.

        Args:
            grad_norms: per-parameter gradient L2 norms, unscaled and (for sharded
                parameters) combined across ranks, shape ``(len(params),)``, as
                :attr:`~lightning_gradguard.stats.GradSnapshot.norms` provides them.
            inv_scale: ``1 / loss_scale`` when the gradients still carry a loss scale.
            finite: 0-dim bool; where ``False`` nothing is changed.

        Returns:
            An :class:`AGCResult`.
        """
        device = grad_norms.device
        params = self.params.params
        layout = self._layout(device)
        one = torch.ones((), device=device)
        ok = finite.to(device) if finite is not None else torch.ones((), dtype=torch.bool, device=device)
        clipped = torch.zeros((), dtype=torch.int64, device=device)
        units = len(layout.vectors)
        targets: list[Tensor] = []
        coefs: list[Tensor] = []
        with torch.no_grad():
            # vectors: whole-tensor norms (gradients' from the snapshot, weights' here)
            if layout.vectors:
                weights = [params[i] for i in layout.vectors]
                if layout.vectors_sharded:
                    keys = [self.params.reduce_keys[i] for i in layout.vectors]
                    w_norms, _ = tensor_stats(weights, keys, device=device, cache=self._cache.setdefault("stats", {}))
                else:
                    w_norms = torch.stack(
                        [n.to(device, torch.float32) for n in torch._foreach_norm([w.detach() for w in weights])]
                    )
                coef = self._coef(w_norms, grad_norms.index_select(0, layout.vector_index), ok, one)
                clipped = clipped + (coef < 1).sum()
                for i, c in zip(layout.vectors, coef.unbind()):
                    targets.append(local_tensor(params[i].grad))
                    coefs.append(c)
            # matrices: row norms of the local shards, one concatenation per group
            for group in layout.groups:
                grads = [local_tensor(params[i].grad) for i in group.members]
                weights = group.weights or [
                    _rows(local_tensor(params[i]).detach(), r, group.row) for i, r in zip(group.members, group.rows)
                ]
                rows = [_rows(g, r, group.row) for g, r in zip(grads, group.rows)]
                total = sum(group.rows)
                units += total
                if weights[0].dtype == rows[0].dtype:
                    norms = torch.linalg.vector_norm(torch.cat(rows + weights), dim=1, dtype=torch.float32)
                    g_rows, w_rows = norms[:total].to(device), norms[total:].to(device)
                else:
                    g_rows = torch.linalg.vector_norm(torch.cat(rows), dim=1, dtype=torch.float32).to(device)
                    w_rows = torch.linalg.vector_norm(torch.cat(weights), dim=1, dtype=torch.float32).to(device)
                if inv_scale is not None:
                    g_rows = g_rows * inv_scale.to(device)
                coef = self._coef(w_rows, g_rows, ok, one)
                clipped = clipped + (coef < 1).sum()
                coef = coef.to(device=grads[0].device, dtype=grads[0].dtype)
                for g, c in zip(grads, torch.split(coef, group.rows)):
                    targets.append(g)
                    coefs.append(c.view(-1, *([1] * (g.dim() - 1))))
            # sparse row gradients (embeddings): the unit is each stored row
            for i in layout.sparse:
                n, c = self._clip_sparse_rows(params[i], inv_scale, ok, one, device)
                units += n
                clipped = clipped + c
            if targets:
                coefs = [c if c.dtype == t.dtype and c.device == t.device else c.to(t) for t, c in zip(targets, coefs)]
                dense = [k for k, t in enumerate(targets) if t.layout is torch.strided]
                if dense:
                    torch._foreach_mul_([targets[k] for k in dense], [coefs[k] for k in dense])
                for t, c in zip(targets, coefs):
                    if t.layout is not torch.strided:  # a 1-D parameter with a sparse gradient
                        t.mul_(c)
        return AGCResult(units=units, clipped_units=clipped)

    def _clip_sparse_rows(
        self, param: Tensor, inv_scale: Tensor | None, ok: Tensor, one: Tensor, device: torch.device
    ) -> tuple[int, Tensor]:
        """AGC on a row-indexed sparse COO gradient, in place; returns (rows seen, rows clipped)."""
        if not param.grad.is_coalesced():
            param.grad = param.grad.coalesce()  # the same gradient, each row stored once
        grad = param.grad
        values = grad._values()
        n = int(values.shape[0])
        if n == 0:
            return 0, torch.zeros((), dtype=torch.int64, device=device)
        row = math.prod(values.shape[1:]) * (2 if values.is_complex() else 1)
        g_rows = torch.linalg.vector_norm(_rows(values, n, row), dim=1, dtype=torch.float32).to(device)
        weight = param.detach().index_select(0, grad._indices()[0])
        w_rows = torch.linalg.vector_norm(_rows(weight, n, row), dim=1, dtype=torch.float32).to(device)
        if inv_scale is not None:
            g_rows = g_rows * inv_scale.to(device)
        coef = self._coef(w_rows, g_rows, ok, one)
        values.mul_(coef.to(device=values.device, dtype=values.dtype).view(-1, *([1] * (values.dim() - 1))))
        return n, (coef < 1).sum()

    def _coef(self, w_norms: Tensor, g_norms: Tensor, ok: Tensor, one: Tensor) -> Tensor:
        limit = self.clipping * w_norms.clamp_min(self.eps)
        coef = (limit / g_norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
        good = ok & torch.isfinite(g_norms) & ~torch.isnan(coef)
        return torch.where(good, coef, one)


def compile_patterns(name: str, patterns: Sequence[str] | None) -> list[re.Pattern[str]]:
    """Compile a list of regular expressions; ``ValueError`` naming ``name`` on a bad one."""
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ValueError(f"`{name}` must be a list of regular expressions or None, got {patterns!r}.")
    out = []
    for pattern in patterns:
        try:
            out.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError(f"`{name}` entry {pattern!r} is not a valid regular expression: {err}") from None
    return out


def total_norm_of(norms: Tensor) -> Tensor:
    """``sqrt(sum(norms**2))`` of a vector of norms without overflow (0-dim)."""
    return reduce_norms(norms, torch.zeros_like(norms, dtype=torch.long), 1)[0]
