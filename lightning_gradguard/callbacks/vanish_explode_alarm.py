"""VanishExplodeAlarm: catch vanishing, exploding and non-finite gradients early and act on them."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _arrays, _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._alarm_report import AlarmRecord, MicroBatch, write_crash_dump
from lightning_gradguard.callbacks._base import GradGuardCallback, Layers
from lightning_gradguard.callbacks._deferred import DeferMode, DeferredReadings
from lightning_gradguard.diagnosis import (
    DetectorConfig,
    Evidence,
    Finding,
    GradientAnomalyError,
    HealthDetector,
    Reading,
    build_finding,
)
from lightning_gradguard.stats import GroupedStats, UnitStats

#: What the alarm may do about a kind of finding.
Action = Literal["warn", "skip", "stop", "raise"]
#: What it may do about a non-finite step (which is never only warned about).
NonfiniteAction = Literal["skip", "stop", "raise"]
ACTIONS: tuple[str, ...] = get_args(Action)
_STRENGTH = {"none": 0, "warn": 1, "skip": 2, "stop": 3, "raise": 4}


def _stronger(a: str, b: str) -> str:
    return b if _STRENGTH[b] > _STRENGTH[a] else a


def _checked_actions(
    halt_on_nan: Any, nonfinite_action: Any, explode_action: Any, vanish_action: Any, dead_action: Any
) -> dict[str, str]:
    """The action of each kind the alarm acts on; a non-finite step is never only warned about."""
    _validation.boolean("halt_on_nan", halt_on_nan)
    if nonfinite_action is not None:
        _validation.choice("nonfinite_action", nonfinite_action, get_args(NonfiniteAction))
    _validation.choice("explode_action", explode_action, ACTIONS)
    _validation.choice("vanish_action", vanish_action, ACTIONS)
    _validation.choice("dead_action", dead_action, ACTIONS)
    return {
        "nonfinite": nonfinite_action or ("stop" if halt_on_nan else "skip"),
        "exploding": explode_action,
        "vanishing": vanish_action,
        "dead": dead_action,
    }


def _from_record(name: str, doc: str) -> property:
    """An attribute of the alarm that is its :class:`AlarmRecord`'s ``name``."""
    return property(lambda alarm: getattr(alarm.record, name), lambda alarm, v: setattr(alarm.record, name, v), doc=doc)


@dataclass
class _Step:
    """One optimizer step under check: what the decision, the findings and the crash dump need."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    optimizer: torch.optim.Optimizer
    opt_idx: int
    step: int
    stats: GroupedStats
    detector: HealthDetector
    reading: Reading
    scaler_active: bool
    window: list[MicroBatch]
    units: UnitStats | None = None
    log_step: int = 0  # the x-axis step of its points (:meth:`GradGuardCallback.log_step` when it was read)
    deferred: bool = False  # read one step late: the device skipped it already (see _deferred)

    @cached_property
    def evidence(self) -> Evidence:
        """The host copies behind a finding or a dump, taken once and only when one is written."""
        return Evidence.collect(
            self.detector, self.stats, self.reading, scaler_active=self.scaler_active, units=self.units
        )


def _decide(
    step: _Step, active: tuple[str, ...], actions: Mapping[str, str], record: AlarmRecord
) -> tuple[str, list[Finding]]:
    """The strongest action due for the active kinds, and a finding per kind that opens an episode or stops the run."""
    strongest = "skip" if "nonfinite" in active else "none"  # a non-finite step never reaches the weights
    findings: list[Finding] = []
    for kind in active:
        new_episode = record.begin(kind, step.step)
        action = actions.get(kind, "none")  # overflow: counted, not acted on
        strongest = _stronger(strongest, action)
        if kind != "overflow" and (new_episode or _STRENGTH[action] >= _STRENGTH["stop"]):
            findings.append(build_finding(kind, step.step, step.evidence, model=step.pl_module))
    return strongest, findings


class _Window:
    """The micro-batches whose gradients the coming optimizer step applies.

    Automatic optimisation: every batch since the last step, each with whether its loss
    was finite (and, under gradient accumulation, whether the accumulated gradients still
    were after it). Manual optimisation: the current batch, with no loss flag: the user
    chooses which backward passes reach ``step()`` (a guarded ``if loss.isfinite():
    opt.step()`` must not leave a stale flag for the next, clean step), so the decision
    rests on the gradients alone.
    """

    def __init__(self) -> None:
        self.batches: list[MicroBatch] = []

    def start(self, batch_idx: int, batch: Any, automatic: bool) -> None:
        if not automatic:
            self.batches.clear()
        self.batches.append(MicroBatch(batch_idx, batch))

    def __bool__(self) -> bool:
        return bool(self.batches)

    def clear(self) -> None:
        self.batches.clear()

    def note_loss(self, loss: Tensor) -> None:
        """Whether the current micro-batch's loss is finite (a device flag, no sync; on the CPU read at once)."""
        loss = loss.detach()
        if loss.dim() == 0 and _arrays.ops_for(loss.device) is _arrays.HOST:  # nothing to wait for: one read
            self.batches[-1].loss_finite = torch.tensor(math.isfinite(loss.item()))
        else:  # isfinite is several kernels; all() makes a 0-dim flag of any loss
            self.batches[-1].loss_finite = torch.isfinite(loss).all()

    def note_gradients(self, finite: Tensor) -> None:
        """Whether the accumulated gradients are still finite after the current micro-batch."""
        self.batches[-1].grad_finite = finite

    def take(self, automatic: bool) -> list[MicroBatch]:
        """The micro-batches of this step; under automatic optimisation the next step starts afresh."""
        batches = self.batches
        if automatic:
            self.batches = []
        return batches


