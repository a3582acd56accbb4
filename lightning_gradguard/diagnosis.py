"""Findings and advice from gradient snapshots: vanishing, exploding, dead and non-finite.

Plain PyTorch, no Trainer. :class:`HealthDetector` keeps its running statistics on the
device (:class:`DetectorState`) and turns one :class:`~lightning_gradguard.stats.GroupedStats`
per step into a :class:`DeviceReading`: flags and measurements as 0-dim device tensors,
copied to the host as a :class:`Reading` in one transfer. When a flag is up,
:class:`Evidence` gathers the host copies of the step (one more transfer) and
:func:`build_finding` turns them into a :class:`Finding` that names the layers, the
numbers and the remedies that fit the model (:func:`advise`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_gradguard.stats import Grouping, ParamSet, take_snapshot
    >>> from lightning_gradguard.diagnosis import DetectorConfig, Evidence, HealthDetector, build_finding
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(8, 8), nn.Sigmoid())])
    >>> params = ParamSet.from_module(net)
    >>> layers = Grouping.build(params)
    >>> detector = HealthDetector(DetectorConfig(patience=3))
    >>> for step in range(3):
    ...     net.zero_grad()
    ...     net(torch.randn(4, 8)).sum().backward()
    ...     stats = take_snapshot(params).grouped(layers)
    ...     reading = detector.update(stats).to_host()
    ...     print(step, reading.active)
    0 ()
    1 ()
    2 ('vanishing',)
    >>> finding = build_finding("vanishing", 2, Evidence.collect(detector, stats, reading), model=net)
    >>> finding.layers[0][0], finding.ratio > 1e3, finding.advice[0].startswith("replace the Sigmoid")
    ('0', True, True)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from lightning_gradguard import _arrays, _validation
from lightning_gradguard.stats import GroupedStats, HostStats, UnitStats

__all__ = [
    "KINDS",
    "DetectorConfig",
    "DetectorState",
    "DeviceReading",
    "Evidence",
    "Finding",
    "GradientAnomalyError",
    "HealthDetector",
    "Reading",
    "advise",
    "build_finding",
]

#: The kinds of finding, in the order of the flags of :class:`Reading`.
KINDS = ("nonfinite", "exploding", "vanishing", "dead", "overflow")


class GradientAnomalyError(RuntimeError):
    """Raised by ``VanishExplodeAlarm`` with ``action="raise"``; ``.finding`` holds the diagnosis."""

    def __init__(self, finding: Finding) -> None:
        self.finding = finding
        super().__init__(finding.message())


@dataclass
class Finding:
    """One diagnosed gradient problem.

    Attributes:
        kind: one of :data:`KINDS`.
        step: the optimizer step (``trainer.global_step`` before the step).
        summary: one line saying what was seen.
        layers: the layers concerned, in depth order, with their gradient norms.
        total_norm: the total gradient norm at that step.
        ratio: deepest / shallowest layer gradient norm (vanishing), if known.
        zscore: z-score of log(total norm) against the run's history (exploding), if known.
        toward_input: an explosion that grows layer by layer toward the input (a depth problem).
        units: dead units: per layer, ``(name, share of its units, number of units)``.
        advice: remedies that fit this model.
        dump_path: where the crash dump was written, if one was.
        dump_batch: which batch the crash dump holds (e.g. ``"batch_idx 6, the first
            micro-batch of the step whose loss went non-finite (3 of 4 accumulated)"``).
    """

    kind: str
    step: int
    summary: str
    layers: list[tuple[str, float]] = field(default_factory=list)
    total_norm: float = math.nan
    ratio: float | None = None
    zscore: float | None = None
    toward_input: bool = False
    units: list[tuple[str, float, int]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    dump_path: str | None = None
    dump_batch: str | None = None

    def message(self) -> str:
        """A multi-line, human-readable report."""
        lines = [f"[gradguard] {self.kind} gradients at step {self.step}: {self.summary}"]
        if self.units:
            shown = ", ".join(f"{name} ({share:.0%} of {count} units)" for name, share, count in self.units[:6])
            lines.append(f"  layers: {shown}")
        elif self.layers:
            shown = ", ".join(f"{name} ({norm:.3g})" for name, norm in self.layers[:6])
            more = f" and {len(self.layers) - 6} more" if len(self.layers) > 6 else ""
            lines.append(f"  layers: {shown}{more}")
        if self.advice:
            lines.append("  try:")
            lines.extend(f"   - {a}" for a in self.advice)
        if self.dump_path:
            held = f" (holds {self.dump_batch})" if self.dump_batch else ""
            lines.append(f"  crash dump: {self.dump_path}{held}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The finding as markdown (TensorBoard's Text tab, a pull request, a bug report).

        Example:
            >>> print(Finding("dead", 7, "1 layer(s) ...", layers=[("fc1", 0.0)], advice=["try X"]).markdown())
            **dead** gradients at step 7: 1 layer(s) ...
            <BLANKLINE>
            | layer (input side first) | gradient norm |
            |---|---|
            | `fc1` | 0 |
            <BLANKLINE>
            **Try:**
            <BLANKLINE>
            - try X
        """
        lines = [f"**{self.kind}** gradients at step {self.step}: {_md(self.summary)}", ""]
        if self.units:
            lines += ["| layer (input side first) | dead units |", "|---|---|"]
            lines += [f"| `{name}` | {share:.0%} of {count} |" for name, share, count in self.units]
            lines.append("")
        elif self.layers:
            lines += ["| layer (input side first) | gradient norm |", "|---|---|"]
            shown = _MARKDOWN_ROWS  # short enough that the advice stays in view in TensorBoard's card
            lines += [f"| `{name}` | {norm:.3g} |" for name, norm in self.layers[:shown]]
            if len(self.layers) > shown:
                lines.append(f"| ... and {len(self.layers) - shown} more | |")
            lines.append("")
        if self.advice:
            lines += ["**Try:**", ""]
            lines += [f"- {_md(a)}" for a in self.advice]
        if self.dump_path:
            held = f" (holds {self.dump_batch})" if self.dump_batch else ""
            lines += ["", f"Crash dump: `{self.dump_path}`{_md(held)}"]
        return "\n".join(lines).rstrip()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Layers listed in a finding's markdown table.
_MARKDOWN_ROWS = 8


def _md(text: str) -> str:
    """``text`` with the characters markdown would misread escaped (``*``, ``_``, ``|``)."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


# --------------------------------------------------------------------------------------
# Settings, state and readings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorConfig:
    """The settings of :class:`HealthDetector`, with their defaults, checked on construction.

    The defaults come from measurements on healthy and broken models (see the README's
    "How the defaults were chosen"). Each setting is kept in its normal form (a
    ``float`` for a number, so ``5`` and ``5.0`` are the same setting and the same
    ``state_key``).

    Args:
        max_norm: absolute ceiling on the total norm (``None``: none).
        spike_zscore: z-score of log-norm that counts as a spike (``None``: no spike rule).
        spike_min_ratio: a spike must also be this many times the moving level (``None``:
            no such guard).
        growth_total: geometric growth that counts as exploding: the total norm is this
            many times the smallest of the last :data:`GROWTH_WINDOW` finite steps
            (``None``: off).
        growth_step: ... while rising at least this many times over the previous finite
            step, > 1.
        ema_alpha: weight of the newest step in the moving mean/variance, in (0, 1).
        warmup_steps: finite steps before the spike rule is armed.
        vanish_ratio: median deepest/shallowest norm ratio that counts as vanishing, > 1
            (``None``: off).
        vanish_floor: absolute floor for the shallowest layer's median norm (``None``: off).
        patience: the window, in finite steps, of the vanishing medians.
        dead_patience: consecutive all-zero steps that make a layer, or a unit, dead.
        dead_unit_share: share of a layer's units (rows of a Linear/Conv weight) dead at
            once that counts as ``dead`` (``None``: units not watched).
        max_consecutive_overflows: fp16 overflow steps in a row that count as a failure.
        min_loss_scale: fp16 loss scale below which overflow counts as a failure.

    Raises:
        ValueError: if a setting is outside what is allowed; the message names it.

    Example:
        >>> DetectorConfig(vanish_ratio=0.5)
        Traceback (most recent call last):
        ...
        ValueError: `vanish_ratio` must be a finite number > 1 or None, got 0.5.
    """

    max_norm: float | None = 1e6
    spike_zscore: float | None = 8.0
    spike_min_ratio: float | None = 50.0
    growth_total: float | None = 1e3
    growth_step: float = 2.0
    ema_alpha: float = 0.05
    warmup_steps: int = 20
    vanish_ratio: float | None = 1e3
    vanish_floor: float | None = None
    patience: int = 20
    dead_patience: int = 10
    dead_unit_share: float | None = 0.5
    max_consecutive_overflows: int = 20
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _SETTING_CHECKS[f.name](f.name, getattr(self, f.name)))


_positive_or_none = partial(_validation.number, low=0, allow_none=True)
#: setting -> its check (a ``_validation`` function taking the name and the value), in field order.
_SETTING_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "max_norm": _positive_or_none,
    "spike_zscore": _positive_or_none,
    "spike_min_ratio": _positive_or_none,
    "growth_total": partial(_validation.number, low=1, allow_none=True),
    "growth_step": partial(_validation.number, low=1),
    "ema_alpha": partial(_validation.number, low=0, high=1, high_inclusive=False),
    "warmup_steps": partial(_validation.integer, low=0),
    "vanish_ratio": partial(_validation.number, low=1, allow_none=True),  # deepest / shallowest norm
    "vanish_floor": _positive_or_none,
    "patience": partial(_validation.integer, high=_validation.MAX_WINDOW),  # sizes the median window
    "dead_patience": _validation.integer,
    "dead_unit_share": partial(_validation.number, low=0, high=1, high_inclusive=True, allow_none=True),
    "max_consecutive_overflows": _validation.integer,
    "min_loss_scale": partial(_validation.number, low=0),
}


#: The state that does not depend on the layers: kept when the layers or their order change.
_RUN_SCALARS = ("count", "mean", "var", "overflow_run", "prev_log", "growth_seen", "total_ring")

#: Finite steps over which geometric growth is measured (the norm against the smallest of them).
GROWTH_WINDOW = 8


@dataclass
class DetectorState:
    """The running statistics of :class:`HealthDetector`, float32 device tensors.

    Attributes:
        count: finite steps seen (arms the spike rule).
        mean, var: moving mean and variance of log(total norm).
        vanish_seen: finite steps written into the rings.
        shallow_ring, deep_ring: log-norms of the shallowest and deepest layers over the
            last ``patience`` finite steps (NaN where not written yet).
        overflow_run: fp16 overflow steps in a row.
        dead_run: per group, all-zero steps in a row.
        prev_log: log(total norm) at the last finite step (NaN before the first).
        grow_log: log of the total norm over the smallest of the last :data:`GROWTH_WINDOW`
            finite steps, at the last finite step.
        growth_seen: finite steps written into the growth rings.
        total_ring, group_ring: log total norm and per-group log-norms of the last
            :data:`GROWTH_WINDOW` finite steps (NaN where not written yet).
        unit_run: per watched unit, steps in a row whose gradient row was exactly zero.
    """

    count: Tensor
    mean: Tensor
    var: Tensor
    vanish_seen: Tensor
    shallow_ring: Tensor
    deep_ring: Tensor
    overflow_run: Tensor
    dead_run: Tensor
    prev_log: Tensor
    grow_log: Tensor
    growth_seen: Tensor
    total_ring: Tensor
    group_ring: Tensor
    unit_run: Tensor

    @classmethod
    def fresh(
        cls,
        patience: int,
        num_groups: int,
        device: torch.device,
        keep: Mapping[str, Tensor] | None = None,
        num_units: int = 0,
    ) -> DetectorState:
        """A new state; the tensors of ``keep`` (a checkpoint, an older state) whose shape fits are taken over."""
        scalars = ("count", "mean", "var", "vanish_seen", "overflow_run")
        values = {name: torch.zeros((), dtype=torch.float32, device=device) for name in scalars}
        for ring in ("shallow_ring", "deep_ring"):
            values[ring] = torch.full((patience,), math.nan, dtype=torch.float32, device=device)
        values["dead_run"] = torch.zeros(num_groups, dtype=torch.float32, device=device)
        values["prev_log"] = torch.full((), math.nan, dtype=torch.float32, device=device)
        values["grow_log"] = torch.zeros((), dtype=torch.float32, device=device)
        values["growth_seen"] = torch.zeros((), dtype=torch.float32, device=device)
        values["total_ring"] = torch.full((GROWTH_WINDOW,), math.nan, dtype=torch.float32, device=device)
        values["group_ring"] = torch.full((GROWTH_WINDOW, num_groups), math.nan, dtype=torch.float32, device=device)
        values["unit_run"] = torch.zeros(num_units, dtype=torch.float32, device=device)
        for name, value in (keep or {}).items():
            if name in values and value.shape == values[name].shape:
                values[name] = value.to(device)
        return cls(**values)

    def tensors(self) -> dict[str, Tensor]:
        """Name -> tensor, in the order of the checkpoint format."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device) -> DetectorState:
        return DetectorState(**{name: value.to(device) for name, value in self.tensors().items()})


@dataclass(frozen=True)
class Reading:
    """One step's flags and measurements on the host (from :meth:`DeviceReading.to_host`).

    Attributes:
        nonfinite, exploding, vanishing, dead, overflow: whether each kind's rule fired.
        zscore: z-score of log(total norm) (NaN until the spike rule is armed).
        ratio: median deepest/shallowest norm ratio (NaN with fewer than two layers that
            have a gradient).
        total_norm: the total gradient norm.
        loss_scale: the fp16 loss scale (1 without a scaler).
    """

    nonfinite: bool
    exploding: bool
    vanishing: bool
    dead: bool
    overflow: bool
    zscore: float
    ratio: float
    total_norm: float
    loss_scale: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Reading:
        """The reading of :meth:`DeviceReading.stacked`'s values, copied to the host."""
        flags, measures = values[: len(KINDS)], values[len(KINDS) :]
        return cls(*(flag > 0 for flag in flags), *measures)

    @property
    def active(self) -> tuple[str, ...]:
        """The kinds whose flag is up, in :data:`KINDS` order."""
        return tuple(kind for kind in KINDS if getattr(self, kind))

    def as_dict(self) -> dict[str, float]:
        """Every field as a float (flags 0.0/1.0), as crash dumps store it."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class DeviceReading:
    """What :meth:`HealthDetector.update` returns: the fields of :class:`Reading` as 0-dim device tensors.

    The flags are bool tensors, the measurements floating point. Nothing here has left
    the device; :meth:`to_host` is the step's one host copy. A reading computed on the
    host (CPU statistics, see :mod:`lightning_gradguard._arrays`) carries its
    :class:`Reading` already: :meth:`to_host` copies nothing then.
    """

    nonfinite: Tensor
    exploding: Tensor
    vanishing: Tensor
    dead: Tensor
    overflow: Tensor
    zscore: Tensor
    ratio: Tensor
    total_norm: Tensor
    loss_scale: Tensor
    #: the host reading of one made :meth:`on_host` (not a field: ``replace``/``asdict`` leave it out)
    _host: ClassVar[Reading | None] = None

    @classmethod
    def on_host(cls, values: Sequence[Any], total_norm: Tensor) -> DeviceReading:
        """The reading of :class:`Reading`'s ``values`` computed on the host (numpy scalars), ``total_norm`` aside.

        Its :class:`Reading` is made at once, so that :meth:`to_host` costs nothing; the
        tensor fields (bool, float32 CPU tensors of the same values) are made when first
        read, which a caller that only wants the host reading never does.
        """
        flags, measures = values[: len(KINDS)], values[len(KINDS) :]
        reading = object.__new__(cls)
        object.__setattr__(reading, "_host", Reading(*map(bool, flags), *(float(np.float32(m)) for m in measures)))
        object.__setattr__(reading, "total_norm", total_norm)
        return reading

    def __getattr__(self, name: str) -> Tensor:
        """A field of a reading made :meth:`on_host`, as a tensor, when it is first read."""
        if self._host is None or name not in _READING_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = torch.tensor(getattr(self._host, name), dtype=torch.bool if name in KINDS else torch.float32)
        object.__setattr__(self, name, value)
        return value

    def to_host(self) -> Reading:
        """Copy every field to the host in one transfer."""
        if self._host is not None:
            return self._host
        return Reading.of(self.stacked().tolist())

    def stacked(self) -> Tensor:
        """Every field in one float vector on the device, in field order (what :meth:`Reading.of` reads)."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        return torch.stack([t.float() if t.dtype == torch.bool else t for t in tensors])


_READING_FIELDS = tuple(f.name for f in fields(Reading))


# --------------------------------------------------------------------------------------
# Device-side detection
# --------------------------------------------------------------------------------------


class HealthDetector:
    """Running gradient-health checks, all on the device (on the CPU, in numpy on the same memory).

    The rules are written once against :mod:`lightning_gradguard._arrays`: torch
    operations on a device, so that nothing waits for it; numpy on views of the state's
    CPU tensors, where a torch dispatch per scalar operation would cost more than the rules.

    Per step, :meth:`update` returns a :class:`DeviceReading`: one flag per kind
    (``nonfinite``, ``exploding``, ``vanishing``, ``dead``, ``overflow``), the ``zscore``
    (NaN until the spike rule is armed), the ``ratio`` (NaN with fewer than two layers that
    have a gradient), the ``total_norm`` and the ``loss_scale``. Its
    :meth:`~DeviceReading.to_host` is the caller's single host copy for the step.

    Rules (every threshold is a setting of :class:`DetectorConfig`):

    - **nonfinite**: a NaN/Inf in any gradient or a non-finite loss. Under an fp16
      ``GradScaler`` (``scaler_active=True``) such a step is an *overflow* that the scaler
      skips and answers by halving the scale; it becomes ``nonfinite`` only after
      ``max_consecutive_overflows`` overflow steps in a row, or when the scale falls below
      ``min_loss_scale``.
    - **exploding**: the total norm is above ``max_norm``, or, after ``warmup_steps``
      finite steps, a spike: log(total norm) is more than ``spike_zscore`` standard
      deviations above its exponential moving average (weight ``ema_alpha``; the standard
      deviation is floored at ``sqrt(0.1)`` in log units) *and* the norm is at least
      ``spike_min_ratio`` times the average's level. The average is fed the log-norm
      capped at mean + ``spike_zscore`` std, so one spike moves it by at most
      ``ema_alpha * spike_zscore`` std while a lasting change of level is still learned.
    - **vanishing**: over the last ``patience`` finite steps, the median of the deepest
      layer's norm over the shallowest's is above ``vanish_ratio`` (or, if
      ``vanish_floor`` is set, the shallowest's median norm is below it while the
      deepest's is not). Shallowest and deepest are the first and last groups that have a
      gradient, in the order the layers run (``Grouping.names``: the forward pass when it
      was traced, else registration order). A median over a window, rather than a run of
      consecutive steps, lets one odd step neither trigger nor reset it.
    - **exploding** also: geometric growth, when the total norm is ``growth_total`` times
      the smallest of the last :data:`GROWTH_WINDOW` finite steps and rose at least
      ``growth_step``-fold on this step (x10 then x100: flagged at the second step, before
      the norm reaches the ceiling or a non-finite value; no warm-up needed, fp16 overflow
      steps in between do not break it).
    - **dead**: a group that has gradients, all exactly zero, for ``dead_patience``
      consecutive finite steps (max |g| is exact, so float32 underflow of a norm cannot
      fake it).

    Non-finite steps never enter the running statistics.

    Args:
        config: the settings; ``None`` builds one from ``settings``.
        **settings: the fields of :class:`DetectorConfig`, when no ``config`` is given
            (``HealthDetector(patience=3)``).

    Raises:
        ValueError: if a setting is outside what is allowed.
        TypeError: if both ``config`` and ``settings`` are given.
    """

    def __init__(self, config: DetectorConfig | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise TypeError("HealthDetector takes either a DetectorConfig or its settings as keywords, not both.")
        self.config = config if config is not None else DetectorConfig(**settings)
        self._state: DetectorState | None = None
        self._restored: dict[str, Tensor] = {}  # a checkpoint's tensors, taken over at the next update
        self._cache: dict[Any, Any] = {}
        self._names: tuple[str, ...] | None = None  # the layers the per-layer state refers to

    def __getstate__(self) -> dict[str, Any]:
        # the cache holds numpy views of the state's memory (see _arrays): a copy would keep
        # views of the original's tensors, so it starts afresh (everything there is rebuilt)
        return {**self.__dict__, "_cache": {}}

    # -------------------------------------------------------------- state

    def _ensure_state(self, names: tuple[str, ...], num_units: int, device: torch.device) -> DetectorState:
        st = self._state
        changed = self._names is not None and self._names != names
        if st is None or st.dead_run.numel() != len(names) or st.unit_run.numel() != num_units or changed:
            keep = st.tensors() if st is not None else self._restored  # what still fits is kept
            if st is not None and self._names is not None and self._names != names:
                # the layers changed (or their order did): per-layer history no longer applies
                keep = {k: v for k, v in keep.items() if k in _RUN_SCALARS}
            self._state = st = DetectorState.fresh(self.config.patience, len(names), device, keep, num_units)
            self._restored = {}
        elif st.count.device != device:
            self._state = st = st.to(device)
        self._names = names
        return st

    def state_dict(self) -> dict[str, list[float] | float]:
        """Running statistics as plain Python numbers (one host copy per tensor; call at checkpoint time)."""
        tensors = self._state.tensors() if self._state is not None else self._restored
        return {name: value.tolist() for name, value in tensors.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s numbers; they take effect at the next :meth:`update`."""
        self._restored = {name: torch.tensor(value, dtype=torch.float32) for name, value in state.items()}
        self._state = None

    def dead_unit_shares(self) -> Tensor:
        """Per group, the share of its watched units dead for ``dead_patience`` steps (device float)."""
        shares = getattr(self, "_unit_shares", None)
        return torch.as_tensor(shares) if shares is not None else torch.zeros(0)

    def dead_groups(self) -> Tensor:
        """Per group, whether it has been all-zero for ``dead_patience`` steps (device bool)."""
        if self._state is None:
            return torch.zeros(0, dtype=torch.bool)
        return self._state.dead_run >= self.config.dead_patience

    def overflow_run(self) -> Tensor:
        """fp16 overflow steps in a row so far (0-dim float32 device tensor)."""
        return self._state.overflow_run.clone() if self._state is not None else torch.zeros(())

    # -------------------------------------------------------------- the check

    def update(
        self,
        stats: GroupedStats,
        *,
        loss_finite: Tensor | None = None,
        scaler_active: bool = False,
        loss_scale: Tensor | None = None,
        units: UnitStats | None = None,
    ) -> DeviceReading:
        """Check one step's statistics and advance the running state; no host sync.

        Args:
            stats: the step's per-group statistics (unscaled).
            loss_finite: 0-dim device bool, whether every micro-batch loss was finite.
            scaler_active: an enabled fp16 ``GradScaler`` will skip non-finite steps.
            loss_scale: the scaler's current scale (device tensor), if any.
            units: the step's unit activity, for dead units (``None``: not watched).
        """
        device = stats.norms.device
        if self.config.dead_unit_share is None:
            units = None
        st = self._ensure_state(stats.grouping.names, units.num_units if units is not None else 0, device)
        ops = _arrays.ops_for(device)  # numpy on the CPU, torch on a device: see _arrays
        s = self._arrays(st, ops)
        finite = stats.all_finite  # from the norms: no max |g| pass needed
        if loss_finite is not None:
            finite = finite & loss_finite.to(device)
        finite, total, norms = ops.array(finite), ops.array(stats.total_norm), ops.array(stats.norms)
        with ops.quiet():
            log_total = ops.log(ops.clamp_min(total, 1e-38))
            nonfinite, overflow, scale = self._nonfinite(ops, s, finite, scaler_active, loss_scale, device)
            exploding, zscore = self._exploding(ops, s, total, log_total, finite)
            exploding = exploding | self._growing(ops, s, norms, log_total, finite)
            vanishing, ratio = self._vanishing(ops, s, stats.present, norms, finite, device)
            dead = self._dead(ops, s, stats.present, norms, finite, device) | self._dead_units(ops, s, units, finite)
        if ops is not _arrays.DEVICE:
            values = (nonfinite, exploding, vanishing, dead, overflow, zscore, ratio, total, scale)
            return DeviceReading.on_host(values, stats.total_norm)
        return DeviceReading(
            nonfinite=nonfinite,
            exploding=exploding,
            vanishing=vanishing,
            dead=dead,
            overflow=overflow,
            zscore=zscore,
            ratio=ratio,
            total_norm=stats.total_norm,
            loss_scale=scale,
        )

    def _arrays(self, st: DetectorState, ops: _arrays.Ops) -> Any:
        """The state as ``ops`` updates it: the state itself for torch, numpy views writing into it for numpy."""
        if ops is _arrays.DEVICE:
            self._cache.pop("view", None)  # the torch rules replace the tensors: views would go stale
            return st
        view = self._cache.get("view")
        if view is None or view[0] is not st:
            view = self._cache["view"] = (st, _arrays.InPlace(st.tensors()))
        return view[1]

    def _const(self, ops: _arrays.Ops, device: torch.device) -> tuple[Any, Any, Any]:
        """``(False, 1.0, NaN)`` as 0-dim arrays, made once: flags and values that rules return unchanged."""
        key = ("const", ops.name, device)
        const = self._cache.get(key)
        if const is None:
            const = self._cache[key] = (
                ops.constant(False, torch.bool, device),
                ops.constant(1.0, torch.float32, device),
                ops.constant(math.nan, torch.float32, device),
            )
        return const

    def _nonfinite(
        self,
        ops: _arrays.Ops,
        s: Any,
        finite: Any,
        scaler_active: bool,
        loss_scale: Tensor | None,
        device: torch.device,
    ) -> tuple[Any, Any, Any]:
        """``(nonfinite, overflow, loss scale)``: under a scaler a non-finite step is an overflow first."""
        false, one, _ = self._const(ops, device)
        if not scaler_active:
            return ~finite, false, one
        s.overflow_run = ops.where(finite, 0.0, s.overflow_run + 1)
        scale = ops.array(loss_scale.to(device).float()) if loss_scale is not None else one
        cfg = self.config
        failing = (s.overflow_run >= cfg.max_consecutive_overflows) | (scale < cfg.min_loss_scale)
        return ~finite & failing, ~finite, scale

    def _exploding(self, ops: _arrays.Ops, s: Any, total: Any, log_total: Any, finite: Any) -> tuple[Any, Any]:
        """``(exploding, z-score)``: the ceiling, and a spike of log-norm against the moving mean/variance."""
        cfg = self.config
        std = ops.sqrt(ops.clamp_min(s.var, 0.1))
        z = (log_total - s.mean) / std
        armed = s.count >= cfg.warmup_steps
        exploding = False
        if cfg.spike_zscore is not None:
            exploding = armed & (z > cfg.spike_zscore)
            if cfg.spike_min_ratio is not None:
                exploding = exploding & (log_total - s.mean >= math.log(cfg.spike_min_ratio))
        if cfg.max_norm is not None:
            exploding = exploding | (total > cfg.max_norm)
        self._learn_level(ops, s, log_total, std, armed, finite)
        return finite & exploding, ops.where(armed, z, math.nan)

    def _growing(self, ops: _arrays.Ops, s: Any, norms: Any, log_total: Any, finite: Any) -> Any:
        """Geometric growth: ``growth_total`` times the smallest of the last finite steps, rising now.

        The total norm is compared with the smallest of the last :data:`GROWTH_WINDOW`
        finite steps, and the step itself must have risen ``growth_step``-fold: a run that
        blows up over a few steps (x10, then x100) is flagged at the step that completes
        x``growth_total``, whatever the non-finite (fp16 overflow) steps in between. The
        per-group rings let a finding name the layers that grew (:meth:`layer_growth`).
        """
        cfg = self.config
        log_groups = ops.log(ops.clamp_min(norms, 1e-38))
        slot = ops.slot(s.growth_seen, GROWTH_WINDOW)
        ops.write_row(s, "total_ring", slot, log_total, finite)
        ops.write_row(s, "group_ring", slot, log_groups, finite)
        low, at = ops.argmin(ops.where(ops.isnan(s.total_ring), math.inf, s.total_ring))
        growth = log_total - low
        self._layer_growth = log_groups - ops.row(s.group_ring, at)
        rising = log_total - s.prev_log >= math.log(cfg.growth_step)  # False before the first finite step (NaN)
        s.growth_seen = s.growth_seen + finite
        s.grow_log = ops.where(finite, growth, s.grow_log)
        s.prev_log = ops.where(finite, log_total, s.prev_log)
        if cfg.growth_total is None:
            return False
        return finite & rising & (growth >= math.log(cfg.growth_total))

    def steps_seen(self) -> Tensor:
        """Finite steps seen so far (0-dim float32 device tensor)."""
        return self._state.count.clone() if self._state is not None else torch.zeros(())

    def growth(self) -> Tensor:
        """Log of the total norm over the smallest of the last finite steps, at the last finite one (0-dim device)."""
        return self._state.grow_log.clone() if self._state is not None else torch.zeros(())

    def deep_shallow_ratio(self) -> Tensor:
        """The median deepest/shallowest norm ratio over the last ``patience`` finite steps (0-dim device).

        What the ``vanish_ratio`` rule compares; NaN until ``patience`` finite steps were seen.
        """
        st = self._state
        if st is None or st.vanish_seen.item() < self.config.patience:  # a host read: for benchmarks, not per step
            return torch.full((), math.nan)
        return torch.exp((st.deep_ring - st.shallow_ring).nanmedian())

    def layer_growth(self) -> Tensor:
        """Per group, log of its norm at the last update over its norm at the window's smallest step (device)."""
        growth = getattr(self, "_layer_growth", None)
        return torch.as_tensor(growth) if growth is not None else torch.zeros(0)

    def _learn_level(self, ops: _arrays.Ops, s: Any, log_total: Any, std: Any, armed: Any, finite: Any) -> None:
        """Move the log-norm mean/variance with finite steps only, a spike capped at mean + ``spike_zscore`` std."""
        alpha = self.config.ema_alpha
        cap = s.mean + (self.config.spike_zscore or math.inf) * std
        x = ops.where(armed, ops.minimum(log_total, cap), log_total)
        first = s.count == 0
        delta = x - s.mean
        new_mean = ops.where(first, x, s.mean + alpha * delta)
        new_var = ops.where(first, 0.0, (1 - alpha) * (s.var + alpha * delta * delta))
        s.mean = ops.where(finite, new_mean, s.mean)
        s.var = ops.where(finite, new_var, s.var)
        s.count = s.count + finite

    def _vanishing(
        self, ops: _arrays.Ops, s: Any, present: tuple[bool, ...], norms: Any, finite: Any, device: torch.device
    ) -> tuple[Any, Any]:
        """``(vanishing, ratio)``: medians over a window of the deepest and shallowest layers with a gradient."""
        cfg = self.config
        ends = self._cache.get(("ends", present))
        if ends is None:  # the first and last groups with a gradient, once per layout
            with_grad = [i for i, p in enumerate(present) if p]
            ends = self._cache[("ends", present)] = (with_grad[0], with_grad[-1]) if len(with_grad) > 1 else None
        if ends is None:
            false, _, nan = self._const(ops, device)
            return false, nan
        log_shallow = ops.log(ops.clamp_min(norms[ends[0]], 1e-38))
        log_deep = ops.log(ops.clamp_min(norms[ends[1]], 1e-38))
        slot = ops.slot(s.vanish_seen, cfg.patience)
        ops.write_row(s, "shallow_ring", slot, log_shallow, finite)
        ops.write_row(s, "deep_ring", slot, log_deep, finite)
        s.vanish_seen = s.vanish_seen + finite
        full = s.vanish_seen >= cfg.patience
        log_ratio = ops.nanmedian(s.deep_ring - s.shallow_ring)
        vanishing = self._const(ops, device)[0]
        if cfg.vanish_ratio is not None:
            vanishing = full & (log_ratio > math.log(cfg.vanish_ratio))
        if cfg.vanish_floor is not None:
            floor = math.log(cfg.vanish_floor)
            low = (ops.nanmedian(s.shallow_ring) < floor) & (ops.nanmedian(s.deep_ring) >= floor)
            vanishing = vanishing | (full & low)
        return vanishing, ops.exp(log_ratio)

    def _dead(
        self, ops: _arrays.Ops, s: Any, present: tuple[bool, ...], norms: Any, finite: Any, device: torch.device
    ) -> Any:
        """Whether a group that has gradients was all-zero for ``dead_patience`` finite steps in a row."""
        key = ("present", ops.name, present, device)
        has = self._cache.get(key)
        if has is None:  # built once per layout: no host-to-device copy per step
            has = self._cache[key] = ops.constant(present, torch.bool, device)
        zero_now = (norms == 0) & has  # a norm is 0 exactly when every element is
        dead_run = ops.where(zero_now, s.dead_run + 1, 0.0)
        s.dead_run = ops.where(finite, dead_run, s.dead_run)
        return (s.dead_run >= self.config.dead_patience).any()

    def _dead_units(self, ops: _arrays.Ops, s: Any, units: UnitStats | None, finite: Any) -> Any:
        """Whether some layer has ``dead_unit_share`` of its units zero for ``dead_patience`` finite steps in a row.

        A unit's run grows on a step where its gradient is zero while its layer's is not,
        resets when it is non-zero, and holds on steps that tell nothing (no gradient, a
        whole-zero layer gradient, a non-finite step). Units of layers without a bias,
        beyond :data:`~lightning_gradguard.stats.UNIT_WEIGHTS_PER_STEP` such weights, are
        looked at in turns, every ``k`` steps: a zero look then counts ``k`` steps, and such a
        unit needs two zero looks in a row at least.
        """
        self._unit_shares = None
        share = self.config.dead_unit_share
        if units is None or share is None or not units.num_units:
            return False
        a = ops.array
        looked = a(units.looked)
        seg = ops.take(s.unit_run, looked)
        new = ops.where(a(units.zero), seg + a(units.every), ops.where(a(units.nonzero), 0.0, seg))
        ops.write_at(s, "unit_run", looked, new, finite)
        # two looks at least: a unit looked at every k steps is not called dead on a single zero look;
        # built once per layout (``every_all`` is made once per layout, see UnitStats.take)
        key = ("layout", ops.name, id(units.every_all))
        cached = self._cache.get(key)
        if cached is None or cached[0] is not units.every_all:
            patience = float(self.config.dead_patience)
            every_all = a(units.every_all)
            need = ops.where(every_all > 1, ops.clamp_min(2 * every_all, patience), patience)
            per_group = ops.constant(units.per_group, torch.float32, units.every_all.device)
            cached = self._cache[key] = (units.every_all, need, ops.clamp_min(per_group, 1), (per_group > 0).any())
        _, need, per_group, any_units = cached
        dead = ops.f32(s.unit_run >= need)
        self._unit_shares = ops.add_at(a(units.group), dead, len(units.per_group)) / per_group
        return (self._unit_shares >= share).any() & any_units


# --------------------------------------------------------------------------------------
# Findings and advice
# --------------------------------------------------------------------------------------

_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.LogSigmoid)
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_DEEP_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class ModelTraits:
    """What :func:`advise` looks at in a model."""

    saturating: tuple[str, ...]
    plain_rnn: bool
    gated_rnn: bool
    normalized: bool
    transformer: bool
    depth: int
    #: skip connections in the forward pass (``None``: unknown; transformer layers have them)
    skips: int | None = None

    @property
    def residual(self) -> bool:
        return bool(self.skips) or self.transformer

    @classmethod
    def of(cls, model: nn.Module | None, skips: int | None = None) -> ModelTraits:
        if model is None:
            return cls((), False, False, False, False, 0, skips)
        saturating: list[str] = []
        plain_rnn = gated_rnn = normalized = transformer = False
        depth = 0
        for module in model.modules():
            if isinstance(module, _SATURATING) and type(module).__name__ not in saturating:
                saturating.append(type(module).__name__)
            elif isinstance(module, nn.RNN):
                plain_rnn = True
            elif isinstance(module, (nn.LSTM, nn.GRU)):
                gated_rnn = True
            elif isinstance(module, _NORMS):
                normalized = True
            elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                transformer = True
            if isinstance(module, _DEEP_LAYERS):
                depth += 1
        return cls(tuple(saturating), plain_rnn, gated_rnn, normalized, transformer, depth, skips)


def advise(
    kind: str,
    model: nn.Module | None,
    *,
    scaler_active: bool = False,
    depth_problem: bool = False,
    skips: int | None = None,
) -> list[str]:
    """Remedies for a ``kind`` of finding that fit ``model``'s modules.

    ``depth_problem``: an explosion that grows layer by layer toward the input, or one
    present at the first step, before any update: the initialisation and normalisation
    come first there, the learning rate last. ``skips``: the skip connections the
    forward pass showed (:attr:`~lightning_gradguard.stats.ForwardOrder.skips`), which
    ``model``'s modules do not: a model that has them is not told to add residuals.

    Example:
        >>> from torch import nn
        >>> advise("vanishing", nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))[0]
        'replace the Sigmoid hidden activations with ReLU/GELU and use He (kaiming) initialisation'
    """
    t = ModelTraits.of(model, skips)
    out: list[str] = []
    if kind in ("vanishing", "dead"):
        if t.saturating:
            acts = "/".join(t.saturating)
            out.append(f"replace the {acts} hidden activations with ReLU/GELU and use He (kaiming) initialisation")
        if t.plain_rnn:
            out.append("replace nn.RNN with nn.LSTM or nn.GRU, whose gates keep gradients alive over long sequences")
        if t.depth >= 8 and not t.normalized:
            what = (
                "add LayerNorm/BatchNorm" if t.residual else "add residual (skip) connections and LayerNorm/BatchNorm"
            )
            out.append(f"{t.depth} stacked Linear/Conv layers without normalisation: {what}")
        elif t.depth >= 8 and not t.saturating and not t.residual:
            out.append("add residual (skip) connections so gradients reach the first layers directly")
        if kind == "dead":
            out.append(
                "an all-zero gradient means no signal reaches the layer: dead ReLUs (try LeakyReLU/GELU, a lower "
                "learning rate), an output that is detached or unused, or an activation underflowing to exactly 0"
            )
        out.append("check the initialisation scale: Xavier for tanh/sigmoid, He for ReLU, orthogonal for RNNs")
    elif kind == "exploding" and depth_problem:
        out.append(
            "each layer amplifies the signal (weights too large for the depth): use a variance-preserving "
            "initialisation (Xavier/He; orthogonal for RNNs) or scale down the deeper layers' init"
        )
        if not t.normalized:
            residual = "" if t.residual else " and residual connections"
            out.append(f"add normalisation (LayerNorm/BatchNorm){residual} between the layers")
        out.append(
            "clip gradients by norm meanwhile: lightning_gradguard.AdaptiveClipper(mode='zscore'); a lower "
            "learning rate only delays a depth explosion"
        )
        if t.plain_rnn or t.gated_rnn:
            out.append("recurrent nets explode through repeated weight_hh products: orthogonal init, norm clipping")
        if t.plain_rnn:
            out.append("nn.LSTM/nn.GRU are more stable than a plain nn.RNN")
    elif kind == "exploding":
        out.append(
            "clip gradients by norm: lightning_gradguard.AdaptiveClipper(mode='zscore') "
            "or Trainer(gradient_clip_val=1.0)"
        )
        out.append("lower the learning rate or add a warm-up")
        if t.plain_rnn or t.gated_rnn:
            out.append("recurrent nets explode through repeated weight_hh products: orthogonal init, norm clipping")
        if t.plain_rnn:
            out.append("nn.LSTM/nn.GRU are more stable than a plain nn.RNN")
        if not t.normalized and t.depth >= 8:
            out.append("add normalisation (LayerNorm/BatchNorm) to keep activations in range")
        out.append("check the initialisation scale (weights too large make every layer amplify)")
    elif kind in ("nonfinite", "overflow"):
        out.append("check the batch for NaN/Inf (the crash dump holds the first micro-batch that went non-finite)")
        out.append("check the loss for log(0), division by zero or sqrt of a negative; add an epsilon")
        out.append("lower the learning rate; a diverged step makes the next one non-finite")
        if scaler_active or kind == "overflow":
            out.append(
                "fp16 overflows above 65504: prefer bf16 ('bf16-mixed'), or a GradScaler with a lower "
                "init_scale; keep losses and softmax in float32"
            )
        out.append("clip gradients (AdaptiveClipper) so a spike cannot turn into Inf")
    return out


# --------------------------------------------------------------------------------------
# Findings: one builder per kind
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """The host copies a finding is built from (gathered only when a flag is up).

    Attributes:
        host: the step's per-group statistics on the host.
        reading: the step's :class:`Reading`.
        config: the detector's settings.
        present: per group, whether it had a gradient.
        scaler_active: an enabled fp16 ``GradScaler`` was in use.
        dead_groups: per group, whether it is dead.
        overflow_run: fp16 overflow steps in a row (``None`` without a scaler).
        layer_growth: per group, log of its norm over its norm at the smallest of the last
            :data:`GROWTH_WINDOW` finite steps.
        growth: the total norm over the smallest of the last finite steps.
        unit_shares: per group, the share of its units that are dead.
        units_per_group: per group, its number of watched units.
        steps_seen: finite steps the detector has seen, this one included.
        ordered_by: how the groups are ordered (``Grouping.ordered_by``: ``"untraced"``
            when the forward pass was looked for and could not be traced).
        skips: skip connections seen in the forward pass (``Grouping.skips``; ``None``:
            not looked at).
    """

    host: HostStats
    reading: Reading
    config: DetectorConfig
    present: tuple[bool, ...]
    scaler_active: bool = False
    dead_groups: tuple[bool, ...] = ()
    overflow_run: int | None = None
    layer_growth: tuple[float, ...] = ()
    growth: float = 1.0
    unit_shares: tuple[float, ...] = ()
    units_per_group: tuple[int, ...] = ()
    steps_seen: int = 0
    ordered_by: str = "forward"
    skips: int | None = None

    @classmethod
    def collect(
        cls,
        detector: HealthDetector,
        stats: GroupedStats,
        reading: Reading,
        *,
        scaler_active: bool = False,
        units: UnitStats | None = None,
    ) -> Evidence:
        """The statistics and the detector's dead groups and overflow run, in one host copy."""
        host = stats.to_host(
            extra=[
                detector.dead_groups(),
                detector.overflow_run(),
                detector.layer_growth(),
                detector.growth(),
                detector.dead_unit_shares(),
                detector.steps_seen(),
            ]
        )
        dead, (run,), growth, (total_growth,), shares, (seen,) = host.extras
        return cls(
            host=host,
            reading=reading,
            config=detector.config,
            present=stats.present,
            scaler_active=scaler_active,
            dead_groups=tuple(d > 0 for d in dead),
            overflow_run=int(run) if scaler_active else None,
            layer_growth=tuple(growth),
            growth=math.exp(total_growth) if math.isfinite(total_growth) else 1.0,
            unit_shares=tuple(shares),
            units_per_group=units.per_group if units is not None else (),
            steps_seen=int(seen),
            ordered_by=stats.grouping.ordered_by,
            skips=stats.grouping.skips,
        )

    @property
    def names(self) -> list[str]:
        """The groups that had a gradient, in depth order."""
        return [n for n, p in zip(self.host.group_norms, self.present) if p]

    def norms_of(self, names: Iterable[str]) -> list[tuple[str, float]]:
        """``(name, norm)`` of each named group."""
        return [(n, self.host.group_norms[n]) for n in names]


class _Draft(NamedTuple):
    """What a builder contributes to a :class:`Finding`."""

    summary: str
    layers: list[tuple[str, float]]
    ratio: float | None = None
    zscore: float | None = None
    toward_input: bool = False
    depth_problem: bool = False
    units: list[tuple[str, float, int]] = []  # noqa: RUF012 - never mutated


def _nonfinite_finding(ev: Evidence) -> _Draft:
    layers = ev.norms_of(ev.host.nonfinite_groups)
    summary = f"NaN/Inf in {len(layers)} layer(s), first {layers[0][0]}" if layers else "the training loss is NaN/Inf"
    if ev.scaler_active:
        scale = ev.reading.loss_scale
        summary += (
            f" after {ev.overflow_run} fp16 overflow steps in a row (loss scale {scale:.3g})"
            if ev.overflow_run
            else f" and the loss scale fell to {scale:.3g}"
        )
    return _Draft(summary + "; the step was skipped, the weights are untouched", layers)


def _overflow_finding(ev: Evidence) -> _Draft:
    summary = (
        f"fp16 overflow (loss scale {ev.reading.loss_scale:.3g}); the GradScaler skips this step and lowers "
        "the scale — normal now and then"
    )
    return _Draft(summary, ev.norms_of(ev.host.nonfinite_groups))


def _exploding_finding(ev: Evidence) -> _Draft:
    cfg, total, z = ev.config, ev.reading.total_norm, ev.reading.zscore
    parts = [f"total norm {total:.3g}"]
    if cfg.max_norm is not None and total > cfg.max_norm:
        parts.append(f"above the ceiling max_norm={cfg.max_norm:g}")
    spike = math.isfinite(z) and cfg.spike_zscore is not None and z > cfg.spike_zscore
    if spike:
        parts.append(f"a spike {z:.1f} standard deviations above the run's recent log-norm")
    if ev.growth >= 10:
        parts.append(f"{ev.growth:.3g}x the smallest of the last {GROWTH_WINDOW} steps (geometric growth)")
    layers, toward_input = _exploding_layers(ev)
    summary = ", ".join(parts)
    at_start = ev.steps_seen <= 1  # this is the first finite step: no update has happened yet
    if at_start:
        summary += (
            "; at the first step, before any update: the model as initialised amplifies the gradient "
            "(initialisation or architecture, not the learning rate)"
        )
    elif toward_input:
        first, last = layers[0][0], ev.names[-1]
        summary += (
            f"; it grows toward the input ({first}: {ev.host.group_norms[first]:.3g} vs {last}: "
            f"{ev.host.group_norms[last]:.3g}): the layers amplify the gradient on its way back, a depth "
            "(initialisation/normalisation) problem rather than a learning-rate one"
        )
    return _Draft(
        summary, layers, zscore=z if spike else None, toward_input=toward_input, depth_problem=toward_input or at_start
    )


def _exploding_layers(ev: Evidence) -> tuple[list[tuple[str, float]], bool]:
    """The layers that grew (else the largest), in depth order, and whether the norm grows toward the input.

    A layer counts as grown when its norm rose at least half as much (in log) as the most
    grown layer's, and at least ``growth_step``-fold. Without growth (a steady norm over the
    ceiling), the layers within 10x of the largest norm are named.
    """
    names, norms = ev.names, ev.host.group_norms
    growth = dict(zip(ev.host.group_norms, ev.layer_growth)) if ev.layer_growth else {}
    grown = {n: growth[n] for n in names if math.isfinite(growth.get(n, math.nan))}
    top = max(grown.values(), default=0.0)
    floor = max(0.5 * top, math.log(ev.config.growth_step))
    picked = [n for n in names if grown.get(n, -math.inf) >= floor]
    if not picked:
        peak = max((norms[n] for n in names), default=0.0)
        picked = [n for n in names if norms[n] >= 0.1 * peak]
    toward_input = False
    if len(names) >= 3:
        shallow, deep = norms[names[0]], norms[names[-1]]
        rising = sum(norms[a] >= norms[b] for a, b in itertools.pairwise(names))  # steps where the shallower is larger
        toward_input = shallow >= 10 * deep and rising >= 0.6 * (len(names) - 1)
    return ev.norms_of(picked), toward_input


def _vanishing_finding(ev: Evidence) -> _Draft:
    cfg, names, norms = ev.config, ev.names, ev.host.group_norms
    deep = norms[names[-1]] if names else math.nan
    limit = deep / cfg.vanish_ratio if cfg.vanish_ratio else (cfg.vanish_floor or 0.0)
    if cfg.vanish_floor is not None:
        limit = max(limit, cfg.vanish_floor)
    layers = [(n, v) for n, v in norms.items() if v < limit and n in names] or ev.norms_of(names[:1])
    shallow = norms[names[0]]
    now = deep / shallow if shallow > 0 else math.inf
    summary = (
        f"the shallowest layer's gradient is {now:.3g}x smaller than the deepest's "
        f"({names[0]}: {shallow:.3g} vs {names[-1]}: {deep:.3g}; median over the last "
        f"{cfg.patience} steps: {ev.reading.ratio:.3g}x)"
    )
    return _Draft(summary, layers, ratio=ev.reading.ratio)


def _dead_finding(ev: Evidence) -> _Draft:
    cfg = ev.config
    layers = ev.norms_of(n for n, d in zip(ev.host.group_norms, ev.dead_groups) if d)
    parts = []
    if layers:
        parts.append(f"{len(layers)} layer(s) received an all-zero gradient for {cfg.dead_patience} steps in a row")
    units: list[tuple[str, float, int]] = []
    if cfg.dead_unit_share is not None and ev.unit_shares:
        for name, share, count in zip(ev.host.group_norms, ev.unit_shares, ev.units_per_group):
            if count and share >= cfg.dead_unit_share:
                units.append((name, share, count))
    if units:
        worst = max(units, key=lambda u: u[1])
        parts.append(
            f"{len(units)} layer(s) with at least {cfg.dead_unit_share:.0%} of their units (output rows) dead: an "
            f"exactly-zero gradient for {cfg.dead_patience} steps in a row ({worst[0]}: {worst[1]:.0%} of {worst[2]})"
        )
        layers = layers + [kv for kv in ev.norms_of(u[0] for u in units) if kv not in layers]
        order = {n: i for i, n in enumerate(ev.host.group_norms)}
        layers.sort(key=lambda kv: order[kv[0]])
    return _Draft("; ".join(parts) or "dead layers", layers, units=units)


#: kind -> the builder of its finding's summary, layers and numbers.
_BUILDERS: dict[str, Callable[[Evidence], _Draft]] = {
    "nonfinite": _nonfinite_finding,
    "exploding": _exploding_finding,
    "vanishing": _vanishing_finding,
    "dead": _dead_finding,
    "overflow": _overflow_finding,
}


def build_finding(kind: str, step: int, evidence: Evidence, *, model: nn.Module | None = None) -> Finding:
    """Turn a flagged step into a :class:`Finding` (host side; runs only when a flag is up).

    Raises:
        ValueError: if ``kind`` is not one of :data:`KINDS`.
    """
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    draft = builder(evidence)
    summary = draft.summary
    if kind in ("vanishing", "exploding") and evidence.ordered_by == "untraced":
        summary += " (layers in registration order: the forward pass could not be traced, so depth is a guess)"
    return Finding(
        kind=kind,
        step=step,
        summary=summary,
        layers=draft.layers,
        total_norm=evidence.reading.total_norm,
        ratio=draft.ratio,
        zscore=draft.zscore,
        toward_input=draft.toward_input,
        units=list(draft.units),
        advice=advise(
            kind,
            model,
            scaler_active=evidence.scaler_active,
            depth_problem=draft.depth_problem,
            skips=evidence.skips,
        ),
    )
