"""The clipping modes of :class:`~lightning_gradguard.AdaptiveClipper`, one class each.

A mode owns its arguments (which it accepts, their defaults, their checks), the state it
keeps per optimizer (a learned threshold, an AGC plan), that state's ``state_dict``, and
:meth:`ClipMode.apply`, which clips one optimizer's gradients from the shared snapshot
and says what it did in a :class:`ClipResult`. The callback keeps counters, logs and
checkpoints; nothing here needs a ``Trainer``.

Example:
    >>> import torch
    >>> from lightning_gradguard.stats import ParamSet, take_snapshot
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> p.grad = torch.tensor([3.0, 4.0])
    >>> mode = MODES["norm"](max_norm=1.0)
    >>> result = mode.apply(Step.of(take_snapshot(ParamSet((p,), ("p",)))))
    >>> result.coef, result.post, p.grad
    (tensor(0.2000), tensor(1.), tensor([0.6000, 0.8000]))
    >>> MODES["percentile"]().settings["window"]
    1000
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_gradguard import _arrays, _validation
from lightning_gradguard.clipping.agc import UnitwiseClip
from lightning_gradguard.clipping.ops import clip_by_value_, clip_coefficient, coalesce_sparse_grads_, scale_
from lightning_gradguard.clipping.thresholds import (
    LearnedThreshold,
    PercentileThreshold,
    ZScoreThreshold,
    ceiling,
    check_norm_bounds,
)
from lightning_gradguard.stats import GradSnapshot, ParamSet, tensor_stats, total_norm

__all__ = [
    "MODES",
    "AgcMode",
    "Arg",
    "ClipMode",
    "ClipResult",
    "NormMode",
    "PercentileMode",
    "Step",
    "ValueMode",
    "ZScoreMode",
]

# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Arg:
    """One argument of a mode: its check (which returns the value to keep) and its default.

    ``None`` given means "the default"; ``required`` arguments have none.
    """

    name: str
    check: Check
    default: Any = None
    required: bool = False

    def with_default(self, default: Any) -> Arg:
        return replace(self, default=default)


def _bound(low: float) -> Check:
    """A norm bound or factor (``max_norm``, ``skip_factor``, ...): a finite number > ``low``, kept as a float."""
    return lambda name, value: _validation.number(name, value, low=low, allow_none=True)


def _statistic(**bounds: Any) -> Check:
    """An argument that defines the statistics (``percentile``, ...): checked, kept as written.

    An ``int`` stays an ``int``, so ``state_key`` (and the checkpoint entry it names) shows
    the value given.
    """

    def check(name: str, value: Any) -> Any:
        _validation.number(name, value, allow_none=True, **bounds)
        return value

    return check


def _count(low: int) -> Check:
    return lambda name, value: _validation.integer(name, value, low=low, allow_none=True)


def _patterns(name: str, value: Any) -> list[str] | None:
    _validation.patterns(name, value)
    return None if value is None else list(value)


#: the learned modes' ceiling: never a weaker clip than ``Trainer(gradient_clip_val=1.0)``
DEFAULT_MAX_NORM = 1.0
#: during warm-up, the threshold is at most this many times the median of the norms seen so far
DEFAULT_WARMUP_FACTOR = 10.0
#: at most this many steps in a row are skipped by ``skip_factor``; the next ones are clipped
DEFAULT_SKIP_LIMIT = 3

MAX_NORM = Arg("max_norm", ceiling)  # math.inf: no ceiling, where None means the default
WARMUP_STEPS = Arg("warmup_steps", _count(0))
WARMUP_MAX_NORM = Arg("warmup_max_norm", _bound(0.0))
WARMUP_FACTOR = Arg("warmup_factor", ceiling)  # math.inf: no warm-up bound
MIN_NORM = Arg("min_norm", _bound(0.0))
SKIP_FACTOR = Arg("skip_factor", _bound(1.0))
SKIP_LIMIT = Arg("skip_limit", _count(1))
#: what the learned modes take besides their statistics, in this order, with their defaults
#: (chosen on benchmarks/bench_clipping_tasks.py; README "Does it help?")
LEARNED_ARGS = (
    WARMUP_STEPS.with_default(25),
    WARMUP_MAX_NORM,
    WARMUP_FACTOR.with_default(DEFAULT_WARMUP_FACTOR),
    MAX_NORM.with_default(DEFAULT_MAX_NORM),
    MIN_NORM,
    SKIP_FACTOR,
    SKIP_LIMIT.with_default(DEFAULT_SKIP_LIMIT),
)


# --------------------------------------------------------------------------------------
# One step in, one result out
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One optimizer's step as a mode sees it.

    Attributes:
        snap: the shared snapshot (pre-clip, unscaled norms of this optimizer's gradients).
        pre: ``snap.total_norm``, computed once.
        finite: ``snap.all_finite``.
        index: the optimizer's position in the trainer.
        count: optimizer steps this optimizer took so far, this one included.
        measure: whether the norm after clipping is wanted (a logging step), where it
            costs a second pass.
        agree: turns this rank's decision to skip into the decision of every rank.
        agree_on_device: the same for a 0-dim bool device tensor, without a host read. When
            given, a mode decides to skip on the device (:class:`ClipResult` then holds
            tensors) and the caller skips the step from that flag; ``None``: decide on the
            host, with ``agree``.
        over_streak: how many steps in a row, just before this one, were above
            ``skip_factor`` times the bound (skipped, or clipped once ``skip_limit`` was
            reached); a 0-dim int64 device tensor with ``agree_on_device``.
    """

    snap: GradSnapshot
    pre: Tensor
    finite: Tensor
    index: int = 0
    count: int = 1
    measure: bool = True
    agree: Callable[[bool], bool] = bool
    agree_on_device: Callable[[Tensor], Tensor] | None = None
    over_streak: int | Tensor = 0

    @classmethod
    def of(cls, snap: GradSnapshot, **kwargs: Any) -> Step:
        return cls(snap=snap, pre=snap.total_norm, finite=snap.all_finite, **kwargs)

    @property
    def grads(self) -> list[Tensor | None]:
        return self.snap.params.grads()

    def scale_(self, coef: Tensor) -> None:
        """Multiply the gradients in place by ``coef``, with the snapshot's buckets when they are still the same."""
        grads = self.grads
        scale_(grads, coef, self.snap.buckets_of(grads))

    @property
    def inv_scale(self) -> Tensor | None:
        return None if self.snap.scale is None else self.snap.scale.reciprocal()