def _losses_finite(trainer: pl.Trainer, batches: list[MicroBatch]) -> Tensor | None:
    """Whether every loss behind the gradients of this step was finite, the same on every rank (``None``: no flag)."""
    flags = [m.loss_finite for m in batches if m.loss_finite is not None]
    if not flags:
        return None
    finite = torch.stack(flags).all() if len(flags) > 1 else flags[0]
    if trainer.world_size > 1:
        finite = trainer.strategy.reduce((~finite).float(), reduce_op="sum") == 0
    return finite


class VanishExplodeAlarm(GradGuardCallback):
    r"""Detect vanishing, exploding and non-finite gradients; warn, skip the step, stop or raise.

    Every optimizer step the callback checks the shared gradient snapshot on the device
    and copies one small reading to the host (the flags of the step, plus the z-score,
    the deep/shallow ratio, the total norm and the loss scale); nothing else leaves the
    device unless a flag is up. It never computes norms of its own. With
    ``defer_host_read`` that copy is read one step later, so the step need not wait for it.

    What it detects (details and rules in :class:`~lightning_gradguard.diagnosis.HealthDetector`):

    - **non-finite**: NaN/Inf in a gradient or in the loss. The step is always skipped
      (gradients dropped before ``optimizer.step()``, so no NaN reaches the weights or the
      optimizer state); with ``halt_on_nan=True`` training then stops. Under an fp16
      ``GradScaler`` a lone overflow is normal (the scaler skips the step and lowers the
      scale): it is counted as ``overflow``, and becomes non-finite only when it repeats
      ``max_consecutive_overflows`` times in a row or the scale falls below ``min_loss_scale``.
    - **exploding**: total norm above ``max_norm``; or a spike: ``spike_zscore`` standard
      deviations above the run's own moving log-norm *and* ``spike_min_ratio`` times its
      level (after ``warmup_steps``); or geometric growth: ``growth_total`` times the
      smallest of the last 8 finite steps while rising ``growth_step``-fold on this step
      (no warm-up). The finding names the layers that grew, input side first, and says when
      the growth rises toward the input or is there at the first step (a depth problem).
    - **vanishing**: over the last ``patience`` steps, the median ratio of the deepest
      layer's gradient norm to the shallowest's is above ``vanish_ratio`` (optionally: the
      shallowest's median below ``vanish_floor`` while the deepest's is not). Shallowest
      and deepest follow the order in which the layers run (read once per parameter set
      from the autograd graph of the loss), not the order in which they are registered.
    - **dead**: a layer whose gradient is exactly zero for ``dead_patience`` steps in a row,
      or a layer with ``dead_unit_share`` of its units (rows of a Linear/Conv weight) zero
      for ``dead_patience`` steps in a row while the rest of it learns.

    Each kind has an action: ``"warn"``, ``"skip"`` (warn and skip this optimizer step),
    ``"stop"`` (skip, then stop training gracefully after the batch) or ``"raise"`` (skip,
    then raise :class:`~lightning_gradguard.GradientAnomalyError` carrying the diagnosis).
    Warnings come once per episode (a kind that stays quiet for ``episode_gap`` steps
    ends its episode), on rank zero, and name the layers, the numbers and remedies that
    fit the model. Every rank takes the same decision at the same step: the step's
    statistics and loss flags are made identical on every rank before any decision. On
    ``stop``/``raise`` a crash dump (the step, the batch, the per-layer statistics and the
    finding) is written next to the logs.
    At the end of ``fit`` (and on a halt) a short health summary is printed.

    Logged keys (at ``log_every_n_steps``; with several optimizers ``opt<i>/`` follows
    the prefix): ``alarm/zscore`` (log-norm z-score, once armed) and
    ``alarm/deep_shallow_log10`` (log10 of the median deepest/shallowest ratio), where
    finite; ``alarm/nonfinite``, ``alarm/exploding``, ``alarm/vanishing``, ``alarm/dead``,
    ``alarm/overflow`` (steps flagged so far) and ``alarm/skipped_steps`` from the step
    their kind first fires. Text (TensorBoard): each finding as markdown under
    ``alarm/findings`` at its step, the health summary under ``alarm/summary`` at the end
    of fit and on a halt. For other loggers, :attr:`findings` holds every
    :class:`~lightning_gradguard.diagnosis.Finding` (``.markdown()``, ``.as_dict()``).

    Args:
        halt_on_nan: on non-finite gradients, skip the step and stop training (``True``)
            or skip the step and carry on (``False``).
        nonfinite_action: overrides ``halt_on_nan``: ``"skip"``, ``"stop"`` or ``"raise"``
            (``"warn"`` is not allowed: a non-finite step is always skipped).
        explode_action: action for exploding gradients (default ``"warn"``).
        vanish_action: action for vanishing gradients (default ``"warn"``).
        dead_action: action for dead layers (default ``"warn"``).
        max_norm: absolute ceiling on the total gradient norm; ``None`` disables it.
        spike_zscore: z-score of log(total norm) that counts as a spike; ``None`` disables
            the spike rule.
        spike_min_ratio: a spike must also be this many times the moving norm level;
            ``None`` drops this guard.
        growth_total: geometric growth that counts as exploding: the total norm grew this
            many times over two or more consecutive growing steps; ``None`` disables it.
        growth_step: a step counts as growing when its total norm is at least this many
            times the previous step's.
        ema_alpha: weight of the newest step in the moving log-norm mean/variance, in (0, 1).
        warmup_steps: finite steps before the spike rule is armed.
        vanish_ratio: median deepest/shallowest gradient-norm ratio that counts as
            vanishing; ``None`` disables it.
        vanish_floor: absolute floor for the shallowest layer's median norm; ``None``
            (default) disables it: a converged model is small everywhere without vanishing.
        patience: the window, in steps, of the vanishing medians.
        dead_patience: steps in a row of an exactly-zero gradient that make a layer, or a
            unit, dead.
        dead_unit_share: share of a layer's units (output rows of a Linear/Conv weight)
            with an exactly-zero gradient for ``dead_patience`` steps in a row that counts
            as ``dead``; ``None`` stops watching units.
        max_consecutive_overflows: fp16 overflow steps in a row that count as a failure.
        min_loss_scale: fp16 loss scale below which overflow counts as a failure.
        episode_gap: quiet steps that end an episode (and re-arm its warning).
        group_by, group_depth, group_patterns: how parameters form layers, as in
            :class:`~lightning_gradguard.GradientNormLogger`.
        log_every_n_steps: logging interval; ``None``: the Trainer's.
        crash_dump: write a crash dump on ``stop``/``raise``.
        dump_dir: where to write it; ``None``: the Trainer's ``log_dir``.
        defer_host_read: read each step's reading on the host one optimizer step later, so
            that ``on_before_optimizer_step`` never waits for the device (on a GPU the CPU
            otherwise stalls every step until the step's gradients are ready). The skip is
            still decided at the step itself, on the device, through the optimizer's
            ``found_inf`` (a latch keeps every later step skipped once a stop/raise kind
            fired); counters, findings, warnings, the crash dump, the stop, the raise and
            the logged points follow one step late (at the next step's hook, at the end of
            training, before a checkpoint), carrying the step they happened at. The
            findings, counts and skipped steps are the same as without deferring; a step
            with a flag up still costs one blocking read of its statistics, at the next
            hook; with ``crash_dump`` and a stop/raise action, max |g| is computed on the
            device every step (a dump written a step late must describe its own step).
            Possible only with a fused optimizer (``Adam``/``AdamW``/``SGD``/``Adagrad``
            with ``fused=True``) and no fp16 ``GradScaler``; elsewhere the read is
            immediate. ``"auto"`` (default): defer where the gradients are on a CUDA device;
            on the CPU deferring brings no benefit. ``True``: defer wherever possible;
            ``False``: never.

    Raises:
        ValueError: if an argument is outside what is allowed; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradguard import VanishExplodeAlarm

        trainer = Trainer(callbacks=[VanishExplodeAlarm(explode_action="skip")])
    """

    def __init__(
        self,
        *,
        halt_on_nan: bool = True,
        nonfinite_action: NonfiniteAction | None = None,
        explode_action: Action = "warn",
        vanish_action: Action = "warn",
        dead_action: Action = "warn",
        max_norm: float | None = DetectorConfig.max_norm,
        spike_zscore: float | None = DetectorConfig.spike_zscore,
        spike_min_ratio: float | None = DetectorConfig.spike_min_ratio,
        growth_total: float | None = DetectorConfig.growth_total,
        growth_step: float = DetectorConfig.growth_step,
        ema_alpha: float = DetectorConfig.ema_alpha,
        warmup_steps: int = DetectorConfig.warmup_steps,
        vanish_ratio: float | None = DetectorConfig.vanish_ratio,
        vanish_floor: float | None = DetectorConfig.vanish_floor,
        patience: int = DetectorConfig.patience,
        dead_patience: int = DetectorConfig.dead_patience,
        dead_unit_share: float | None = DetectorConfig.dead_unit_share,
        max_consecutive_overflows: int = DetectorConfig.max_consecutive_overflows,
        min_loss_scale: float = DetectorConfig.min_loss_scale,
        episode_gap: int = 10,
        group_by: str = "module",
        group_depth: int | None = None,
        group_patterns: Mapping[str, str] | None = None,
        log_every_n_steps: int | None = None,
        crash_dump: bool = True,
        dump_dir: str | None = None,
        defer_host_read: DeferMode = "auto",
    ) -> None:
        self.actions = _checked_actions(halt_on_nan, nonfinite_action, explode_action, vanish_action, dead_action)
        self.nonfinite_action = self.actions["nonfinite"]
        self.config = DetectorConfig(
            max_norm=max_norm,
            spike_zscore=spike_zscore,
            spike_min_ratio=spike_min_ratio,
            growth_total=growth_total,
            growth_step=growth_step,
            ema_alpha=ema_alpha,
            warmup_steps=warmup_steps,
            vanish_ratio=vanish_ratio,
            vanish_floor=vanish_floor,
            patience=patience,
            dead_patience=dead_patience,
            dead_unit_share=dead_unit_share,
            max_consecutive_overflows=max_consecutive_overflows,
            min_loss_scale=min_loss_scale,
        )
        self.episode_gap = _validation.integer("episode_gap", episode_gap)
        super().__init__(
            log_every_n_steps=log_every_n_steps, layers=Layers.checked(group_by, group_depth, group_patterns)
        )
        self.crash_dump = _validation.boolean("crash_dump", crash_dump)
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise ValueError(f"`dump_dir` must be a path or None, got {dump_dir!r}.")
        self.dump_dir = None if dump_dir is None else os.fspath(dump_dir)
        self.detectors: dict[int, HealthDetector] = {}  # per optimizer index
        self.record = AlarmRecord(self.episode_gap)
        self._window = _Window()
        self._lifted_min: str | None = None
        self._summary_logged_at: int | None = None
        self._restored_detectors: dict[int, dict[str, Any]] = {}
        self._unit_turns: dict[int, int] = {}  # per optimizer, its steps: which turn of its weights to look at
        defer = _validation.choice("defer_host_read", defer_host_read, (True, False, "auto"))
        self._deferred = DeferredReadings[_Step](defer, self.actions, crash_dump=self.crash_dump)

    defer_host_read = property(lambda self: self._deferred.mode, doc="``True``, ``False`` or ``'auto'``, as given.")

    counts = _from_record("counts", "Per kind, the optimizer steps flagged so far.")
    episodes = _from_record("episodes", "Per kind, the episodes so far (one warning each).")
    first_step = _from_record("first_step", "Per kind, the first step flagged (``None``: never).")
    skipped_steps = _from_record("skipped_steps", "Optimizer steps whose gradients the alarm dropped.")
    steps_checked = _from_record("steps_checked", "Optimizer steps checked.")
    findings = _from_record("findings", "Every :class:`~lightning_gradguard.Finding` reported, in order.")
    halted_at = _from_record("halted_at", "The step at which the alarm halted training in this fit, if it did.")
    dump_paths = _from_record("dump_paths", "The crash dumps written.")

    @property
    def detector_kwargs(self) -> dict[str, Any]:
        """The detector settings as keywords (``asdict(alarm.config)``)."""
        return asdict(self.config)

    def _key_settings(self) -> dict[str, Any]:
        """Every setting of the saved state, so that two alarms that differ in one fit in one checkpoint.

        Not ``defer_host_read``: it changes when the host reads, not what is saved (the held
        reading is acted on before ``state_dict``), so a checkpoint moves between the modes.
        """
        return dict(
            actions=tuple(sorted(self.actions.items())),
            **asdict(self.config),
            episode_gap=self.episode_gap,
            group_by=self.group_by,
            group_depth=self.group_depth,
            group_patterns=self.group_patterns,
            log_every_n_steps=self.log_every_n_steps,
            crash_dump=self.crash_dump,
            dump_dir=self.dump_dir,
        )

    # ------------------------------------------------------------------ lifecycle

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.clear()
        self._deferred.reset()
        self._summary_logged_at = None
        self.record.halted_at = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()  # the last step's deferred reading: nothing is lost, a "raise" still raises

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.clear()
        self._lifted_min = _lightning.restore_min_limits(trainer, self._lifted_min)
        rank_zero_info(self.summary())
        self._log_summary(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._window.clear()
        self._deferred.reset()
        self._lifted_min = _lightning.restore_min_limits(trainer, self._lifted_min)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self._flush()  # training failed otherwise: still report the last deferred step (warned) ...
        except GradientAnomalyError as err:
            exception = err  # ... without raising over the error that ended the run
        if isinstance(exception, GradientAnomalyError):
            rank_zero_info(self.summary())
            self._log_summary(trainer)

    # ------------------------------------------------------------------ the micro-batches of a step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._window.start(batch_idx, batch, pl_module.automatic_optimization)

    @override
    def before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._window and pl_module.automatic_optimization:
            self._window.note_loss(loss)

    @override
    @torch.no_grad()  # statistics only: no autograd bookkeeping on each small op
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under gradient accumulation, note after each micro-batch whether the accumulated
        # gradients are still finite (a device flag, no sync), so that a crash dump can hold
        # the micro-batch that broke them. It reuses the shared micro-batch snapshot.
        if (
            self.crash_dump
            and self._window
            and pl_module.automatic_optimization
            and trainer.accumulate_grad_batches > 1
        ):
            self._window.note_gradients(self._snapshot(trainer, pl_module, _session.PHASE_BACKWARD).all_finite)

    # ------------------------------------------------------------------ the check

    @override
    @torch.no_grad()  # statistics only: no autograd bookkeeping on each small op
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = _lightning.raw_optimizer(optimizer)
        self._flush()  # the previous step's deferred reading first: it may halt
        if self.halted_at is not None:  # stopping: no further update may happen
            _session.drop_gradients(trainer, optimizer)
            return
        step = self._read(trainer, pl_module, optimizer)
        if step is not None:
            self._process(step)

    def _process(self, step: _Step) -> None:
        """The host's share of a checked step: count, act on its flags, log."""
        active = step.reading.active
        self.record.tick(active)
        if active:
            self._act(step, active)
        if step.trainer.loggers and self.is_log_step(step.trainer, step.log_step):  # Lightning's cadence
            self._log(step)

    def _flush(self) -> None:
        """Process the step whose host read was deferred, if one is held (see ``defer_host_read``)."""
        step = self._deferred.take()
        if step is not None:
            self._process(step)

    def _read(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> _Step | None:
        """Check the step's shared snapshot on the device; one host copy of the reading (``None``: held back)."""
        opt_idx = _session.optimizer_index(trainer, optimizer)
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        grouping = self._grouping(snap.params, trainer)
        stats = snap.grouped(grouping)
        units = None
        if self.config.dead_unit_share is not None:
            # counted per optimizer: with several, global_step alternates and could always land on one turn
            turn = self._unit_turns[opt_idx] = self._unit_turns.get(opt_idx, -1) + 1
            units = UnitStats.take(snap.params, grouping, pl_module, stats.norms.device, turn)
        detector = self._detector(opt_idx)
        scaler = _session.grad_scaler(trainer)
        scale = _lightning.current_scale(scaler) if scaler is not None else None
        window = self._window.take(pl_module.automatic_optimization)
        # the snapshot is the same on every rank (see _session.shared_snapshot) and so is
        # loss_finite: the detector's state and reading are identical everywhere
        reading = detector.update(
            stats,
            loss_finite=_losses_finite(trainer, window),
            scaler_active=scaler is not None,
            loss_scale=scale,
            units=units,
        )
        step = partial(
            _Step,
            trainer=trainer,
            pl_module=pl_module,
            optimizer=optimizer,
            opt_idx=opt_idx,
            step=trainer.global_step,
            stats=stats,
            detector=detector,
            scaler_active=scaler is not None,
            window=window,
            units=units,
            log_step=self.log_step(trainer),
        )
        if not self._deferred.applies(trainer, optimizer, stats.norms.device):
            return step(reading=reading.to_host())
        self._deferred.defer(optimizer, reading, lambda host: step(reading=host, deferred=True), stats)
        return None

    def _act(self, step: _Step, active: tuple[str, ...]) -> None:
        """Skip, stop or raise as the strongest action of the active kinds says; warn with the new findings."""
        strongest, findings = _decide(step, active, self.actions, self.record)
        if _STRENGTH[strongest] >= _STRENGTH["skip"]:
            if not step.deferred:  # a deferred step was skipped on the device already
                _session.drop_gradients(step.trainer, step.optimizer)
            self.record.skipped_steps += 1
        note = self._halt(step, strongest, findings) if _STRENGTH[strongest] >= _STRENGTH["stop"] else ""
        self.record.findings.extend(findings)
        for f in findings:
            rank_zero_warn(f.message() + ("\n  training stops now." if strongest == "stop" else "") + note)
            _session.log_text(step.trainer, f"alarm/{self._seg(step)}findings", f.markdown(), step.step)
        if strongest == "stop":
            self._log_summary(step.trainer)  # fit ends after this batch; the summary says why at once
        if strongest == "raise":
            raise GradientAnomalyError(next(f for f in findings if self.actions[f.kind] == "raise"))

    def _halt(self, step: _Step, strongest: str, findings: list[Finding]) -> str:
        """Stop training after this batch and write the crash dump; returns a note for the warning."""
        self.record.halted_at = step.step
        step.trainer.should_stop = True
        note = ""
        if strongest == "stop":
            lifted = _lightning.lift_min_limits(step.trainer)
            if lifted:
                self._lifted_min = lifted
                implicit = " (Lightning's default when neither min_steps nor min_epochs is given)"
                note = (
                    f"\n  Trainer({lifted}){implicit if lifted == 'min_epochs=1' else ''} was not reached yet: "
                    "Lightning would ignore the stop request and train on with every update dropped, so gradguard "
                    "lifted it for this fit."
                )
        if self.crash_dump:
            path, what = write_crash_dump(step.trainer, self.dump_dir, step.step, step.evidence, findings, step.window)
            self.record.dump_paths.append(path)
            for f in findings:
                f.dump_path, f.dump_batch = path, what
        return note

    @staticmethod
    def _seg(step: _Step) -> str:
        return f"opt{step.opt_idx}/" if len(step.trainer.optimizers) > 1 else ""

    def _log(self, step: _Step) -> None:
        metrics = self.record.metrics(step.reading, self._seg(step))
        _session.log_metrics(step.trainer, metrics, step.log_step, finite_only=True)

    def _log_summary(self, trainer: pl.Trainer) -> None:
        """The health summary to the Text tab (``alarm/summary``), once per fit and at most once per step."""
        if not trainer.loggers or self._summary_logged_at == trainer.global_step:
            return
        self._summary_logged_at = trainer.global_step
        _session.log_text(trainer, "alarm/summary", self.record.markdown(), trainer.global_step)

    def summary(self) -> str:
        """A short health report of the run so far."""
        return self.record.summary()

    def _detector(self, opt_idx: int) -> HealthDetector:
        detector = self.detectors.get(opt_idx)
        if detector is None:
            detector = self.detectors[opt_idx] = HealthDetector(self.config)
            restored = self._restored_detectors.pop(opt_idx, None)
            if restored:
                detector.load_state_dict(restored)
        return detector

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()  # a deferred step belongs in the saved counters and detector state
        return {"detectors": {i: d.state_dict() for i, d in self.detectors.items()}, **self.record.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._deferred.reset()
        self._restored_detectors = {int(i): s for i, s in state_dict.get("detectors", {}).items()}
        self.detectors.clear()
        self.record.load_state_dict(state_dict)
