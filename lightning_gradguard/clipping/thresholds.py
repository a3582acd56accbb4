"""Clipping thresholds learned from the run's own history of total gradient norms.

:class:`PercentileThreshold` (AutoClip, Seetharaman et al. 2020) and
:class:`ZScoreThreshold` (after ZClip, 2025) share :class:`LearnedThreshold`: warm-up,
floor and ceiling, state on the device, ``state_dict`` support. A step whose norm is
not finite never enters the statistics (``observe`` masks it), so one NaN cannot poison
a learned threshold; nothing here reads a device value on the host.

Example:
    >>> import torch
    >>> rule = PercentileThreshold(percentile=50.0, window=8, warmup_steps=2)
    >>> for past in (1.0, 2.0, 3.0):
    ...     rule.observe(torch.tensor(past), accept=torch.tensor(True))
    >>> rule.threshold()
    tensor(2.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import Tensor
from typing_extensions import Unpack

from lightning_gradguard import _arrays, _validation

__all__ = [
    "Bounds",
    "LearnedThreshold",
    "PercentileThreshold",
    "ZScoreThreshold",
    "check_norm_bounds",
    "filled_percentile",
]


def ceiling(name: str, value: Any) -> float | None:
    """A ceiling such as ``max_norm``: a finite number > 0, or ``math.inf`` (no ceiling), or ``None``.

    ``inf`` is how a caller says "no ceiling" where ``None`` already means "the default".

    Example:
        >>> ceiling("max_norm", 2), ceiling("max_norm", float("inf"))
        (2.0, inf)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return _validation.number(name, value, low=0.0, allow_none=True)


def check_norm_bounds(min_norm: float | None, max_norm: float | None) -> None:
    """Raise ``ValueError`` when the floor ``min_norm`` exceeds the ceiling ``max_norm`` (either may be ``None``)."""
    if max_norm is not None and min_norm is not None and min_norm > max_norm:
        raise ValueError(
            f"`min_norm` ({min_norm!r}) must not exceed `max_norm` ({max_norm!r}); the learned modes' default "
            "`max_norm` is 1.0: pass a larger one, or math.inf for no ceiling."
        )


class Bounds(TypedDict, total=False):
    """The keyword arguments every :class:`LearnedThreshold` takes (see there)."""

    warmup_steps: int
    warmup_max_norm: float | None
    warmup_factor: float | None
    max_norm: float | None
    min_norm: float | None
    device: torch.device | str | None


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
    return torch.where(count > 0, value, torch.full_like(value, math.inf))


