"""AdaptiveClipper: clip gradients by a fixed or learned threshold, robust to NaN steps and resumes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import GradGuardCallback
from lightning_gradguard.policies import (
    MODES,
    LearnedThreshold,
    PercentileThreshold,
    UnitwiseClip,
    ZScoreThreshold,
    check_number,
    clip_by_value_,
    clip_coefficient,
    coalesce_sparse_grads_,
    compile_patterns,
    scale_,
    total_norm_of,
)
from lightning_gradguard.stats import ParamSet, tensor_stats

#: Which optional arguments each mode accepts (the others must stay ``None``).
MODE_ARGS: dict[str, tuple[str, ...]] = {
    "norm": ("max_norm",),
    "value": ("clip_value",),
    "percentile": ("percentile", "window", "warmup_steps", "warmup_max_norm", "max_norm", "min_norm", "skip_factor"),
    "zscore": ("z_threshold", "ema_decay", "warmup_steps", "warmup_max_norm", "max_norm", "min_norm", "skip_factor"),
    "agc": ("agc_clipping", "agc_eps", "agc_exclude", "warmup_steps", "warmup_max_norm", "max_norm"),
}
#: Defaults of the mode-specific arguments left at ``None``.
DEFAULTS: dict[str, Any] = {
    "percentile": 10.0,
    "window": 1000,
    "z_threshold": 2.5,
    "ema_decay": 0.97,
    "agc_clipping": 0.01,
    "agc_eps": 1e-3,
}
#: Default ``warmup_steps`` per mode.
DEFAULT_WARMUP = {"percentile": 25, "zscore": 25, "agc": 0}
_LEARNED = ("percentile", "zscore")
#: The arguments that define a mode's state (and so its ``state_key``).
STATE_ARGS: dict[str, tuple[str, ...]] = {
    "norm": ("max_norm",),
    "value": ("clip_value",),
    "percentile": ("percentile", "window"),
    "zscore": ("z_threshold", "ema_decay"),
    "agc": ("agc_clipping", "agc_eps"),
}
_ARG_NAMES = (
    "max_norm",
    "clip_value",
    "percentile",
    "window",
    "z_threshold",
    "ema_decay",
    "agc_clipping",
    "agc_eps",
    "agc_exclude",
    "warmup_steps",
    "warmup_max_norm",
    "min_norm",
    "skip_factor",
)


@dataclass
class _OptState:
    """What the clipper remembers about one optimizer."""

    steps: int = 0  # optimizer steps seen
    skipped_steps: int = 0
    interval_steps: int = 0  # steps since the last logged one
    interval_clipped: Tensor | int = 0  # of which clipped (device tensor between logs)
    last: dict[str, Tensor | float] = field(default_factory=dict)


class AdaptiveClipper(GradGuardCallback):
    r"""Clip gradients by a fixed or learned threshold, in ``on_before_optimizer_step``.

    Five modes (``mode=...``):

    - ``"norm"``: scale the gradients so that their total L2 norm is at most ``max_norm``
      (what ``Trainer(gradient_clip_val=...)`` does; the direction is kept).
    - ``"value"``: clamp every gradient element to ``[-clip_value, clip_value]``.
    - ``"percentile"`` (AutoClip, Seetharaman et al. 2020): the threshold is the
      ``percentile``-th percentile of the total norms of the last ``window`` steps.
    - ``"zscore"`` (after ZClip, 2025): the threshold is ``mean + z_threshold * std`` of a
      running mean and variance of the (winsorized) total norms; the exact rule is in
      :class:`~lightning_gradguard.policies.ZScoreThreshold`.
    - ``"agc"`` (Brock et al. 2021, NFNets): each unit's gradient norm is bounded by
      ``agc_clipping`` times its weight norm (floored at ``agc_eps``); parameters whose
      name matches a pattern of ``agc_exclude`` (e.g. the final classifier) are left alone.

    Options of the learned modes (``percentile``, ``zscore``): until ``warmup_steps`` norms
    were recorded the threshold is ``warmup_max_norm`` (``None``: no clipping during warm-up;
    a model that explodes within its first steps needs a value here); ``max_norm`` is an
    absolute ceiling at all times; ``min_norm`` is a floor; with ``skip_factor=k`` a step
    whose norm exceeds ``k`` times the threshold is skipped altogether (its gradients are
    dropped, so the optimizer does not update, as large language model training does on
    loss spikes). ``agc`` accepts ``warmup_steps`` (optimizer steps without AGC, clipped to
    ``warmup_max_norm`` if given) and ``max_norm`` (a total-norm ceiling after AGC).

    Every decision uses the shared gradient snapshot (the unscaled, pre-clip norms the
    other gradguard callbacks see), so the clipper computes no norm of its own, and works
    on the gradients the optimizer is about to apply: accumulated, unscaled under fp16
    AMP (or, for optimizers that unscale themselves, still scaled, which it accounts
    for), after DDP's all-reduce, sharded under FSDP2.

    Guarantees:

    - A step with a NaN/Inf gradient (which an fp16 ``GradScaler`` skips) is neither
      clipped nor recorded: the statistics stay finite and the next spike is still
      clipped. (Skipping such a step without a scaler is
      :class:`~lightning_gradguard.VanishExplodeAlarm`'s job.) Steps without any gradient
      are ignored too.
    - Clipping runs on the device with ``torch._foreach`` kernels and a device-side
      coefficient; on steps that do not log, nothing is copied to the host, except with
      ``skip_factor``, which needs one boolean per step (combined across ranks, so every
      rank skips the same steps).
    - The state (statistics and counters, one set per optimizer) is saved in checkpoints;
      a resumed run follows the same thresholds as an uninterrupted one. ``state_key``
      holds every setting, so several clippers fit in one checkpoint; options such as
      ``max_norm`` or ``skip_factor`` may still change on resume (a saved clipper with the
      same mode and statistics arguments is then taken over, with a note).
    - Under DDP and FSDP2 every rank computes the same threshold from the same
      (all-reduced or shard-combined) norm. ``agc`` needs every row of a weight on one
      rank, which FSDP2's default ``Shard(0)`` gives.

    Several clippers on one optimizer each decide on the pre-clip gradient and their
    coefficients multiply, so the result respects every threshold. A ``Trainer`` that
    also clips (``gradient_clip_val``) is refused at ``setup``: use ``max_norm`` instead.

    Logged keys (through every logger of the ``Trainer``, at ``log_every_n_steps``, step =
    ``trainer.global_step``; with several optimizers ``opt<i>/`` follows ``clip/``):

    ==========================  ==============================================================
    ``clip/threshold``          the total-norm threshold in force (``inf`` when nothing
                                bounds it, e.g. during a warm-up without ``warmup_max_norm``);
                                the element bound in ``value`` mode; in ``agc`` mode only with
                                ``max_norm`` or during a warm-up with ``warmup_max_norm``
    ``clip/pre_norm``           total gradient norm before clipping (unscaled)
    ``clip/post_norm``          total norm after clipping (``pre_norm * coef``; 0 on a skipped step)
    ``clip/coef``               ``post_norm / pre_norm`` (1: untouched; 0: step skipped)
    ``clip/clipped_fraction``   fraction of the optimizer steps since the previous logged
                                step (this one included) whose gradients were scaled down
    ``clip/skipped_steps``      steps skipped by ``skip_factor`` so far (learned modes)
    ``clip/clipped_units``      ``agc``: fraction of this rank's units clipped at this step
    ==========================  ==============================================================

    Args:
        mode: ``"norm"``, ``"value"``, ``"percentile"``, ``"zscore"`` (default) or ``"agc"``.
        max_norm: ``norm``: the ceiling (required). ``percentile``/``zscore``/``agc``: an
            optional absolute ceiling on the total norm, at all times.
        clip_value: ``value``: the bound on every element (required).
        percentile: ``percentile``: p in (0, 100]; default 10 (AutoClip's recommendation).
        window: ``percentile``: number of recent norms kept; default 1000.
        z_threshold: ``zscore``: standard deviations above the mean tolerated; default 2.5.
        ema_decay: ``zscore``: decay of the running mean/variance in (0, 1); default 0.97.
        agc_clipping: ``agc``: largest gradient/weight norm ratio per unit; default 0.01
            (the paper's value for its batch-4096 runs; it finds that larger batches need
            smaller values).
        agc_eps: ``agc``: floor of the weight norm; default 1e-3.
        agc_exclude: ``agc``: regular expressions searched in parameter names; matching
            parameters are not clipped (e.g. ``[r"^classifier\."]``).
        warmup_steps: learned modes: norms recorded before the learned threshold is used
            (default 25); ``agc``: optimizer steps without AGC (default 0).
        warmup_max_norm: the total-norm threshold during warm-up; ``None``: no clipping then.
        min_norm: learned modes: floor of the threshold.
        skip_factor: learned modes: skip the step when its norm exceeds ``skip_factor``
            times the threshold; > 1. Skipped steps do not enter the statistics.
        log_every_n_steps: logging interval in optimizer steps; ``None``: the Trainer's.

    Raises:
        ValueError: on an unknown mode, an argument outside its range or one the mode does
            not use; the message names the argument, the value and what is allowed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradguard import AdaptiveClipper

        # clip outliers above mean + 2.5 std, skip steps 10x above that, never exceed 5.0,
        # and clip at 1.0 for the first 25 steps, while the statistics warm up
        trainer = Trainer(
            callbacks=[AdaptiveClipper(mode="zscore", skip_factor=10.0, max_norm=5.0, warmup_max_norm=1.0)]
        )

        # AutoClip: clip to the 10th percentile of the last 1000 norms
        trainer = Trainer(callbacks=[AdaptiveClipper(mode="percentile", percentile=10.0)])

        # AGC, leaving the classifier head alone
        trainer = Trainer(callbacks=[AdaptiveClipper(mode="agc", agc_clipping=0.05, agc_exclude=[r"^head\."])])
    """

    def __init__(
        self,
        *,
        mode: str = "zscore",
        max_norm: float | None = None,
        clip_value: float | None = None,
        percentile: float | None = None,
        window: int | None = None,
        z_threshold: float | None = None,
        ema_decay: float | None = None,
        agc_clipping: float | None = None,
        agc_eps: float | None = None,
        agc_exclude: Sequence[str] | None = None,
        warmup_steps: int | None = None,
        warmup_max_norm: float | None = None,
        min_norm: float | None = None,
        skip_factor: float | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        _validation.choice("mode", mode, MODES)
        given = {
            "max_norm": max_norm,
            "clip_value": clip_value,
            "percentile": percentile,
            "window": window,
            "z_threshold": z_threshold,
            "ema_decay": ema_decay,
            "agc_clipping": agc_clipping,
            "agc_eps": agc_eps,
            "agc_exclude": agc_exclude,
            "warmup_steps": warmup_steps,
            "warmup_max_norm": warmup_max_norm,
            "min_norm": min_norm,
            "skip_factor": skip_factor,
        }
        allowed = MODE_ARGS[mode]
        for name in _ARG_NAMES:
            if given[name] is not None and name not in allowed:
                users = [m for m, names in MODE_ARGS.items() if name in names]
                raise ValueError(
                    f"`{name}` is only used with mode in {tuple(users)}, got mode={mode!r} and {name}={given[name]!r}."
                )
        if mode == "norm" and max_norm is None:
            raise ValueError("`max_norm` is required with mode='norm' (a finite number > 0), got None.")
        if mode == "value" and clip_value is None:
            raise ValueError("`clip_value` is required with mode='value' (a finite number > 0), got None.")
        resolved = {
            n: (DEFAULTS[n] if given[n] is None and n in DEFAULTS and n in allowed else given[n]) for n in given
        }
        if mode in DEFAULT_WARMUP and warmup_steps is None:
            resolved["warmup_steps"] = DEFAULT_WARMUP[mode]

        check_number("max_norm", resolved["max_norm"], low=0.0, allow_none=True)
        check_number("clip_value", resolved["clip_value"], low=0.0, allow_none=True)
        check_number("percentile", resolved["percentile"], low=0.0, high=100.0, allow_none=True)
        check_number("window", resolved["window"], low=1, low_inclusive=True, integer=True, allow_none=True)
        check_number("z_threshold", resolved["z_threshold"], low=0.0, allow_none=True)
        check_number("ema_decay", resolved["ema_decay"], low=0.0, high=1.0, high_inclusive=False, allow_none=True)
        check_number("agc_clipping", resolved["agc_clipping"], low=0.0, allow_none=True)
        check_number("agc_eps", resolved["agc_eps"], low=0.0, allow_none=True)
        compile_patterns("agc_exclude", resolved["agc_exclude"])
        check_number("warmup_steps", resolved["warmup_steps"], low=0, low_inclusive=True, integer=True, allow_none=True)
        check_number("warmup_max_norm", resolved["warmup_max_norm"], low=0.0, allow_none=True)
        check_number("min_norm", resolved["min_norm"], low=0.0, allow_none=True)
        check_number("skip_factor", resolved["skip_factor"], low=1.0, allow_none=True)
        if resolved["min_norm"] is not None and resolved["max_norm"] is not None:
            if resolved["min_norm"] > resolved["max_norm"]:
                raise ValueError(
                    f"`min_norm` ({resolved['min_norm']!r}) must not exceed `max_norm` ({resolved['max_norm']!r})."
                )
        super().__init__(log_every_n_steps=log_every_n_steps)

        self.mode = mode
        self.max_norm: float | None = None if max_norm is None else float(max_norm)
        self.clip_value: float | None = None if clip_value is None else float(clip_value)
        self.percentile: float | None = resolved["percentile"]
        self.window: int | None = resolved["window"]
        self.z_threshold: float | None = resolved["z_threshold"]
        self.ema_decay: float | None = resolved["ema_decay"]
        self.agc_clipping: float | None = resolved["agc_clipping"]
        self.agc_eps: float | None = resolved["agc_eps"]
        self.agc_exclude: list[str] | None = None if agc_exclude is None else list(agc_exclude)
        self.warmup_steps: int | None = resolved["warmup_steps"]
        self.warmup_max_norm: float | None = None if warmup_max_norm is None else float(warmup_max_norm)
        self.min_norm: float | None = None if min_norm is None else float(min_norm)
        self.skip_factor: float | None = None if skip_factor is None else float(skip_factor)

        self._opt: dict[int, _OptState] = {}
        self._rules: dict[int, LearnedThreshold] = {}
        self._agc: dict[int, UnitwiseClip] = {}
        self._restored_rules: dict[int, dict[str, Any]] = {}
        self._warned_patterns: set[str] = set()

    # ------------------------------------------------------------------ identity

    @property
    def state_key(self) -> str:
        """Every setting, so that two clippers that differ in anything fit in one checkpoint."""
        settings = {name: getattr(self, name) for name in MODE_ARGS[self.mode]}
        return self._generate_state_key(mode=self.mode, log_every_n_steps=self.log_every_n_steps, **settings)

    def _statistics_identity(self) -> dict[str, Any]:
        """The settings that define what the saved statistics mean (mode, percentile/window, ...)."""
        return {"mode": self.mode, **{name: getattr(self, name) for name in STATE_ARGS[self.mode]}}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume the statistics of a clipper saved with other options (``max_norm``, ``skip_factor``, ...).

        Lightning finds a callback's state by its ``state_key``, which holds every setting.
        When none matches but exactly one saved clipper has the same statistics identity
        (mode and the arguments that define the statistics), its state is taken, so that
        options may change on resume; a note says so.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        identity = self._statistics_identity()
        matches = [
            key
            for key, state in states.items()
            if isinstance(key, str)
            and key.startswith(f"{type(self).__qualname__}{{")
            and isinstance(state, dict)
            and state.get("identity") == identity
        ]
        if len(matches) == 1:
            states[self.state_key] = states[matches[0]]
            rank_zero_info(
                f"[gradguard] {self!r} resumes the statistics saved by {matches[0]} (same statistics, other options)."
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in ("mode", *MODE_ARGS[self.mode]))
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        clip_val = trainer.gradient_clip_val
        if clip_val:
            algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
            hint = (
                f"pass it as AdaptiveClipper(max_norm={clip_val!r})"
                if self.mode in ("norm", "percentile", "zscore", "agc")
                else "use a single clipper"
            )
            raise ValueError(
                f"Trainer(gradient_clip_val={clip_val!r}, gradient_clip_algorithm={algorithm!r}) would clip the "
                f"gradients a second time after {self!r}; the two do not compose. Remove `gradient_clip_val` from "
                f"the Trainer and, if you want a fixed ceiling as well, {hint}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agc.clear()  # built again for this fit's parameters

    # ------------------------------------------------------------------ the step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = _lightning.raw_optimizer(optimizer)
        idx = _session.optimizer_index(trainer, optimizer)
        state = self._opt.setdefault(idx, _OptState())
        step = trainer.global_step
        log_now = bool(trainer.loggers) and self.is_log_step(trainer, step)
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        state.steps += 1
        state.interval_steps += 1
        if not any(snap.has_grad):  # no backward this step: nothing to clip, nothing to learn
            return

        grads = [p.grad for p in snap.params.params]
        pre = snap.total_norm
        finite = snap.all_finite
        device = pre.device
        skipped = False
        threshold: Tensor | float | None = None
        post: Tensor | None = None
        coef: Tensor | None = None
        extra: dict[str, Tensor] = {}

        if self.mode == "norm":
            threshold = self.max_norm
            coef = clip_coefficient(pre, threshold)
            scale_(grads, coef)
            clipped = coef < 1
        elif self.mode == "value":
            threshold = self.clip_value
            _check_elementwise(snap.params)
            coalesce_sparse_grads_(snap.params.params)  # each stored entry clamped once
            grads = [p.grad for p in snap.params.params]
            clip_by_value_(grads, self.clip_value, scale=snap.scale, finite=finite)
            clipped = finite & (snap.max_abs.max() > self.clip_value)
            if log_now:
                post = self._measure(snap)
        elif self.mode == "agc":
            clipped, threshold, post = self._agc_step(snap, pre, idx, state, grads, finite, log_now, extra)
        else:
            rule = self._rule(idx, device)
            threshold = rule.threshold()
            coef = clip_coefficient(pre, threshold)
            if self.skip_factor is not None:
                spike = finite & (pre > self.skip_factor * threshold)
                skipped = trainer.strategy.reduce_boolean_decision(bool(spike), all=False)
            if skipped:
                _session.drop_gradients(optimizer)
                state.skipped_steps += 1
                coef = torch.zeros_like(coef)
                rule.observe(pre, torch.zeros((), dtype=torch.bool, device=device))
                clipped = torch.zeros((), dtype=torch.bool, device=device)
            else:
                scale_(grads, coef)
                rule.observe(pre, finite)
                clipped = coef < 1

        if post is None and coef is not None:
            post = pre * coef
        if coef is None and post is not None:
            coef = torch.where(finite & (pre > 0), post / pre.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        state.interval_clipped = state.interval_clipped + clipped.to(torch.int64)
        state.last = {"pre_norm": pre, "all_finite": finite}
        if threshold is not None:
            state.last["threshold"] = threshold
        if post is not None:
            state.last["post_norm"] = post
            state.last["coef"] = coef
        state.last["skipped"] = float(skipped)
        if log_now:
            self._log(trainer, idx, state, extra, step)

    def _agc_step(
        self,
        snap: Any,
        pre: Tensor,
        idx: int,
        state: _OptState,
        grads: list[Tensor | None],
        finite: Tensor,
        log_now: bool,
        extra: dict[str, Tensor],
    ) -> tuple[Tensor, float | None, Tensor | None]:
        device = pre.device
        clipped = torch.zeros((), dtype=torch.bool, device=device)
        inv = None if snap.scale is None else snap.scale.reciprocal()
        warm = state.steps <= (self.warmup_steps or 0)
        threshold = self.max_norm
        if warm and self.warmup_max_norm is not None:
            threshold = min(self.warmup_max_norm, self.max_norm or self.warmup_max_norm)
        mid: Tensor | None = pre
        if not warm:
            plan = self._agc_plan(idx, snap.params)
            result = plan.clip_(snap.norms, inv_scale=inv, finite=finite)
            clipped = result.clipped_units > 0
            extra["clipped_units"] = result.clipped_units.to(torch.float32) / max(result.units, 1)
            mid = self._measure(snap) if (threshold is not None or log_now) else None
        if threshold is not None and mid is not None:
            c = clip_coefficient(mid, threshold)
            scale_(grads, c)
            clipped = clipped | (c < 1)
            return clipped, threshold, mid * c
        return clipped, threshold, mid

    def _measure(self, snap: Any) -> Tensor:
        """Total norm of the gradients as they are now (a second pass, used only when needed)."""
        params: ParamSet = snap.params
        inv = None if snap.scale is None else snap.scale.reciprocal()
        norms, _ = tensor_stats(
            [p.grad for p in params.params],
            params.reduce_keys,
            device=snap.norms.device,
            inv_scale=inv,
            cache=params.cache,
        )
        return total_norm_of(norms)

    def _log(self, trainer: pl.Trainer, idx: int, state: _OptState, extra: dict[str, Tensor], step: int) -> None:
        seg = f"opt{idx}/" if len(trainer.optimizers) > 1 else ""
        names = [n for n in ("threshold", "pre_norm", "post_norm", "coef") if n in state.last]
        names += list(extra)
        values = [state.last[n] if n in state.last else extra[n] for n in names]
        rule = self._rules.get(idx)
        if rule is not None:
            values.append(rule.seen)
        values.append(state.interval_clipped)
        host = _to_host(values, state.last["pre_norm"].device)
        if rule is not None:
            rule.note_seen(int(host[-2]))  # lets the rule skip its start-phase work, no extra copy
        metrics = {f"clip/{seg}{n}": v for n, v in zip(names, host)}
        if not math.isfinite(metrics.get(f"clip/{seg}threshold", 0.0)):
            del metrics[f"clip/{seg}threshold"]  # unbounded: TensorBoard cannot draw inf
        metrics[f"clip/{seg}clipped_fraction"] = host[-1] / max(state.interval_steps, 1)
        if self.mode in _LEARNED:
            metrics[f"clip/{seg}skipped_steps"] = float(state.skipped_steps)
        state.interval_steps = 0
        state.interval_clipped = 0
        _session.log_metrics(trainer, metrics, step)

    # ------------------------------------------------------------------ helpers

    def _rule(self, idx: int, device: torch.device) -> LearnedThreshold:
        rule = self._rules.get(idx)
        if rule is None:
            common = dict(
                warmup_steps=self.warmup_steps,
                warmup_max_norm=self.warmup_max_norm,
                max_norm=self.max_norm,
                min_norm=self.min_norm,
                device=device,
            )
            if self.mode == "percentile":
                rule = PercentileThreshold(percentile=self.percentile, window=self.window, **common)
            else:
                rule = ZScoreThreshold(z_threshold=self.z_threshold, ema_decay=self.ema_decay, **common)
            restored = self._restored_rules.pop(idx, None)
            if restored is not None:
                rule.load_state_dict(restored)
            self._rules[idx] = rule
        elif rule.device != device:
            rule.to(device)
        return rule

    def _agc_plan(self, idx: int, params: ParamSet) -> UnitwiseClip:
        plan = self._agc.get(idx)
        if plan is None or plan.params is not params:
            plan = self._agc[idx] = UnitwiseClip(
                params, clipping=self.agc_clipping, eps=self.agc_eps, exclude=self.agc_exclude
            )
            for pattern in plan.unmatched:
                if pattern not in self._warned_patterns:
                    self._warned_patterns.add(pattern)
                    rank_zero_warn(
                        f"[gradguard] AdaptiveClipper(agc_exclude=...): the pattern {pattern!r} matches no parameter "
                        f"name of optimizer {idx} (names look like {params.names[0]!r}); nothing is excluded by it."
                    )
        return plan

    # ------------------------------------------------------------------ inspection

    def threshold_rule(self, optimizer_index: int = 0) -> LearnedThreshold | None:
        """The learned-threshold state of one optimizer (``percentile``/``zscore``), if it exists yet."""
        return self._rules.get(optimizer_index)

    def last_decision(self, optimizer_index: int = 0) -> dict[str, float]:
        """What happened at the last step of one optimizer, copied to the host (a sync).

        Keys: ``pre_norm``, ``all_finite``, ``skipped`` and, where known, ``threshold``,
        ``post_norm``, ``coef`` (``agc`` without ``max_norm`` knows the last two only on
        logging steps). Empty before the first step. Meant for tests and debugging.
        """
        state = self._opt.get(optimizer_index)
        if state is None or not state.last:
            return {}
        names = list(state.last)
        out = dict(zip(names, _to_host([state.last[n] for n in names], state.last["pre_norm"].device)))
        out["all_finite"] = bool(out["all_finite"])
        out["skipped"] = bool(out["skipped"])
        return out

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``skip_factor`` so far, over all optimizers."""
        return sum(s.skipped_steps for s in self._opt.values())

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        rules = {i: r.state_dict() for i, r in self._rules.items()}
        rules.update({i: s for i, s in self._restored_rules.items() if i not in rules})
        return {
            "identity": self._statistics_identity(),
            "rules": rules,
            "optimizers": {
                i: {
                    "steps": s.steps,
                    "skipped_steps": s.skipped_steps,
                    "interval_steps": s.interval_steps,
                    "interval_clipped": int(s.interval_clipped),
                }
                for i, s in self._opt.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rules.clear()
        self._restored_rules = {int(i): s for i, s in state_dict.get("rules", {}).items()}
        self._opt = {
            int(i): _OptState(
                steps=s.get("steps", 0),
                skipped_steps=s.get("skipped_steps", 0),
                interval_steps=s.get("interval_steps", 0),
                interval_clipped=s.get("interval_clipped", 0),
            )
            for i, s in state_dict.get("optimizers", {}).items()
        }


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


def _to_host(values: list[Tensor | float | int], device: torch.device) -> list[float]:
    """Floats of a mix of 0-dim device tensors and Python numbers, with one device-to-host copy."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    copied = iter(torch.stack([t.to(device=device, dtype=torch.float32) for t in tensors]).tolist() if tensors else [])
    return [next(copied) if isinstance(v, Tensor) else float(v) for v in values]