@dataclass
class ClipResult:
    """What a mode did at one step (device tensors: reading them is the caller's choice).

    Attributes:
        threshold: the bound in force (a total norm; the element bound in ``value``
            mode), or ``None`` when nothing bounds the step.
        clipped: 0-dim bool, whether the gradients were scaled down.
        coef: post-clip norm / pre-clip norm (0 on a skipped step), or ``None`` when unknown.
        post: the total norm after clipping, or ``None`` when not measured.
        skipped: the step is to be skipped (its gradients dropped by the caller, or, when
            decided on the device, a 0-dim bool tensor the caller skips the step from).
        over_skip: the step was above ``skip_factor`` times the bound (skipped, or clipped
            because ``skip_limit`` steps in a row were skipped already); ``None`` for a
            non-finite step, which says nothing about a streak of outliers. Decided on the
            device: a 0-dim bool tensor, false on a non-finite step (whose finiteness the
            caller has in :attr:`Step.finite`).
        extra: more metrics to log, by name (``clipped_units``).
        warnings: messages for the user (once each).
    """

    threshold: Tensor | float | None
    clipped: Tensor
    coef: Tensor | None = None
    post: Tensor | None = None
    skipped: bool | Tensor = False
    over_skip: bool | Tensor | None = False
    extra: dict[str, Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, step: Step, threshold: Tensor | float | None, clipped: Tensor, **kwargs: Any) -> ClipResult:
        """The result, with ``post`` from ``coef`` or ``coef`` from ``post`` when only one is known."""
        result = cls(threshold, clipped, **kwargs)
        if result.post is None and result.coef is not None:
            result.post = step.pre * result.coef
        elif result.coef is None and result.post is not None:
            ratio = result.post / step.pre.clamp_min(torch.finfo(torch.float32).tiny)
            result.coef = torch.where(step.finite & (step.pre > 0), ratio, 1.0)
        return result


def current_norm(step: Step) -> Tensor:
    """Total norm of the gradients as they are now, unscaled (a second pass: only where needed)."""
    params: ParamSet = step.snap.params
    norms, _ = tensor_stats(
        step.grads, params.reduce_keys, device=step.snap.norms.device, inv_scale=step.inv_scale, cache=params.cache
    )
    return total_norm(norms)


# --------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------


