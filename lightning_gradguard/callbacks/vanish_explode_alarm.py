"""VanishExplodeAlarm: catch vanishing, exploding and non-finite gradients early and act on them."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import GradGuardCallback, Layers
from lightning_gradguard.diagnosis import KINDS, Finding, GradientAnomalyError, HealthDetector, build_finding

ACTIONS = ("warn", "skip", "stop", "raise")
_STRENGTH = {"none": 0, "warn": 1, "skip": 2, "stop": 3, "raise": 4}
_ALARM_KINDS = ("nonfinite", "exploding", "vanishing", "dead")


def _check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        allowed = "a finite number > 0" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


@dataclass
class _MicroBatch:
    """One micro-batch behind the coming optimizer step: what a crash dump may need."""

    batch_idx: int | None
    batch: Any
    loss_finite: Tensor | None = None  # device flags, read only when a dump is written
    grad_finite: Tensor | None = None  # accumulated gradients finite after this micro-batch


def _first_nonfinite(window: list[_MicroBatch]) -> tuple[int, str]:
    """Position of the first micro-batch whose loss or accumulated gradient was non-finite, and which.

    ``(last, "")`` when no flag says so (no accumulation, or only a later rule fired).
    One host copy of the window's flags; runs only when a dump is written.
    """
    flags = [
        (i, name, t)
        for i, m in enumerate(window)
        for name, t in (("loss", m.loss_finite), ("gradient", m.grad_finite))
        if t is not None
    ]
    if flags:
        finite = torch.stack([t.reshape(()).to(flags[0][2].device) for _, _, t in flags]).tolist()
        for (i, name, _), ok in zip(flags, finite):
            if not ok:
                return i, name
    return max(len(window) - 1, 0), ""


class VanishExplodeAlarm(GradGuardCallback):
    r"""Detect vanishing, exploding and non-finite gradients; warn, skip the step, stop or raise.

    Every optimizer step the callback checks the shared gradient snapshot on the device
    and reads one small vector to the host (the flags of the step, plus the z-score,
    the deep/shallow ratio, the total norm and the loss scale); nothing else leaves the
    device unless a flag is up. It never computes norms of its own.

    What it detects (details and rules in :class:`~lightning_gradguard.diagnosis.HealthDetector`):

    - **non-finite**: NaN/Inf in a gradient or in the loss. The step is always skipped
      (gradients dropped before ``optimizer.step()``, so no NaN reaches the weights or the
      optimizer state); with ``halt_on_nan=True`` training then stops. Under an fp16
      ``GradScaler`` a lone overflow is normal (the scaler skips the step and lowers the
      scale): it is counted as ``overflow``, and becomes non-finite only when it repeats
      ``max_consecutive_overflows`` times in a row or the scale falls below ``min_loss_scale``.
    - **exploding**: total norm above ``max_norm``, or a spike: ``spike_zscore`` standard
      deviations above the run's own moving log-norm *and* ``spike_min_ratio`` times its
      level (after ``warmup_steps``).
    - **vanishing**: over the last ``patience`` steps, the median ratio of the deepest
      layer's gradient norm to the shallowest's is above ``vanish_ratio`` (optionally: the
      shallowest's median below ``vanish_floor`` while the deepest's is not).
    - **dead**: a layer whose gradient is exactly zero for ``dead_patience`` steps in a row.

    Each kind has an action: ``"warn"``, ``"skip"`` (warn and skip this optimizer step),
    ``"stop"`` (skip, then stop training gracefully after the batch) or ``"raise"`` (skip,
    then raise :class:`~lightning_gradguard.GradientAnomalyError` carrying the diagnosis).
    Warnings come once per episode (a kind that stays quiet for ``episode_gap`` steps
    ends its episode), on rank zero, and name the layers, the numbers and remedies that
    fit the model. Every rank takes the same decision at the same step: the flags are
    averaged across ranks before any decision. On ``stop``/``raise`` a crash dump (the
    step, the batch, the per-layer statistics and the finding) is written next to the logs.
    At the end of ``fit`` a short health summary is printed.

    Logged keys (at ``log_every_n_steps``; with several optimizers ``opt<i>/`` follows
    the prefix): ``alarm/nonfinite``, ``alarm/exploding``, ``alarm/vanishing``,
    ``alarm/dead``, ``alarm/overflow`` (steps flagged so far), ``alarm/skipped_steps``,
    ``alarm/zscore`` (log-norm z-score), ``alarm/deep_shallow_ratio``.

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
        ema_alpha: weight of the newest step in the moving log-norm mean/variance, in (0, 1).
        warmup_steps: finite steps before the spike rule is armed.
        vanish_ratio: median deepest/shallowest gradient-norm ratio that counts as
            vanishing; ``None`` disables it.
        vanish_floor: absolute floor for the shallowest layer's median norm; ``None``
            (default) disables it: a converged model is small everywhere without vanishing.
        patience: the window, in steps, of the vanishing medians.
        dead_patience: steps in a row of an exactly-zero gradient that make a layer dead.
        max_consecutive_overflows: fp16 overflow steps in a row that count as a failure.
        min_loss_scale: fp16 loss scale below which overflow counts as a failure.
        episode_gap: quiet steps that end an episode (and re-arm its warning).
        group_by, group_depth, group_patterns: how parameters form layers, as in
            :class:`~lightning_gradguard.GradientNormLogger`.
        log_every_n_steps: logging interval; ``None``: the Trainer's.
        crash_dump: write a crash dump on ``stop``/``raise``.
        dump_dir: where to write it; ``None``: the Trainer's ``log_dir``.

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
        nonfinite_action: str | None = None,
        explode_action: str = "warn",
        vanish_action: str = "warn",
        dead_action: str = "warn",
        max_norm: float | None = 1e6,
        spike_zscore: float | None = 8.0,
        spike_min_ratio: float | None = 50.0,
        ema_alpha: float = 0.05,
        warmup_steps: int = 20,
        vanish_ratio: float | None = 1e3,
        vanish_floor: float | None = None,
        patience: int = 20,
        dead_patience: int = 10,
        max_consecutive_overflows: int = 20,
        min_loss_scale: float = 1.0,
        episode_gap: int = 10,
        group_by: str = "module",
        group_depth: int | None = None,
        group_patterns: Mapping[str, str] | None = None,
        log_every_n_steps: int | None = None,
        crash_dump: bool = True,
        dump_dir: str | None = None,
    ) -> None:
        _validation.boolean("halt_on_nan", halt_on_nan)
        if nonfinite_action is not None:
            _validation.choice("nonfinite_action", nonfinite_action, ("skip", "stop", "raise"))
        _validation.choice("explode_action", explode_action, ACTIONS)
        _validation.choice("vanish_action", vanish_action, ACTIONS)
        _validation.choice("dead_action", dead_action, ACTIONS)
        _check_positive("max_norm", max_norm, allow_none=True)
        _check_positive("spike_zscore", spike_zscore, allow_none=True)
        _check_positive("spike_min_ratio", spike_min_ratio, allow_none=True)
        if isinstance(ema_alpha, bool) or not isinstance(ema_alpha, (int, float)) or not 0 < ema_alpha < 1:
            raise ValueError(f"`ema_alpha` must be a number in (0, 1), got {ema_alpha!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")
        _check_positive("vanish_ratio", vanish_ratio, allow_none=True)
        if vanish_ratio is not None and vanish_ratio <= 1:
            raise ValueError(f"`vanish_ratio` must be > 1 (deepest / shallowest norm), got {vanish_ratio!r}.")
        _check_positive("vanish_floor", vanish_floor, allow_none=True)
        _validation.integer("patience", patience)
        _validation.integer("dead_patience", dead_patience)
        _validation.integer("max_consecutive_overflows", max_consecutive_overflows)
        _check_positive("min_loss_scale", min_loss_scale)
        _validation.integer("episode_gap", episode_gap)
        super().__init__(
            log_every_n_steps=log_every_n_steps, layers=Layers.checked(group_by, group_depth, group_patterns)
        )
        _validation.boolean("crash_dump", crash_dump)
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise ValueError(f"`dump_dir` must be a path or None, got {dump_dir!r}.")

        self.halt_on_nan = halt_on_nan
        self.nonfinite_action = nonfinite_action or ("stop" if halt_on_nan else "skip")
        self.actions = {
            "nonfinite": self.nonfinite_action,
            "exploding": explode_action,
            "vanishing": vanish_action,
            "dead": dead_action,
        }
        self.detector_kwargs = dict(
            max_norm=max_norm,
            spike_zscore=spike_zscore,
            spike_min_ratio=spike_min_ratio,
            ema_alpha=float(ema_alpha),
            warmup_steps=warmup_steps,
            vanish_ratio=vanish_ratio,
            vanish_floor=vanish_floor,
            patience=patience,
            dead_patience=dead_patience,
            max_consecutive_overflows=max_consecutive_overflows,
            min_loss_scale=float(min_loss_scale),
        )
        self.episode_gap = episode_gap
        self.crash_dump = crash_dump
        self.dump_dir = None if dump_dir is None else os.fspath(dump_dir)

        self.detectors: dict[int, HealthDetector] = {}
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.episodes: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.first_step: dict[str, int | None] = dict.fromkeys(KINDS, None)
        self.skipped_steps = 0
        self.steps_checked = 0
        self.findings: list[Finding] = []
        self.halted_at: int | None = None
        self.dump_paths: list[str] = []
        self._quiet: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._in_episode: dict[str, bool] = dict.fromkeys(KINDS, False)
        # the micro-batches whose gradients the coming optimizer step applies (automatic
        # optimisation: every batch since the last step; manual: the current batch)
        self._window: list[_MicroBatch] = []
        self._lifted_min: str | None = None
        self._restored_detectors: dict[int, dict[str, Any]] = {}

    @property
    def state_key(self) -> str:
        """Every setting, so that two alarms that differ in anything fit in one checkpoint."""
        return self._generate_state_key(
            actions=tuple(sorted(self.actions.items())),
            **self.detector_kwargs,
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
        self.halted_at = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.clear()
        self._lifted_min = _lightning.restore_min_limits(trainer, self._lifted_min)
        rank_zero_info(self.summary())

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not pl_module.automatic_optimization:
            self._window.clear()  # manual optimisation: the user decides which backward passes reach a step
        self._window.append(_MicroBatch(batch_idx, batch))

    @override
    def before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._window and pl_module.automatic_optimization:
            self._window[-1].loss_finite = torch.isfinite(loss.detach()).all()

    @override
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
            self._window[-1].grad_finite = self._snapshot(trainer, pl_module, _session.PHASE_BACKWARD).all_finite

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = _lightning.raw_optimizer(optimizer)
        if self.halted_at is not None:  # stopping: no further update may happen
            _session.drop_gradients(optimizer)
            return
        step = trainer.global_step
        opt_idx = _session.optimizer_index(trainer, optimizer)
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        grouping = self._grouping(snap.params)
        stats = snap.grouped(grouping)
        detector = self._detector(opt_idx)
        scaler = _session.grad_scaler(trainer)
        scale = _lightning.current_scale(scaler) if scaler is not None else None
        window = self._window
        if pl_module.automatic_optimization:
            self._window = []  # the next step's gradients start from zero
        loss_finite = self._losses_finite(trainer, window)
        # the snapshot is the same on every rank (see _session.shared_snapshot) and so is
        # loss_finite: the detector's state and reading are identical everywhere
        reading = detector.update(stats, loss_finite=loss_finite, scaler_active=scaler is not None, loss_scale=scale)
        values = reading.tolist()  # the one host copy of the step
        self.steps_checked += 1
        fields = dict(zip(HealthDetector.FIELDS, values))
        active = [k for k in KINDS if fields[k] > 0]
        for kind in KINDS:
            if kind in active:
                self.counts[kind] += 1
                self._quiet[kind] = 0
            else:
                self._quiet[kind] += 1
                if self._quiet[kind] >= self.episode_gap:
                    self._in_episode[kind] = False
        if active:
            self._act(trainer, pl_module, optimizer, opt_idx, step, stats, values, active, scaler is not None, window)
        if self.is_log_step(trainer, step) and trainer.loggers:
            seg = f"opt{opt_idx}/" if len(trainer.optimizers) > 1 else ""
            metrics = {f"alarm/{seg}{k}": float(self.counts[k]) for k in KINDS}
            metrics[f"alarm/{seg}skipped_steps"] = float(self.skipped_steps)
            # TensorBoard cannot draw NaN/Inf: a z-score before the spike rule is armed, or a
            # ratio without two layers that have a gradient, is left out of that step
            for key, name in (("zscore", "zscore"), ("ratio", "deep_shallow_ratio")):
                if math.isfinite(fields[key]):
                    metrics[f"alarm/{seg}{name}"] = fields[key]
            _session.log_metrics(trainer, metrics, step)

    def _losses_finite(self, trainer: pl.Trainer, window: list[_MicroBatch]) -> Tensor | None:
        """Whether every loss behind the gradients of this step was finite, the same on every rank.

        Only the backward passes whose gradients the optimizer is about to apply count
        (automatic optimisation: the micro-batches since the last step). Under manual
        optimisation the decision rests on the gradients alone: the user chooses which
        backward passes reach ``step()`` (a guarded ``if loss.isfinite(): opt.step()``
        must not leave a stale flag for the next, clean step).
        """
        flags = [m.loss_finite for m in window if m.loss_finite is not None]
        if not flags:
            return None
        finite = torch.stack(flags).all() if len(flags) > 1 else flags[0]
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce((~finite).float(), reduce_op="sum") == 0
        return finite

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._window.clear()
        self._lifted_min = _lightning.restore_min_limits(trainer, self._lifted_min)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, GradientAnomalyError):
            rank_zero_info(self.summary())

    # ------------------------------------------------------------------ decisions

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        opt_idx: int,
        step: int,
        stats: Any,
        values: list[float],
        active: list[str],
        scaler_active: bool,
        window: list[_MicroBatch],
    ) -> None:
        detector = self.detectors[opt_idx]
        cache: dict[str, Any] = {}

        def host_view() -> tuple[Any, list[bool], int | None]:
            # more host copies, only when a finding or a dump is written (not on every
            # step of an ongoing episode)
            if not cache:
                cache["host"] = stats.to_host()
                cache["dead"] = detector.dead_groups().tolist() if "dead" in active else []
                cache["run"] = int(detector._state["overflow_run"].item()) if scaler_active else None
            return cache["host"], cache["dead"], cache["run"]

        strongest = "none"
        new_findings: list[Finding] = []
        for kind in active:
            if self.first_step[kind] is None:
                self.first_step[kind] = step
            if kind == "overflow":
                if not self._in_episode[kind]:
                    self._in_episode[kind] = True
                    self.episodes[kind] += 1
                continue
            action = self.actions[kind]
            if _STRENGTH[action] > _STRENGTH[strongest]:
                strongest = action
            if not self._in_episode[kind] or _STRENGTH[action] >= _STRENGTH["stop"]:
                host, dead, overflow_run = host_view()
                finding = build_finding(
                    kind,
                    step,
                    host,
                    values,
                    detector=detector,
                    present=stats.present,
                    model=pl_module,
                    scaler_active=scaler_active,
                    dead_groups=dead,
                    overflow_run=overflow_run,
                )
                if not self._in_episode[kind]:
                    self.episodes[kind] += 1
                self._in_episode[kind] = True
                new_findings.append(finding)
        if "nonfinite" in active and _STRENGTH[strongest] < _STRENGTH["skip"]:
            strongest = "skip"  # a non-finite step never reaches the weights
        if _STRENGTH[strongest] >= _STRENGTH["skip"]:
            _session.drop_gradients(optimizer)
            self.skipped_steps += 1
        stop_note = ""
        if _STRENGTH[strongest] >= _STRENGTH["stop"]:
            self.halted_at = step
            trainer.should_stop = True
            if strongest == "stop":
                lifted = _lightning.lift_min_limits(trainer)
                if lifted:
                    self._lifted_min = lifted
                    stop_note = (
                        f"\n  Trainer({lifted}) was not reached yet: Lightning would ignore the stop request and "
                        "train on with every update dropped, so gradguard lifted it for this fit."
                    )
            if self.crash_dump:
                path, what = self._write_dump(trainer, step, host_view()[0], values, new_findings, window)
                for f in new_findings:
                    f.dump_path = path
                    f.dump_batch = what
        self.findings.extend(new_findings)
        for f in new_findings:
            rank_zero_warn(f.message() + ("\n  training stops now." if strongest == "stop" else "") + stop_note)
        if strongest == "raise":
            raise GradientAnomalyError(next(f for f in new_findings if self.actions[f.kind] == "raise"))

    def _write_dump(
        self,
        trainer: pl.Trainer,
        step: int,
        host: Any,
        values: list[float],
        findings: list[Finding],
        window: list[_MicroBatch],
    ) -> tuple[str, str]:
        """Save the step's evidence; returns the path and which micro-batch the dump holds."""
        folder = self.dump_dir or trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = os.path.join(folder, f"gradguard_crash_step{step}{suffix}.pt")
        culprit, cause = _first_nonfinite(window)
        micro = window[culprit] if window else _MicroBatch(None, None)
        if cause:
            what = f"batch_idx {micro.batch_idx}, the first micro-batch of the step whose {cause} went non-finite"
        else:
            what = f"batch_idx {micro.batch_idx}, the step's last micro-batch"
        if len(window) > 1:
            what += f" ({culprit + 1} of {len(window)} accumulated)"
        payload = {
            "step": step,
            "batch_idx": micro.batch_idx,
            "batch": apply_to_collection(micro.batch, Tensor, lambda t: t.detach().cpu()),
            "batch_cause": cause or None,
            "window_batch_idx": [m.batch_idx for m in window],
            "group_norms": host.group_norms,
            "nonfinite_groups": list(host.nonfinite_groups),
            "total_norm": host.total_norm,
            "max_abs": host.max_abs,
            "reading": dict(zip(HealthDetector.FIELDS, values)),
            "findings": [f.as_dict() for f in findings],
            "rank": trainer.global_rank,
        }
        torch.save(payload, path)
        self.dump_paths.append(path)
        return path, what

    def summary(self) -> str:
        """A short health report of the run so far."""
        lines = [f"[gradguard] gradient health over {self.steps_checked} optimizer steps:"]
        any_issue = False
        for kind in KINDS:
            if self.counts[kind]:
                any_issue = True
                lines.append(
                    f"  {kind}: {self.counts[kind]} step(s) in {self.episodes[kind]} episode(s), "
                    f"first at step {self.first_step[kind]}"
                )
        if not any_issue:
            lines.append("  no vanishing, exploding, dead or non-finite gradients seen.")
        if self.skipped_steps:
            lines.append(f"  optimizer steps skipped by gradguard: {self.skipped_steps}")
        if self.halted_at is not None:
            lines.append(f"  training halted at step {self.halted_at}")
        for path in self.dump_paths:
            lines.append(f"  crash dump: {path}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers

    def _detector(self, opt_idx: int) -> HealthDetector:
        detector = self.detectors.get(opt_idx)
        if detector is None:
            detector = self.detectors[opt_idx] = HealthDetector(**self.detector_kwargs)
            restored = self._restored_detectors.pop(opt_idx, None)
            if restored:
                detector.load_state_dict(restored)
        return detector

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": {i: d.state_dict() for i, d in self.detectors.items()},
            "counts": dict(self.counts),
            "episodes": dict(self.episodes),
            "first_step": dict(self.first_step),
            "skipped_steps": self.skipped_steps,
            "steps_checked": self.steps_checked,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_detectors = {int(i): s for i, s in state_dict.get("detectors", {}).items()}
        self.detectors.clear()
        self.counts.update(state_dict.get("counts", {}))
        self.episodes.update(state_dict.get("episodes", {}))
        self.first_step.update(state_dict.get("first_step", {}))
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.steps_checked = state_dict.get("steps_checked", 0)
