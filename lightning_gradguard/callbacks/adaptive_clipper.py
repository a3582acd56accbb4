"""AdaptiveClipper: clip gradients by a fixed or learned threshold, robust to NaN steps and resumes.

The callback keeps the per-optimizer counters, the logging and the checkpoints; what each
mode does (its arguments, state and clipping) lives in :mod:`lightning_gradguard.clipping.modes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import GradGuardCallback
from lightning_gradguard.callbacks._device_skip import accepts_device_skip, skip_on_device
from lightning_gradguard.clipping import MODES, ClipResult, LearnedThreshold, Step


@dataclass
class _OptState:
    """What the clipper remembers about one optimizer.

    The skip counters are ``int`` where the skip is decided on the host and 0-dim int64
    device tensors where it is decided on the device (read with the next logging step's
    host copy, or by a property, a checkpoint, the end of training).
    """

    steps: int = 0  # optimizer steps seen
    skipped_steps: Tensor | int = 0
    over_streak: Tensor | int = 0  # steps in a row above skip_factor x bound, up to the last one
    skips_refused: Tensor | int = 0  # of those, clipped rather than skipped (skip_limit reached)
    first_refusal: Tensor | int = -1  # global step of the first refusal (-1: none), for the warning
    interval_steps: int = 0  # steps since the last logged one
    interval_clipped: Tensor | int = 0  # of which clipped (device tensor between logs)
    last: dict[str, Tensor | float] = field(default_factory=dict)


#: the counters of :class:`_OptState` saved in checkpoints
_COUNTERS = ("steps", "skipped_steps", "over_streak", "skips_refused", "interval_steps", "interval_clipped")

#: the names ``mode`` accepts (a ``Literal``, so that LightningCLI's ``--help`` lists them)
Mode = Literal["norm", "value", "percentile", "zscore", "agc"]


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
      :class:`~lightning_gradguard.clipping.ZScoreThreshold`.
    - ``"agc"`` (Brock et al. 2021, NFNets): each unit's gradient norm is bounded by
      ``agc_clipping`` times its weight norm (floored at ``agc_eps``); parameters whose
      name matches a pattern of ``agc_exclude`` (e.g. the final classifier) are left alone.

    Options of the learned modes (``percentile``, ``zscore``):

    - ``max_norm`` (default 1.0) is an absolute ceiling at all times, so that
      ``AdaptiveClipper()`` never clips less than ``Trainer(gradient_clip_val=1.0)``; the
      learned threshold works below it (outliers of a run whose norms are below 1) and the
      statistics keep learning the run's own scale above it. ``max_norm=math.inf`` removes
      the ceiling (the threshold then follows the run's scale: better on some runs, worse on
      explosive ones; README "Does it help?" has the evidence).
    - Until ``warmup_steps`` norms were recorded (default 25) the statistic is not trusted:
      the threshold is ``warmup_factor`` (default 10) times the median of the norms seen so
      far (none before the first), capped by ``warmup_max_norm`` and ``max_norm``. So a
      corrupted batch at step 3 is clipped even without a ceiling.
    - ``min_norm`` is a floor.
    - With ``skip_factor=k`` a step whose norm exceeds ``k`` times the run's own bound (the
      learned threshold before ``max_norm``) is skipped altogether (its gradients are
      dropped, as large language model training does on loss spikes); at most
      ``skip_limit`` (default 3) steps in a row: further outliers in that streak are clipped
      instead (a lasting change of scale is not a spike), with a warning the first time
      and the count in ``clip/skips_refused``.

    ``agc`` accepts ``warmup_steps`` (optimizer steps without AGC, clipped to
    ``warmup_max_norm`` if given) and ``max_norm`` (a total-norm ceiling after AGC; none by
    default).

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
    - Clipping runs on the device with foreach kernels and a device-side
      coefficient; on steps that do not log, nothing is copied to the host. With
      ``skip_factor`` and an optimizer that can skip a step from a device flag (torch's
      ``fused=True`` ``Adam``/``AdamW``/``SGD``/``Adagrad``, without an fp16
      ``GradScaler``) the skip is decided on the device too, through the optimizer's
      ``found_inf``, and the ranks agree by an all-reduce; with any other optimizer the
      decision costs one boolean read on the host per step (combined across ranks). Either
      way every rank skips the same steps.
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
    ``clip/skips_refused``      steps above ``skip_factor`` clipped instead of skipped so far,
                                ``skip_limit`` having been reached (with ``skip_factor``)
    ``clip/clipped_units``      ``agc``: fraction of this rank's units clipped at this step
    ==========================  ==============================================================

    Args:
        mode: ``"norm"``, ``"value"``, ``"percentile"``, ``"zscore"`` (default) or ``"agc"``.
        max_norm: ``norm``: the ceiling (required). ``percentile``/``zscore``: absolute
            ceiling on the total norm at all times, default 1.0; ``math.inf``: none. ``agc``:
            an optional total-norm ceiling after AGC.
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
        warmup_max_norm: a total-norm ceiling during warm-up (``agc``: the threshold then);
            ``None``: none besides ``max_norm``.
        warmup_factor: learned modes: during warm-up the threshold is at most this many times
            the median of the norms seen so far; default 10; ``math.inf``: no such bound.
        min_norm: learned modes: floor of the threshold.
        skip_factor: learned modes: skip the step when its norm exceeds ``skip_factor``
            times the learned threshold (before ``max_norm``); > 1. Skipped steps do not
            enter the statistics. Default: never skip.
        skip_limit: learned modes: at most this many steps in a row are skipped; the next
            outliers of the streak are clipped (and learned from); default 3.
        log_every_n_steps: logging interval in optimizer steps; ``None``: the Trainer's.

    Raises:
        ValueError: on an unknown mode, an argument outside its range or one the mode does
            not use; the message names the argument, the value and what is allowed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradguard import AdaptiveClipper

        # the default: outliers above mean + 2.5 std clipped, never above 1.0, from the first step
        trainer = Trainer(callbacks=[AdaptiveClipper()])

        # skip steps 10x above the learned threshold (3 in a row at most), no fixed ceiling
        trainer = Trainer(callbacks=[AdaptiveClipper(skip_factor=10.0, max_norm=math.inf)])

        # AutoClip: clip to the 10th percentile of the last 1000 norms, no fixed ceiling
        trainer = Trainer(callbacks=[AdaptiveClipper(mode="percentile", percentile=10.0, max_norm=math.inf)])

        # AGC, leaving the classifier head alone
        trainer = Trainer(callbacks=[AdaptiveClipper(mode="agc", agc_clipping=0.05, agc_exclude=[r"^head\."])])
    """

    # every mode argument, resolved by the mode (its default filled in); None where the mode takes no such argument
    max_norm: float | None
    clip_value: float | None
    percentile: float | None
    window: int | None
    z_threshold: float | None
    ema_decay: float | None
    agc_clipping: float | None
    agc_eps: float | None
    agc_exclude: list[str] | None
    warmup_steps: int | None
    warmup_max_norm: float | None
    warmup_factor: float | None
    min_norm: float | None
    skip_factor: float | None
    skip_limit: int | None

    def __init__(
        self,
        *,
        mode: Mode = "zscore",
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
        warmup_factor: float | None = None,
        min_norm: float | None = None,
        skip_factor: float | None = None,
        skip_limit: int | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
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
            "warmup_factor": warmup_factor,
            "min_norm": min_norm,
            "skip_factor": skip_factor,
            "skip_limit": skip_limit,
        }
        self._mode = MODES[_validation.choice("mode", mode, tuple(MODES))](**given)
        super().__init__(log_every_n_steps=log_every_n_steps)
        self.mode = mode
        for name in given:
            setattr(self, name, self._mode.settings.get(name))
        self._opt: dict[int, _OptState] = {}
        self._warned_refusal = False

    # ------------------------------------------------------------------ identity

    @override
    def custom_scalar_charts(self, trainer: pl.Trainer) -> dict[str, list[Any]]:
        """The clipper's chart in the "gradguard" custom-scalars tab (the logger writes the layout)."""
        return {"clipping: threshold vs pre-clip norm": ["Multiline", [r"^clip/(opt\d+/)?(threshold|pre_norm)$"]]}

    @property
    @override
    def needs_max_abs(self) -> bool:
        return self.mode == "value"  # the value bound is judged on max |g|

    def _key_settings(self) -> dict[str, Any]:
        """Every setting, so that two clippers that differ in anything fit in one checkpoint."""
        return dict(mode=self.mode, log_every_n_steps=self.log_every_n_steps, **self._mode.settings)

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
        identity = self._mode.identity()
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
        args = ", ".join(f"{n}={v!r}" for n, v in {"mode": self.mode, **self._mode.settings}.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        clip_val = trainer.gradient_clip_val
        if stage != "fit" or not clip_val:
            return
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
        hint = (
            f"pass it as AdaptiveClipper(max_norm={clip_val!r})"
            if self._mode.accepts("max_norm")
            else "use a single clipper"
        )
        raise ValueError(
            f"Trainer(gradient_clip_val={clip_val!r}, gradient_clip_algorithm={algorithm!r}) would clip the "
            f"gradients a second time after {self!r}; the two do not compose. Remove `gradient_clip_val` from "
            f"the Trainer and, if you want a fixed ceiling as well, {hint}."
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mode.start()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the refusal warning of a device-side skip that no logging step read (one host copy, once)."""
        for idx, state in self._opt.items():
            if not self._warned_refusal and isinstance(state.skips_refused, Tensor):
                refused, first_refusal = _to_host(_skip_counters(state)[1:], state.skips_refused.device)
                if refused and first_refusal >= 0:
                    self._warn_refusal(trainer, idx, int(first_refusal))

    # ------------------------------------------------------------------ the step

    @override
    @torch.no_grad()  # statistics only: no autograd bookkeeping on each small op
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = _lightning.raw_optimizer(optimizer)
        idx = _session.optimizer_index(trainer, optimizer)
        state = self._opt.setdefault(idx, _OptState())
        log_now = bool(trainer.loggers) and self.is_log_step(trainer, trainer.global_step)
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        state.steps += 1
        state.interval_steps += 1
        if not any(snap.has_grad):  # no backward this step: nothing to clip, nothing to learn
            return
        on_device = self.skip_factor is not None and accepts_device_skip(trainer, optimizer)
        if on_device:  # the streak becomes a device tensor once, then stays one
            state.over_streak = torch.as_tensor(state.over_streak, device=snap.total_norm.device)
        step = Step.of(
            snap,
            index=idx,
            count=state.steps,
            measure=log_now,
            agree=lambda skip: trainer.strategy.reduce_boolean_decision(skip, all=False),
            agree_on_device=_any_rank if on_device else None,
            over_streak=state.over_streak,
        )
        result = self._mode.apply(step)
        for message in result.warnings:
            rank_zero_warn(message)
        if on_device:
            self._count_on_device(trainer, optimizer, state, step, result)
        else:
            if result.skipped:
                _session.drop_gradients(trainer, optimizer)
                state.skipped_steps += 1
            elif result.over_skip:
                state.skips_refused += 1
                self._warn_refusal(trainer, idx, trainer.global_step)
            if result.over_skip is not None:  # a non-finite step neither extends nor ends a streak
                state.over_streak = state.over_streak + 1 if result.over_skip else 0
        self._record(state, step, result)
        if log_now:
            self._log(trainer, idx, state, result.extra)

    def _count_on_device(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        state: _OptState,
        step: Step,
        result: ClipResult,
    ) -> None:
        """Skip the step from the mode's device verdict and count it, all on the device.

        The host path's bookkeeping with ``torch.where``: an outlier extends the streak, a
        finite step below the bound ends it, a non-finite step leaves it as it is. The
        refusal warning waits for the next host copy (:meth:`_log`, :meth:`on_train_end`),
        which learns the step of the first refusal from ``first_refusal``.
        """
        skipped, over = result.skipped, result.over_skip
        assert isinstance(skipped, Tensor) and isinstance(over, Tensor)  # the mode decided on the device
        skip_on_device(optimizer, skipped)
        refused = over & ~skipped
        state.skipped_steps = state.skipped_steps + skipped.to(torch.int64)
        state.skips_refused = state.skips_refused + refused.to(torch.int64)
        streak = step.over_streak
        state.over_streak = torch.where(over, streak + 1, torch.where(step.finite, 0, streak))
        if not self._warned_refusal:
            first = torch.as_tensor(state.first_refusal, device=refused.device)
            state.first_refusal = torch.where(refused & (first < 0), trainer.global_step, first)

    def _warn_refusal(self, trainer: pl.Trainer, idx: int, since: int) -> None:
        """Say once that skipping stopped: ``skip_limit`` outliers in a row are a new regime, not a spike.

        ``since`` is the global step of the first refusal (known late where the skip is
        decided on the device).
        """
        if self._warned_refusal:
            return
        self._warned_refusal = True
        opt = f" of optimizer {idx}" if len(trainer.optimizers) > 1 else ""
        rank_zero_warn(
            f"[gradguard] AdaptiveClipper: {self.skip_limit} steps{opt} in a row had a gradient norm above "
            f"skip_factor={self.skip_factor!r} times the run's usual bound and were skipped; from global step "
            f"{since} such steps are clipped instead of skipped (skip_limit={self.skip_limit!r}) until "
            "one is back below the bound, so that a lasting change of scale cannot stop training. The count is "
            "logged as `clip/skips_refused`. This note is shown once."
        )

    def _record(self, state: _OptState, step: Step, result: ClipResult) -> None:
        state.interval_clipped = state.interval_clipped + result.clipped.to(torch.int64)
        state.last = {"pre_norm": step.pre, "all_finite": step.finite}
        if result.threshold is not None:
            state.last["threshold"] = result.threshold
        if result.post is not None and result.coef is not None:
            state.last["post_norm"] = result.post
            state.last["coef"] = result.coef
        state.last["skipped"] = result.skipped if isinstance(result.skipped, Tensor) else float(result.skipped)

    def _log(self, trainer: pl.Trainer, idx: int, state: _OptState, extra: dict[str, Tensor]) -> None:
        seg = f"opt{idx}/" if len(trainer.optimizers) > 1 else ""
        names = [n for n in ("threshold", "pre_norm", "post_norm", "coef") if n in state.last]
        values = [state.last[n] for n in names] + list(extra.values())
        names += list(extra)
        hints = self._mode.host_hints(idx)
        counters = [state.interval_clipped, *_skip_counters(state)]  # device tensors where skipped on the device
        host = _to_host([*values, *hints, *counters], state.last["pre_norm"].device)
        self._mode.take_hints(idx, host[len(values) : len(values) + len(hints)])
        clipped, skipped, refused, first_refusal = host[-len(counters) :]
        if refused and first_refusal >= 0:
            self._warn_refusal(trainer, idx, int(first_refusal))
        metrics = {f"clip/{seg}{n}": v for n, v in zip(names, host)}
        if not math.isfinite(metrics.get(f"clip/{seg}threshold", 0.0)):
            del metrics[f"clip/{seg}threshold"]  # unbounded: TensorBoard cannot draw inf
        metrics[f"clip/{seg}clipped_fraction"] = clipped / max(state.interval_steps, 1)
        if self._mode.accepts("skip_factor"):
            metrics[f"clip/{seg}skipped_steps"] = skipped
            if self.skip_factor is not None:
                metrics[f"clip/{seg}skips_refused"] = refused
        state.interval_steps = 0
        state.interval_clipped = 0
        _session.log_metrics(trainer, metrics, trainer.global_step)

    # ------------------------------------------------------------------ inspection

    def threshold_rule(self, optimizer_index: int = 0) -> LearnedThreshold | None:
        """The learned-threshold state of one optimizer (``percentile``/``zscore``), if it exists yet."""
        return self._mode.threshold_rule(optimizer_index)

    def _rule(self, idx: int, device: torch.device) -> LearnedThreshold:
        """The learned threshold of optimizer ``idx``, created (from a restored state) if needed; learned modes."""
        return self._mode.rule(idx, device)  # type: ignore[attr-defined]

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
        """Steps skipped by ``skip_factor`` so far, over all optimizers (a sync where counted on the device)."""
        return sum(int(s.skipped_steps) for s in self._opt.values())

    @property
    def skips_refused(self) -> int:
        """Steps above ``skip_factor`` that were clipped instead, ``skip_limit`` having been reached (may sync)."""
        return sum(int(s.skips_refused) for s in self._opt.values())

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "identity": self._mode.identity(),
            "rules": self._mode.state_dict(),  # the mode's learned state, per optimizer
            "optimizers": {i: {k: int(getattr(s, k)) for k in _COUNTERS} for i, s in self._opt.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._mode.load_state_dict(state_dict.get("rules", {}))
        self._opt = {
            int(i): _OptState(**{k: s.get(k, 0) for k in _COUNTERS})
            for i, s in state_dict.get("optimizers", {}).items()
        }


def _any_rank(flag: Tensor) -> Tensor:
    """``flag`` (0-dim bool) OR-ed over every process, on the device: an all-reduce, no host read.

    What ``trainer.strategy.reduce_boolean_decision(all=False)`` gives, without its
    ``bool()``. Outside ``torch.distributed`` the flag is this process's alone.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    votes = flag.to(torch.int32)  # backends reduce integers, not bools
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return votes > 0


def _skip_counters(state: _OptState) -> list[Tensor | int]:
    """``skipped_steps``, ``skips_refused`` and ``first_refusal``, in that order, for one host copy."""
    return [state.skipped_steps, state.skips_refused, state.first_refusal]


def _to_host(values: list[Tensor | float | int], device: torch.device) -> list[float]:
    """Floats of a mix of 0-dim device tensors and Python numbers, with one device-to-host copy."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    copied = iter(torch.stack([t.to(device=device, dtype=torch.float32) for t in tensors]).tolist() if tensors else [])
    return [next(copied) if isinstance(v, Tensor) else float(v) for v in values]