class ClipMode:
    """Base class of the modes: settings from the callback's arguments, no state.

    Args:
        **given: the callback's mode arguments; ``None`` (or absent) means the default.

    Raises:
        ValueError: for an argument of another mode, a missing required one or a value
            out of range; the message names the argument and the value.
    """

    name: ClassVar[str]
    #: the arguments this mode takes, in ``repr`` order
    args: ClassVar[tuple[Arg, ...]]
    #: the arguments that define the saved statistics (a clipper resumes another's state only if they agree)
    statistics: ClassVar[tuple[str, ...]]

    def __init__(self, **given: Any) -> None:
        #: every argument of the mode, defaults filled in
        self.settings: dict[str, Any] = self.resolve(given)

    @classmethod
    def accepts(cls, name: str) -> bool:
        return any(arg.name == name for arg in cls.args)

    @classmethod
    def resolve(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``given`` and fill in the defaults; see the class docstring."""
        for name, value in given.items():
            if value is not None and not cls.accepts(name):
                users = tuple(m for m, mode in MODES.items() if mode.accepts(name))
                raise ValueError(
                    f"`{name}` is only used with mode in {users}, got mode={cls.name!r} and {name}={value!r}."
                )
        settings = {}
        for arg in cls.args:
            value = given.get(arg.name)
            if value is None and arg.required:
                raise ValueError(f"`{arg.name}` is required with mode={cls.name!r} (a finite number > 0), got None.")
            settings[arg.name] = arg.check(arg.name, arg.default if value is None else value)
        check_norm_bounds(settings.get("min_norm"), settings.get("max_norm"))
        return settings

    def identity(self) -> dict[str, Any]:
        """The mode and the settings that define its saved statistics."""
        return {"mode": self.name, **{name: self.settings[name] for name in self.statistics}}

    def apply(self, step: Step) -> ClipResult:
        """Clip the gradients of ``step.snap.params`` in place."""
        raise NotImplementedError

    def start(self) -> None:
        """A fit begins (parameters may have changed)."""

    def threshold_rule(self, index: int) -> LearnedThreshold | None:
        """The learned threshold of optimizer ``index``, if the mode learns one and it exists yet."""
        return None

    def host_hints(self, index: int) -> list[Tensor]:
        """Device values worth reading whenever the caller copies to the host anyway."""
        return []

    def take_hints(self, index: int, values: list[float]) -> None:
        """The values of :meth:`host_hints`, read on the host."""

    def state_dict(self) -> dict[int, Any]:
        """The learned state, per optimizer index."""
        return {}

    def load_state_dict(self, state: Mapping[Any, Any]) -> None:
        """Restore :meth:`state_dict` (applied lazily, at each optimizer's next step)."""


class NormMode(ClipMode):
    """``norm``: the total norm at most ``max_norm``, direction kept."""

    name = "norm"
    args = (replace(MAX_NORM, required=True),)
    statistics = ("max_norm",)

    def apply(self, step: Step) -> ClipResult:
        threshold = self.settings["max_norm"]
        coef = clip_coefficient(step.pre, threshold)
        step.scale_(coef)
        return ClipResult.of(step, threshold, coef < 1, coef=coef)


class ValueMode(ClipMode):
    """``value``: every element clamped to ``[-clip_value, clip_value]``; complex parameters are refused."""

    name = "value"
    args = (Arg("clip_value", _bound(0.0), required=True),)
    statistics = ("clip_value",)

    def apply(self, step: Step) -> ClipResult:
        bound = self.settings["clip_value"]
        params = step.snap.params
        _check_elementwise(params)
        coalesce_sparse_grads_(params.params)  # each stored entry clamped once
        clip_by_value_(step.grads, bound, scale=step.snap.scale, finite=step.finite)
        clipped = step.finite & (step.snap.max_abs.max() > bound)
        return ClipResult.of(step, bound, clipped, post=current_norm(step) if step.measure else None)


def _check_elementwise(params: ParamSet) -> None:
    """Refuse value clipping of complex parameters, naming them (checked once per parameter set)."""
    if params.cache.get("elementwise_ok"):
        return
    complex_names = [n for n, p in zip(params.names, params.params) if p.is_complex()]
    if complex_names:
        raise ValueError(
            f"AdaptiveClipper(mode='value') cannot clip the complex parameter(s) {complex_names}: clamping each "
            "element to [-clip_value, clip_value] has no meaning for complex numbers. Use mode='norm' or "
            "'agc', or give these parameters to another optimizer."
        )
    params.cache["elementwise_ok"] = True


class _LearnedMode(ClipMode):
    """A threshold learned per optimizer from its own pre-clip norms, optionally skipping spikes."""

    rule_class: ClassVar[type[LearnedThreshold]]

    def __init__(self, **given: Any) -> None:
        super().__init__(**given)
        self._rules: dict[int, LearnedThreshold] = {}
        self._restored: dict[int, dict[str, Any]] = {}

    def rule(self, index: int, device: torch.device) -> LearnedThreshold:
        """The threshold of optimizer ``index`` on ``device``, created (from a restored state) when needed."""
        rule = self._rules.get(index)
        if rule is None:
            kwargs = {k: v for k, v in self.settings.items() if k not in ("skip_factor", "skip_limit")}
            rule = self._rules[index] = self.rule_class(**kwargs, device=device)
            restored = self._restored.pop(index, None)
            if restored is not None:
                rule.load_state_dict(restored)
        elif rule.device != device:
            rule.to(device)
        return rule

    def apply(self, step: Step) -> ClipResult:
        """Clip to the threshold; with ``skip_factor``, skip an outlier instead, ``skip_limit`` steps in a row at most.

        The outlier test compares the norm with the rule's :meth:`~LearnedThreshold.bound`
        (the run's own scale, without ``max_norm``), so that a ceiling below the run's
        ordinary norms does not turn every step into a skip. Past ``skip_limit`` outliers
        in a row the regime has changed rather than spiked: the steps are clipped (and
        learned from) until one is back below the bound. With ``step.agree_on_device`` the
        same decision is taken on the device (:meth:`_skip_on_device`).
        """
        rule = self.rule(step.index, step.pre.device)
        ops = _arrays.ops_for(step.pre.device)  # the rule's arithmetic: numpy scalars on the CPU
        bound = rule.bound_in(ops)  # stays in ops' terms: observe() takes it as it is
        threshold = rule.cap_in(ops, bound)
        coef = clip_coefficient(step.pre, threshold)
        threshold = ops.as_tensor(threshold, torch.float32)
        s = self.settings
        over: bool | None = False
        if s["skip_factor"] is not None:
            above = step.finite & (step.pre > s["skip_factor"] * ops.as_tensor(bound, torch.float32))
            if step.agree_on_device is not None:  # an outlier where every rank says so and its own norm is finite
                over_here = step.agree_on_device(above) & step.finite
                return self._skip_on_device(step, rule, bound, threshold, coef, over_here)
            # one host copy: the step's finiteness and its verdict
            finite, above_here = torch.stack([step.finite, above]).tolist()
            verdict = step.agree(bool(above_here))  # a collective: every rank calls it, whatever its step
            # a non-finite step is no evidence either way: it neither extends nor ends a streak
            over = verdict if finite else None
        if over and step.over_streak < s["skip_limit"]:
            rule.observe(step.pre, torch.zeros((), dtype=torch.bool, device=step.pre.device))
            never = torch.zeros((), dtype=torch.bool, device=step.pre.device)
            return ClipResult.of(step, threshold, never, coef=torch.zeros_like(coef), skipped=True, over_skip=True)
        step.scale_(coef)
        rule.observe(step.pre, step.finite, bound)
        return ClipResult.of(step, threshold, coef < 1, coef=coef, over_skip=over)

    def _skip_on_device(
        self, step: Step, rule: LearnedThreshold, bound: Any, threshold: Tensor, coef: Tensor, over: Tensor
    ) -> ClipResult:
        """:meth:`apply`'s skip decision as 0-dim device tensors: no host read at all.

        The host path's rule, written with ``torch.where`` instead of ``if``: an outlier
        (``over``) is skipped while ``over_streak < skip_limit``. A skipped step's gradients
        are scaled by 0 (its reported ``coef``) and it is observed with a false flag, so the
        statistics learn from exactly the steps the host path lets in.
        """
        skip = over & (torch.as_tensor(step.over_streak, device=over.device) < self.settings["skip_limit"])
        coef = torch.where(skip, 0.0, coef)
        step.scale_(coef)
        rule.observe(step.pre, step.finite & ~skip, bound)
        return ClipResult.of(step, threshold, ~skip & (coef < 1), coef=coef, skipped=skip, over_skip=over)

    def threshold_rule(self, index: int) -> LearnedThreshold | None:
        return self._rules.get(index)

    def host_hints(self, index: int) -> list[Tensor]:
        rule = self._rules.get(index)
        return [] if rule is None else [rule.seen]

    def take_hints(self, index: int, values: list[float]) -> None:
        if values:  # lets the rule skip its start-phase work, at no extra copy
            self._rules[index].note_seen(int(values[0]))

    def state_dict(self) -> dict[int, Any]:
        rules: dict[int, Any] = {i: r.state_dict() for i, r in self._rules.items()}
        rules.update({i: s for i, s in self._restored.items() if i not in rules})
        return rules

    def load_state_dict(self, state: Mapping[Any, Any]) -> None:
        self._rules.clear()
        self._restored = {int(i): s for i, s in state.items()}


class PercentileMode(_LearnedMode):
    """``percentile`` (AutoClip): the p-th percentile of the last ``window`` norms; see :class:`PercentileThreshold`."""

    name = "percentile"
    args = (
        Arg("percentile", _statistic(low=0.0, high=100.0), 10.0),
        Arg("window", _count(1), 1000),
        *LEARNED_ARGS,
    )
    statistics = ("percentile", "window")
    rule_class = PercentileThreshold


class ZScoreMode(_LearnedMode):
    """``zscore`` (after ZClip): ``mean + z * std`` of the past norms; see :class:`ZScoreThreshold`."""

    name = "zscore"
    args = (
        Arg("z_threshold", _statistic(low=0.0), 2.5),
        Arg("ema_decay", _statistic(low=0.0, high=1.0, high_inclusive=False), 0.97),
        *LEARNED_ARGS,
    )
    statistics = ("z_threshold", "ema_decay")
    rule_class = ZScoreThreshold


class AgcMode(ClipMode):
    """``agc``: unit-wise clipping relative to the weights (:class:`UnitwiseClip`).

    ``warmup_steps`` optimizer steps without AGC come first (clipped to ``warmup_max_norm``
    if given); ``max_norm`` is a total-norm ceiling applied after AGC.
    """

    name = "agc"
    args = (
        Arg("agc_clipping", _statistic(low=0.0), 0.01),
        Arg("agc_eps", _statistic(low=0.0), 1e-3),
        Arg("agc_exclude", _patterns),
        WARMUP_STEPS.with_default(0),
        WARMUP_MAX_NORM,
        MAX_NORM,
    )
    statistics = ("agc_clipping", "agc_eps")

    def __init__(self, **given: Any) -> None:
        super().__init__(**given)
        self._plans: dict[int, UnitwiseClip] = {}
        self._warned: set[str] = set()

    def start(self) -> None:
        self._plans.clear()  # built again for this fit's parameters

    def apply(self, step: Step) -> ClipResult:
        s = self.settings
        warm = step.count <= (s["warmup_steps"] or 0)
        threshold = s["max_norm"] if s["max_norm"] != math.inf else None
        if warm and s["warmup_max_norm"] is not None:
            threshold = min(s["warmup_max_norm"], s["max_norm"] or s["warmup_max_norm"])
        clipped = torch.zeros((), dtype=torch.bool, device=step.pre.device)
        extra: dict[str, Tensor] = {}
        warnings: list[str] = []
        post: Tensor | None = step.pre
        if not warm:
            done = self._plan(step.index, step.snap.params, warnings).clip_(
                step.snap.norms, inv_scale=step.inv_scale, finite=step.finite
            )
            clipped = done.clipped_units > 0
            extra["clipped_units"] = done.clipped_units.to(torch.float32) / max(done.units, 1)
            post = current_norm(step) if (threshold is not None or step.measure) else None
        if threshold is not None and post is not None:  # the total-norm ceiling, after AGC
            coef = clip_coefficient(post, threshold)
            step.scale_(coef)
            clipped, post = clipped | (coef < 1), post * coef
        return ClipResult.of(step, threshold, clipped, post=post, extra=extra, warnings=warnings)

    def _plan(self, index: int, params: ParamSet, warnings: list[str]) -> UnitwiseClip:
        agc = self._plans.get(index)
        if agc is None or agc.params is not params:
            s = self.settings
            agc = self._plans[index] = UnitwiseClip(
                params, clipping=s["agc_clipping"], eps=s["agc_eps"], exclude=s["agc_exclude"]
            )
            for pattern in agc.unmatched:
                if pattern not in self._warned:
                    self._warned.add(pattern)
                    warnings.append(
                        f"[gradguard] AdaptiveClipper(agc_exclude=...): the pattern {pattern!r} matches no parameter "
                        f"name of optimizer {index} (names look like {params.names[0]!r}); nothing is excluded by it."
                    )
        return agc


#: The modes by name, in the order the documentation lists them.
MODES: dict[str, type[ClipMode]] = {
    mode.name: mode for mode in (NormMode, ValueMode, PercentileMode, ZScoreMode, AgcMode)
}