class LearnedThreshold:
    """A clipping threshold learned from the total norms of previous steps.

    Subclasses keep a statistic of past norms (:meth:`raw`) and decide what enters it
    (:meth:`observe`). This class adds what every learned rule needs:

    - **warm-up**: while fewer than ``warmup_steps`` norms were observed, the statistic is
      not trusted yet; the threshold is then ``warmup_factor`` times the median of the
      norms observed so far (:meth:`early`; infinite before the first one, while that
      median is 0, or when ``warmup_factor`` is ``None``/``inf``), and at most
      ``warmup_max_norm``; the statistics learn
      from the raw norms meanwhile;
    - **floor**: the threshold never goes below ``min_norm``;
    - **ceiling**: the threshold never goes above ``max_norm`` (``inf``: no ceiling).

    So :meth:`bound`, the rule's judgement of what is an outlier for this run, is
    ``max(warmup_factor * early, min_norm)`` during warm-up and ``max(raw, min_norm)``
    afterwards, and :meth:`threshold` is ``bound`` capped by ``max_norm`` (and, during
    warm-up, by ``warmup_max_norm``); a ``None`` bound is left out.

    The state is a few tensors on one device (created on ``device``, moved by
    :meth:`to`); :meth:`state_dict` returns CPU copies and :meth:`load_state_dict` copies
    back into the existing tensors, so a resumed run continues bit for bit.

    Args:
        warmup_steps: observed norms needed before the learned value is used, >= 0.
        warmup_max_norm: a ceiling during warm-up, or ``None``.
        warmup_factor: during warm-up, the threshold is at most this many times the median
            of the norms observed so far (when it is > 0); ``None`` or ``inf``: no such bound.
        max_norm: absolute ceiling, at all times, or ``None``/``inf``.
        min_norm: floor, or ``None``.
        device: where the state lives.
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 0,
        warmup_max_norm: float | None = None,
        warmup_factor: float | None = None,
        max_norm: float | None = None,
        min_norm: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        # warmup_steps sizes ZScoreThreshold's buffer of first norms
        self.warmup_steps = _validation.integer("warmup_steps", warmup_steps, low=0, high=_validation.MAX_WINDOW)
        self.warmup_max_norm = _validation.number("warmup_max_norm", warmup_max_norm, low=0.0, allow_none=True)
        self.warmup_factor = ceiling("warmup_factor", warmup_factor)
        self.max_norm = ceiling("max_norm", max_norm)
        self.min_norm = _validation.number("min_norm", min_norm, low=0.0, allow_none=True)
        check_norm_bounds(self.min_norm, self.max_norm)
        device = torch.device(device) if device is not None else torch.device("cpu")
        #: number of norms observed so far (int64, 0-dim)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        #: a lower bound of ``seen`` known on the host without a sync (see :meth:`note_seen`)
        self.seen_at_least = 0
        self._observed = 0  # observe() calls, and when to read ``seen`` next (see _refresh_seen)
        self._next_read = 0

    # ---------------------------------------------------------------- to override

    def raw(self) -> Tensor:
        """The statistic of past norms (0-dim float32); ``inf`` when nothing was observed."""
        raise NotImplementedError

    def observe(self, norm: Tensor, accept: Tensor, bound: Any = None) -> None:
        """Record this step's total ``norm`` where ``accept`` (0-dim bool) is true.

        Call it after :meth:`threshold` was read for the step: the step's own norm is not
        part of the history that judges it. A non-finite ``norm`` never enters.

        Args:
            norm: the pre-clip total norm of the step (0-dim tensor).
            accept: whether the step may enter the statistics (e.g. not skipped).
            bound: :meth:`bound` as read for this step, if the caller has it (saves
                computing it again); or :meth:`bound_in`'s value for the rule's device.
        """
        raise NotImplementedError

    def early(self) -> Tensor:
        """The median of the norms observed so far, for the warm-up (0-dim float32; ``inf`` before any)."""
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

    def bound(self) -> Tensor:
        """What this run's own norms say is an outlier, without the fixed ceilings (0-dim float32).

        After warm-up ``max(raw, min_norm)``; during warm-up ``warmup_factor`` times the
        median of the norms seen so far (``inf`` before the first, or without
        ``warmup_factor``), floored at ``min_norm``. ``skip_factor`` is judged against it.
        """
        ops = _arrays.ops_for(self.device)
        return ops.as_tensor(self.bound_in(ops), torch.float32)

    def threshold(self) -> Tensor:
        """The threshold in force for the next step (0-dim float32 device tensor)."""
        ops = _arrays.ops_for(self.device)
        return ops.as_tensor(self.cap_in(ops, self.bound_in(ops)), torch.float32)

    def cap(self, bound: Tensor) -> Tensor:
        """:meth:`bound` under the fixed ceilings: ``max_norm``, and ``warmup_max_norm`` during warm-up."""
        ops = _arrays.ops_for(self.device)
        return ops.as_tensor(self.cap_in(ops, ops.array(bound.to(self.device))), torch.float32)

    # The same three in the terms of an ``_arrays`` backend (a numpy scalar on the CPU),
    # for a caller that goes on computing with them. The warm-up's few dozen steps and a
    # rule without a host form (:meth:`_raw_in`) stay in torch.

    def bound_in(self, ops: _arrays.Ops) -> Any:
        """:meth:`bound` as ``ops`` computes."""
        if self.warmup_steps and self.seen_at_least < self.warmup_steps:
            value = self.raw()
            early = torch.full_like(value, math.inf)
            if self.warmup_factor is not None and self.warmup_factor != math.inf:
                median = self.early()  # a median of 0 (gradients exactly zero so far) bounds nothing
                early = torch.where(median > 0, median * self.warmup_factor, early)
            value = ops.array(torch.where(self.in_warmup(), early, value))
        else:
            value = self._raw_in(ops)
        return value if self.min_norm is None else ops.clamp_min(value, self.min_norm)

    def cap_in(self, ops: _arrays.Ops, bound: Any) -> Any:
        """:meth:`cap` of a :meth:`bound_in` value, as ``ops`` computes."""
        value = bound if self.max_norm is None else ops.clamp_max(bound, self.max_norm)
        if self.warmup_steps and self.warmup_max_norm is not None and self.seen_at_least < self.warmup_steps:
            t = ops.as_tensor(value, torch.float32)
            value = ops.array(torch.where(self.in_warmup(), t.clamp(max=self.warmup_max_norm), t))
        return value

    def _raw_in(self, ops: _arrays.Ops) -> Any:
        """:meth:`raw` as ``ops`` computes (by default from the tensor)."""
        return ops.array(self.raw())

    def note_seen(self, seen: int) -> None:
        """Tell the rule the value of :attr:`seen`, read on the host anyway (e.g. when logging).

        Rules may then skip work that can no longer matter (the z-score start phase). It
        never changes a result.
        """
        self.seen_at_least = max(self.seen_at_least, int(seen))

    def start_length(self) -> int:
        """How many norms the start-up work (warm-up, a start buffer) lasts; past it only the steady rule runs."""
        return self.warmup_steps

    def _refresh_seen(self) -> None:
        """Keep :attr:`seen_at_least` current while the start-up may still be running (end of :meth:`observe`).

        Without it a run that never logs (nothing reads :attr:`seen` for it) would do the
        start-up's work at every step. On the CPU the count is read directly: a view of its
        memory, no copy and no device to wait for. Elsewhere it is read (one host sync) at
        the observation where the start-up could first be over, then at doubling
        intervals until it is: a handful of reads per run, none once it is over.
        """
        length = self.start_length()
        if self.seen_at_least >= length:
            return
        self._observed += 1
        if _reads_free(self.seen):
            self.seen_at_least = int(self.seen.numpy())
        elif self._observed >= max(length, self._next_read):
            self._next_read = 2 * self._observed
            self.note_seen(int(self.seen))

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
        self._observed = self._next_read = 0  # re-count towards the next read from the restored count


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
        **bounds: ``warmup_steps``, ``warmup_max_norm``, ``warmup_factor``, ``max_norm``, ``min_norm``,
            ``device``: see :class:`LearnedThreshold`.

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
        **bounds: Unpack[Bounds],
    ) -> None:
        _validation.number("percentile", percentile, low=0.0, high=100.0)
        _validation.integer("window", window, high=_validation.MAX_WINDOW)
        super().__init__(**bounds)
        self.percentile = float(percentile)
        self.window = window
        #: the last ``window`` accepted norms; ``inf`` marks an empty slot
        self.buffer = torch.full((window,), math.inf, dtype=torch.float32, device=self.seen.device)

    def _tensors(self) -> dict[str, Tensor]:
        return {"seen": self.seen, "buffer": self.buffer}

    def raw(self) -> Tensor:
        return filled_percentile(self.buffer, self.seen.clamp(max=self.window), self.percentile)

    def early(self) -> Tensor:
        return filled_percentile(self.buffer, self.seen.clamp(max=self.window), 50.0)

    def observe(self, norm: Tensor, accept: Tensor, bound: Any = None) -> None:
        norm = norm.to(device=self.device, dtype=torch.float32).reshape(1)
        ok = (accept.to(self.device) & torch.isfinite(norm)).reshape(1)
        pos = (self.seen % self.window).view(1)
        old = self.buffer.gather(0, pos)
        self.buffer.scatter_(0, pos, torch.where(ok, norm, old))
        self.seen.add_(ok.squeeze(0).to(torch.int64))
        self._refresh_seen()


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
       there is no learned value: the threshold is the warm-up one). A norm
       above the threshold is scaled down to exactly the threshold; unlike ZClip's
       default ``adaptive_scaling``, larger outliers are not pulled further down.
    3. **Update.** The norm *winsorized* at the learned threshold before any ceiling,
       ``x = min(norm, max(mean + z_threshold * sqrt(var), min_norm))``, enters an
       exponentially weighted mean and variance (``max_norm`` bounds the clipping, not
       what the statistics learn: they follow the run's own scale under the ceiling)::

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
        **bounds: ``warmup_steps``, ``warmup_max_norm``, ``warmup_factor``, ``max_norm``, ``min_norm``,
            ``device``: see :class:`LearnedThreshold`.

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
        **bounds: Unpack[Bounds],
    ) -> None:
        _validation.number("z_threshold", z_threshold, low=0.0)
        _validation.number("ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)
        super().__init__(**bounds)
        self.z_threshold = float(z_threshold)
        self.ema_decay = float(ema_decay)
        self.start_size = max(self.warmup_steps, 2)
        dev = self.seen.device
        self.mean = torch.zeros((), dtype=torch.float32, device=dev)
        self.var = torch.zeros((), dtype=torch.float32, device=dev)
        #: the first ``start_size`` norms; ``inf`` marks an empty slot
        self.start = torch.full((self.start_size,), math.inf, dtype=torch.float32, device=dev)

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
            self._observed = self._next_read = 0
            return
        super().load_state_dict(state)

    def start_length(self) -> int:
        return max(self.warmup_steps, self.start_size)

    def _robust(self, start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Median and scaled MAD of the first ``count`` entries of ``start``."""
        center = filled_percentile(start, count, 50.0)
        deviation = torch.where(torch.isfinite(start), (start - center).abs(), torch.full_like(start, math.inf))
        spread = self.MAD_SCALE * filled_percentile(deviation, count, 50.0)
        return center, spread

    def early(self) -> Tensor:
        return filled_percentile(self.start, self.seen.clamp(max=self.start_size), 50.0)

    def raw(self) -> Tensor:
        value = self._statistic(_arrays.DEVICE)
        if self.seen_at_least >= self.start_size:  # known on the host: the start is over
            return value
        return torch.where(self.seen >= self.start_size, value, torch.full_like(value, math.inf))

    def _raw_in(self, ops: _arrays.Ops) -> Any:
        if self.seen_at_least >= self.start_size:
            return self._statistic(ops)
        return ops.array(self.raw())

    def _statistic(self, ops: _arrays.Ops) -> Any:
        """``mean + z_threshold * sqrt(var)``, as ``ops`` computes."""
        with ops.quiet():
            return ops.array(self.mean) + self.z_threshold * ops.sqrt(ops.array(self.var))

    def observe(self, norm: Tensor, accept: Tensor, bound: Any = None) -> None:
        norm = norm.to(device=self.device, dtype=torch.float32)
        if self.seen_at_least >= self.start_size:  # known on the host: the start is over
            ops = _arrays.ops_for(self.device)
            self._update(norm, accept.to(self.device), self.bound_in(ops) if bound is None else bound)
            return
        ok = accept.to(self.device) & torch.isfinite(norm)
        starting = self.seen < self.start_size
        # (the start-up is in torch: a few dozen steps of a run)
        # 1. start: keep the norm; when the start is complete, initialise from median / MAD
        pos = self.seen.clamp(max=self.start_size - 1).view(1)
        start = self.start.scatter(
            0, pos, torch.where(starting & ok, norm, self.start.gather(0, pos).squeeze(0)).view(1)
        )
        center, spread = self._robust(start, (self.seen + 1).clamp(max=self.start_size))
        complete = starting & (self.seen + 1 == self.start_size)
        # 3. update with the winsorized norm
        x = torch.minimum(norm, self.bound())
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
        self._refresh_seen()

    def _update(self, norm: Tensor, accept: Tensor, bound: Any) -> None:
        """Rule 3 after the start: the winsorized norm into the moving mean and variance.

        Written against :mod:`lightning_gradguard._arrays`: numpy scalars on the CPU, torch on a device.
        """
        ops = _arrays.ops_for(self.device)
        s = _arrays.InPlace({"seen": self.seen, "mean": self.mean, "var": self.var}, ops)
        norm = ops.array(norm)
        bound = ops.array(bound.to(self.device)) if isinstance(bound, Tensor) else bound  # or a bound_in value
        ok = ops.array(accept) & ops.isfinite(norm)
        with ops.quiet():  # an overflow or NaN here is refused just below
            x = ops.minimum(norm, bound)
            weight = ops.clamp_min(1.0 / ops.f32(s.seen + 1), 1.0 - self.ema_decay)
            d = x - s.mean
            mean = s.mean + weight * d
            var = (1.0 - weight) * (s.var + weight * d * d)
        ok = ok & ops.isfinite(mean) & ops.isfinite(var)
        s.mean = ops.where(ok, mean, s.mean)
        s.var = ops.where(ok, var, s.var)
        s.seen = s.seen + ok


def _reads_free(t: Tensor) -> bool:
    """Whether reading ``t`` on the host costs no device synchronisation (a CPU tensor)."""
    return t.device.type == "cpu"
