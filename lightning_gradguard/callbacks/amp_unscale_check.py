"""AmpUnscaleCheck: make fp16 mixed precision safe to observe and clip."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import GradGuardCallback, GroupBy, Layers
from lightning_gradguard.stats import zero_fractions


@dataclass
class _Overflows:
    """Overflow bookkeeping on the device (no host sync per step): counts, runs and a ring of recent steps."""

    overflow_steps: Tensor
    run: Tensor  # overflow steps in a row, now
    max_run: Tensor  # longest run since the last logging step
    steps: Tensor
    pos: Tensor
    ring: Tensor  # 1 for each recent step that overflowed

    @classmethod
    def zeros(cls, window: int, device: torch.device) -> _Overflows:
        zero = torch.zeros((), device=device)
        return cls(*(zero.clone() for _ in range(5)), ring=torch.zeros(window, device=device))

    def record(self, overflow: Tensor) -> None:
        overflow = overflow.float()
        self.overflow_steps = self.overflow_steps + overflow
        self.run = torch.where(overflow > 0, self.run + 1, torch.zeros_like(self.run))
        self.max_run = torch.maximum(self.max_run, self.run)
        self.ring = self.ring.index_copy(0, self.pos.long().view(1), overflow.view(1))
        self.pos = (self.pos + 1) % self.ring.numel()
        self.steps = self.steps + 1

    def skip_rate(self) -> Tensor:
        """Share of the last ``window`` steps that overflowed (of the steps so far while fewer)."""
        return self.ring.sum() / self.steps.clamp(1, self.ring.numel())

    def to(self, device: torch.device) -> _Overflows:
        return _Overflows(**{k: v.to(device) for k, v in vars(self).items()})

    def state_dict(self) -> dict[str, list[float] | float]:
        return {k: v.tolist() for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], window: int) -> _Overflows:
        fresh = cls.zeros(window, torch.device("cpu"))
        for k, v in state.items():
            if k in vars(fresh):
                setattr(fresh, k, torch.tensor(v, dtype=torch.float32))
        return fresh


def _scaled_clip_message(algorithm: str, clip_val: Any, optimizer: str, fixed: bool) -> str:
    action = (
        "gradguard multiplied the threshold by the loss scale so the clip means what was written "
        "(fix_scaled_clipping=True)"
        if fixed
        else "the clip is left as it is (fix_scaled_clipping=False)"
    )
    return (
        f"Gradient clipping ({algorithm}, threshold {clip_val}) ran on gradients still multiplied by the fp16 "
        f"loss scale (optimizer {optimizer}, not unscaled yet): a {algorithm} clip of {clip_val} there "
        f"means {clip_val}/scale on the true gradients, so it clips far too hard (or, for an optimizer that "
        f"unscales itself, at the wrong point). This happens with self.clip_gradients() after manual_backward() "
        f"in manual optimisation. Fix: clip in the LightningModule's on_before_optimizer_step(self, optimizer), "
        f"which Lightning runs after unscaling, or attach lightning_gradguard.AdaptiveClipper. Now {action}."
    )


def _scaled_step_message(optimizer: str) -> str:
    return (
        f"{optimizer} unscales its gradients inside step() (it declares _step_supports_amp_scaling, as fused "
        "optimizers do), so Lightning does not unscale them first: in on_before_optimizer_step they are "
        "still multiplied by the loss scale, and any code that reads or clips them there is off by that "
        "factor (Lightning's gradient_clip_val refuses such optimizers). gradguard divides the scale out "
        "of its own statistics and clips. Fix for your own code: divide by "
        "trainer.precision_plugin.scaler.get_scale(), or use a non-fused optimizer."
    )


def _underflow_message(risen: list[str], loss_scale: float) -> str:
    more = f" and {len(risen) - 5} more" if len(risen) > 5 else ""
    return (
        "Gradients underflow in fp16: the fraction of exactly-zero gradient elements rose in "
        + ", ".join(risen[:5])
        + more
        + f" while the loss scale fell to {loss_scale:.3g}. Small gradients round to 0 in fp16 below ~6e-8. "
        "Train in bf16 ('bf16-mixed'), or give the GradScaler a higher init_scale / lower backoff, and look "
        "for what forces the scale down (overflowing layers)."
    )


class AmpUnscaleCheck(GradGuardCallback):
    r"""Check that fp16 mixed precision is observed and clipped on unscaled gradients.

    Under fp16 AMP a ``GradScaler`` multiplies the loss by a large scale (65536 at first),
    so gradients are scaled until ``scaler.unscale_(optimizer)`` runs — in Lightning right
    before ``on_before_optimizer_step``, but not for optimizers that unscale inside their
    ``step()``, and never in ``on_after_backward``. This callback:

    - warns once per optimizer whose gradients are still scaled in
      ``on_before_optimizer_step`` (``_step_supports_amp_scaling``, e.g. fused optimizers),
      with the cause and the fix. gradguard's shared snapshot divides the scale out
      whether or not this callback is attached, so every gradguard statistic and clip is
      right anyway;
    - catches gradient clipping on scaled gradients — ``self.clip_gradients(...)`` after
      ``manual_backward`` in manual optimisation clips the *scaled* gradients, so a
      threshold of 1.0 leaves a true norm of 1/scale. It warns once and, with
      ``fix_scaled_clipping=True``, multiplies the threshold by the current scale so the
      clip means what was written (this reads the scale to the host on those steps);
    - tracks loss-scale health: the scale, steps whose gradients overflowed (the scaler
      skips them), and the skip rate over the last ``skip_rate_window`` steps; warns when
      the scale falls below ``min_loss_scale`` or the skip rate exceeds ``max_skip_rate``
      (thrashing), and when ``max_consecutive_overflows`` steps in a row overflow. It never
      stops training itself: attach :class:`~lightning_gradguard.VanishExplodeAlarm` to halt
      on persistent overflow (its non-finite rules take over);
    - watches fp16 underflow: at logging steps, the fraction of exactly-zero gradient
      elements per layer; when it rises by ``underflow_rise`` as the scale falls, says that
      gradients underflow and suggests bf16 or another initial scale.

    With bf16, fp32 or no scaler it says once at setup that there is nothing to check and
    costs nothing afterwards. (On CPU, Lightning runs ``precision="16-mixed"`` as bf16;
    fp16 on CPU needs ``plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]``.)

    Cost per step: a few device ops on the shared snapshot's finiteness flag; at logging
    steps one host copy (plus one ``foreach`` pass over the gradients for underflow).

    Logged keys (at ``log_every_n_steps``): ``amp/loss_scale``, ``amp/loss_scale_log2`` (the
    same in powers of two, readable while it spans decades), ``amp/overflow_steps``
    (steps whose gradients overflowed so far), ``amp/skip_rate`` (over the last
    ``skip_rate_window`` steps, or all steps so far while fewer),
    ``amp/zero_grad_fraction/total`` and ``amp/zero_grad_fraction/<group>``
    (``track_underflow=True``).

    Args:
        log_every_n_steps: logging and checking interval; ``None``: the Trainer's.
        min_loss_scale: warn when the scale falls below this.
        max_skip_rate: warn when more than this fraction of the last ``skip_rate_window``
            steps overflowed, in (0, 1] (judged once a full window of steps was seen: the first steps
            overflow while the scaler calibrates its scale).
        skip_rate_window: steps in the skip-rate window.
        max_consecutive_overflows: warn after this many overflow steps in a row.
        track_underflow: measure the fraction of exactly-zero gradient elements.
        underflow_rise: rise of a layer's zero fraction (0..1) that, with a falling scale,
            counts as underflow.
        fix_scaled_clipping: correct clipping done on scaled gradients (see above).
        group_by, group_depth, group_patterns: how parameters form layers, as in
            :class:`~lightning_gradguard.GradientNormLogger`.

    Raises:
        ValueError: if an argument is outside what is allowed; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradguard import AmpUnscaleCheck, GradientNormLogger

        trainer = Trainer(precision="16-mixed", callbacks=[AmpUnscaleCheck(), GradientNormLogger()])
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        min_loss_scale: float = 1.0,
        max_skip_rate: float = 0.05,
        skip_rate_window: int = 200,
        max_consecutive_overflows: int = 10,
        track_underflow: bool = True,
        underflow_rise: float = 0.1,
        fix_scaled_clipping: bool = True,
        group_by: GroupBy = "module",
        group_depth: int | None = None,
        group_patterns: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            log_every_n_steps=log_every_n_steps, layers=Layers.checked(group_by, group_depth, group_patterns)
        )
        self.min_loss_scale = _validation.number("min_loss_scale", min_loss_scale, low=0.0)
        self.max_skip_rate = _validation.number("max_skip_rate", max_skip_rate, low=0.0, high=1.0)
        self.skip_rate_window = _validation.integer("skip_rate_window", skip_rate_window, high=_validation.MAX_WINDOW)
        self.max_consecutive_overflows = _validation.integer("max_consecutive_overflows", max_consecutive_overflows)
        self.track_underflow = _validation.boolean("track_underflow", track_underflow)
        self.underflow_rise = _validation.number("underflow_rise", underflow_rise, low=0.0, high=1.0)
        self.fix_scaled_clipping = _validation.boolean("fix_scaled_clipping", fix_scaled_clipping)

        self.active = False
        self.scaled_optimizers: list[str] = []  # optimizers seen with scaled gradients at the step
        self.scaled_clip_calls = 0  # clip_gradients calls that found scaled gradients
        self.warnings: list[str] = []  # every warning issued, for programmatic checks
        self._warned: set[str] = set()
        self._restore_clip: Any = None
        self._overflows: _Overflows | None = None
        self._zero_baseline: dict[str, tuple[float, float]] = {}  # group -> (lowest zero fraction, scale then)

    def _key_settings(self) -> dict[str, Any]:
        """Every setting, so that two checks that differ in anything fit in one checkpoint."""
        return dict(
            log_every_n_steps=self.log_every_n_steps,
            min_loss_scale=self.min_loss_scale,
            max_skip_rate=self.max_skip_rate,
            skip_rate_window=self.skip_rate_window,
            max_consecutive_overflows=self.max_consecutive_overflows,
            track_underflow=self.track_underflow,
            underflow_rise=self.underflow_rise,
            fix_scaled_clipping=self.fix_scaled_clipping,
            group_by=self.group_by,
            group_depth=self.group_depth,
            group_patterns=self.group_patterns,
        )

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        scaler = _session.grad_scaler(trainer)
        self.active = scaler is not None
        if not self.active:
            precision = getattr(trainer.precision_plugin, "precision", "32-true")
            hint = ""
            if precision == "bf16-mixed" and trainer.strategy.root_device.type == "cpu":
                hint = (
                    " (on CPU, Lightning runs precision='16-mixed' as bf16; real fp16 needs "
                    "plugins=[MixedPrecision('16-mixed', 'cpu', torch.amp.GradScaler('cpu'))])"
                )
            rank_zero_info(
                f"AmpUnscaleCheck: precision is {precision!r} without an fp16 GradScaler, so gradients are never "
                f"scaled: nothing to check, the callback stays idle{hint}."
            )
            return
        self._restore_clip = _lightning.wrap_clip_gradients(trainer, functools.partial(self._checked_clip, trainer))
        if is_overridden("on_after_backward", pl_module):
            # a note, not a warning: the override may well handle the scale already
            rank_zero_info(
                f"[gradguard] note: {type(pl_module).__name__} overrides on_after_backward: under fp16 AMP the "
                "gradients there are still multiplied by the loss scale. If it reads or clips them, divide by "
                "trainer.precision_plugin.scaler.get_scale(), or move the code to on_before_optimizer_step, which "
                "Lightning runs after unscaling. (gradguard's own statistics are unscaled in both hooks.)",
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._restore_clip is not None:
            self._restore_clip()
            self._restore_clip = None

    # ------------------------------------------------------------------ the checks

    def _checked_clip(self, trainer: pl.Trainer, original: Any, optimizer: Any, clip_val: Any, algorithm: Any) -> None:
        """Lightning's ``clip_gradients``, made right when the gradients are still scaled."""
        kwargs = {} if algorithm is None else {"gradient_clip_algorithm": algorithm}
        scaler = _session.grad_scaler(trainer)
        raw = _lightning.raw_optimizer(optimizer)
        if scaler is None or not clip_val or _lightning.optimizer_unscaled(scaler, raw):
            return original(optimizer, clip_val, **kwargs)
        self.scaled_clip_calls += 1
        algo = GradClipAlgorithmType(algorithm) if algorithm is not None else GradClipAlgorithmType.NORM
        message = _scaled_clip_message(algo.value, clip_val, type(raw).__name__, self.fix_scaled_clipping)
        self._warn_once("scaled_clip", message)
        if self.fix_scaled_clipping:
            clip_val = float(clip_val) * scaler.get_scale()
        return original(optimizer, clip_val, **kwargs)

    @override
    @torch.no_grad()  # statistics only: no autograd bookkeeping on each small op
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.active:
            return
        scaler = _session.grad_scaler(trainer)
        if scaler is None:
            return
        optimizer = _lightning.raw_optimizer(optimizer)
        if not _lightning.optimizer_unscaled(scaler, optimizer):
            name = type(optimizer).__name__
            if name not in self.scaled_optimizers:
                self.scaled_optimizers.append(name)
            self._warn_once(f"scaled_step:{name}", _scaled_step_message(name))
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        scale = _lightning.current_scale(scaler)
        overflows = self._overflows_on(snap.norms.device)
        overflows.record(~snap.all_finite)
        step = self.log_step(trainer)
        if self.is_log_step(trainer, step):
            self._report(trainer, snap, overflows, scale, step)

    def _report(self, trainer: pl.Trainer, snap: Any, overflows: _Overflows, scale: Tensor | None, step: int) -> None:
        grouping = self._grouping(snap.params, trainer)
        ref = overflows.steps
        parts = [
            (scale if scale is not None else torch.ones(())).to(ref).reshape(1),
            overflows.overflow_steps.reshape(1),
            overflows.skip_rate().reshape(1),
            torch.maximum(overflows.max_run, overflows.run).reshape(1),
            overflows.steps.reshape(1),
        ]
        if self.track_underflow:
            parts.append(zero_fractions(snap.params, grouping).to(ref))
        values = torch.cat(parts).tolist()  # the one host copy of a logging step
        loss_scale, overflow_steps, skip_rate, longest_run, steps = values[:5]
        overflows.max_run.zero_()
        metrics = {
            "amp/loss_scale": loss_scale,
            "amp/loss_scale_log2": math.log2(loss_scale) if loss_scale > 0 else math.nan,
            "amp/overflow_steps": overflow_steps,
            "amp/skip_rate": skip_rate,
        }
        if self.track_underflow:
            metrics.update(self._underflow_metrics(snap, grouping, values[5:], loss_scale))
        _session.log_metrics(trainer, metrics, step, finite_only=True)
        self._check_health(trainer, step, loss_scale, skip_rate, int(longest_run), int(steps))

    def _underflow_metrics(
        self, snap: Any, grouping: Any, fractions: list[float], loss_scale: float
    ) -> dict[str, float]:
        """``amp/zero_grad_fraction/*`` of the layers that have a gradient; checks for underflow."""
        sizes = [0] * len(grouping)
        for gi, p, has in zip(grouping.index, snap.params.params, snap.has_grad):
            if has:
                sizes[gi] += p.numel()
        by_name = {n: f for n, f, size in zip(grouping.names, fractions, sizes) if size}
        metrics = {"amp/zero_grad_fraction/total": sum(f * n for f, n in zip(fractions, sizes)) / max(1, sum(sizes))}
        metrics.update({f"amp/zero_grad_fraction/{name}": frac for name, frac in by_name.items()})
        self._check_underflow(by_name, loss_scale)
        return metrics

    def _check_health(
        self, trainer: pl.Trainer, step: int, loss_scale: float, skip_rate: float, longest_run: int, steps: int
    ) -> None:
        if loss_scale < self.min_loss_scale:
            self._warn_once(
                "low_scale",
                f"The fp16 loss scale fell to {loss_scale:.3g} (below min_loss_scale={self.min_loss_scale:g}) at step "
                f"{step}: gradients overflow even barely scaled, so the model itself is producing huge or non-finite "
                "values. Look for exploding gradients (VanishExplodeAlarm), lower the learning rate, or train in bf16.",
            )
        # judged over a full window: the first steps of a run overflow while the scaler calibrates
        if skip_rate > self.max_skip_rate and steps >= self.skip_rate_window:
            self._warn_once(
                "thrashing",
                f"{skip_rate:.0%} of the last {self.skip_rate_window} optimizer steps were skipped for fp16 overflow "
                f"(max_skip_rate={self.max_skip_rate:g}) at step {step}: the GradScaler is thrashing and those steps "
                "train nothing. Lower the GradScaler's growth_factor or raise its growth_interval, lower the learning "
                "rate, or use bf16.",
            )
        if longest_run >= self.max_consecutive_overflows:
            from lightning_gradguard.callbacks.vanish_explode_alarm import VanishExplodeAlarm

            then = (
                "VanishExplodeAlarm is attached and will act on it with its non-finite rules."
                if self.attached(trainer, VanishExplodeAlarm)
                else "Training goes on; attach lightning_gradguard.VanishExplodeAlarm to halt on it."
            )
            self._warn_once(
                "persistent_overflow",
                f"{longest_run} optimizer steps in a row overflowed in fp16 (by step {step}; loss scale now "
                f"{loss_scale:.3g}): the gradients are non-finite whatever the scale. {then}",
            )

    def _check_underflow(self, fractions: dict[str, float], loss_scale: float) -> None:
        risen = []
        for name, frac in fractions.items():
            base = self._zero_baseline.get(name)
            if base is None or frac < base[0]:
                self._zero_baseline[name] = (frac, loss_scale)
                continue
            low, scale_then = base
            if frac - low >= self.underflow_rise and loss_scale < scale_then:
                risen.append(f"{name} ({low:.0%} -> {frac:.0%})")
        if risen:
            self._warn_once("underflow", _underflow_message(risen, loss_scale))

    @override
    def custom_scalar_charts(self, trainer: pl.Trainer) -> dict[str, list[Any]]:
        """The loss scale (log2) and the skip rate, when an fp16 scaler is there to watch."""
        if not self.active:
            return {}
        return {
            "fp16 loss scale (log2)": ["Multiline", [r"^amp/loss_scale_log2$"]],
            "fp16 steps skipped for overflow (rate)": ["Multiline", [r"^amp/skip_rate$"]],
        }

    # ------------------------------------------------------------------ helpers

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        self.warnings.append(message)
        rank_zero_warn(f"[gradguard] {message}")

    def _overflows_on(self, device: torch.device) -> _Overflows:
        if self._overflows is None:
            self._overflows = _Overflows.zeros(self.skip_rate_window, device)
        elif self._overflows.steps.device != device:
            self._overflows = self._overflows.to(device)
        return self._overflows

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "device_state": self._overflows.state_dict() if self._overflows is not None else {},
            "zero_baseline": dict(self._zero_baseline),
            "warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("device_state")
        self._overflows = _Overflows.from_state(saved, self.skip_rate_window) if saved else None
        self._zero_baseline = {k: tuple(v) for k, v in state_dict.get("zero_baseline", {}).items()}
        self._warned = set(state_dict.get("warned", []))
