"""The few places where lightning_gradguard touches Lightning (and GradScaler) internals.

Everything that reads a private attribute lives here, so that a Lightning or torch
upgrade that moves one has a single place to mend.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradguard.stats import GradSnapshot, ParamSet, agree_across_ranks, take_snapshot

PHASE_BACKWARD = "backward"
PHASE_STEP = "step"


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled fp16 ``GradScaler`` of the trainer's precision plugin, if any."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not hasattr(scaler, "is_enabled") or not scaler.is_enabled():
        return None
    return scaler


def optimizer_unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran for the current step."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states.get(id(optimizer))  # a defaultdict: .get does not create
    return state is not None and state["stage"] is OptState.UNSCALED


def current_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """The scale as a device tensor (no host sync), or ``None`` before the first ``scale()``."""
    return scaler._get_scale_async()


def pending_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer | None, phase: str) -> Tensor | None:
    """The loss scale still applied to the gradients at this point, or ``None``.

    In ``on_after_backward`` gradients are always scaled under an enabled scaler. In
    ``on_before_optimizer_step`` they are scaled unless ``unscale_`` ran for this optimizer
    (Lightning skips it for optimizers that unscale inside ``step()``).
    """
    scaler = grad_scaler(trainer)
    if scaler is None:
        return None
    if phase == PHASE_STEP and optimizer is not None and optimizer_unscaled(scaler, optimizer):
        return None
    return current_scale(scaler)


def check_strategy(strategy: Any, callback: str) -> None:
    """Refuse strategies whose gradients gradguard cannot see, naming the strategy and what to use.

    DeepSpeed (ZeRO) keeps gradients in the engine's partitioned buffers, not in
    ``param.grad``: every norm, clip and NaN check would be silently wrong there.

    Raises:
        ValueError: for a ``DeepSpeedStrategy``.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy  # the class imports without deepspeed installed

    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            f"{callback} does not support {type(strategy).__name__}: DeepSpeed keeps the gradients in its engine's "
            "partitioned buffers, not in `param.grad`, so gradguard's norms, clipping and NaN checks would be "
            "silently wrong. Use strategy='ddp', 'fsdp' or ModelParallelStrategy (FSDP2) with gradguard, or "
            "DeepSpeed's own `gradient_clipping` and overflow checks with DeepSpeed."
        )


def raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 if it is not there)."""
    for i, opt in enumerate(trainer.optimizers):
        if raw_optimizer(opt) is optimizer:
            return i
    return 0


@dataclass
class _Session:
    """Per-trainer state shared by every gradguard callback attached to it."""

    backward_count: int = 0
    last_loss: Tensor | None = None
    param_sets: dict[Any, tuple[Any, list[Any], ParamSet]] = field(default_factory=dict)
    snapshot_key: tuple[Any, ...] | None = None
    snapshots: dict[tuple[Any, ...], GradSnapshot] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)


_SESSIONS: weakref.WeakKeyDictionary[pl.Trainer, _Session] = weakref.WeakKeyDictionary()


def session(trainer: pl.Trainer) -> _Session:
    """The shared state of ``trainer`` (created on first use)."""
    state = _SESSIONS.get(trainer)
    if state is None:
        state = _SESSIONS[trainer] = _Session()
    return state


def note_backward(trainer: pl.Trainer, loss: Tensor) -> None:
    """Count one backward pass; every gradguard callback calls this in ``on_before_backward``.

    All callbacks of one backward receive the same ``loss`` object, so the count moves
    once per backward whatever the number of callbacks. A strong reference to the last
    loss is kept so that its ``id`` cannot be reused by the next one.
    """
    state = session(trainer)
    if state.last_loss is not loss:
        state.last_loss = loss
        state.backward_count += 1


def optimizer_layout(optimizer: torch.optim.Optimizer) -> tuple[tuple[int, int], ...]:
    """A fingerprint of the parameters ``optimizer`` holds, in O(param groups), not O(parameters).

    One ``(id(list), len(list))`` per param group: ``add_param_group`` (as Lightning's
    ``BaseFinetuning.unfreeze_and_add_param_group`` does), appending to or removing from a
    group's list, and replacing a group's list all change it. The lists are kept alive by
    the cache entry that stores the fingerprint, so their ids cannot be reused. (Assigning
    one element of a group's list in place, ``group["params"][k] = other``, keeps the
    fingerprint; nothing in torch or Lightning does that.) A ``requires_grad`` flip needs
    no fingerprint: parameter sets hold frozen parameters too, and each step reads which
    ones have a gradient.
    """
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def param_set(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None) -> ParamSet:
    """The cached :class:`ParamSet` of ``optimizer`` (or of the whole module when ``None``).

    Rebuilt only when the optimizer's layout changes (a param group added, parameters
    added to or removed from one). The module's set (``None``, for the backward phase)
    is rebuilt when any optimizer of the trainer changes layout. Each set holds frozen
    parameters as well, so unfreezing mid-run is seen at the very next step.
    """
    state = session(trainer)
    if optimizer is None:
        key = None
        sources = [raw_optimizer(o) for o in trainer.optimizers]
    else:
        key = id(optimizer)
        sources = [optimizer]
    fingerprint = tuple(optimizer_layout(o) for o in sources)
    cached = state.param_sets.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[2]
    if optimizer is None:
        params = ParamSet.from_module(pl_module, include_frozen=True)
    else:
        params = ParamSet.from_optimizer(optimizer, pl_module)
    pinned = [g["params"] for o in sources for g in o.param_groups]  # keeps the fingerprint's ids unique
    state.param_sets[key] = (fingerprint, pinned, params)
    return params


def shared_snapshot(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    phase: str,
    optimizer: torch.optim.Optimizer | None = None,
) -> GradSnapshot:
    """The gradient snapshot of this moment, computed once and shared by all callbacks.

    Keyed by phase, backward count, global step and optimizer: whichever gradguard callback
    asks first computes it, the others get the same object, whatever their order. The
    snapshot shows the gradients as backward produced them (unscaled, before any clipping
    by a gradguard callback), so every callback sees the same numbers.

    With several ranks, the step snapshot is made identical on every rank
    (:func:`~lightning_gradguard.stats.agree_across_ranks`, one small all-reduce): DDP's
    gradients are equal after its all-reduce, but anything that touches one rank's
    gradients afterwards (a hook, an overflow) would otherwise make the ranks decide
    differently and their clipping statistics and weights drift apart.
    """
    state = session(trainer)
    if phase == PHASE_BACKWARD:
        optimizer = None
    key = (phase, state.backward_count, trainer.global_step, id(optimizer) if optimizer is not None else None)
    if state.snapshot_key is None or state.snapshot_key[:3] != key[:3]:
        state.snapshots.clear()
    state.snapshot_key = key
    snap = state.snapshots.get(key)
    if snap is None:
        params = param_set(trainer, pl_module, optimizer)
        snap = take_snapshot(params, scale=pending_scale(trainer, optimizer, phase))
        if phase == PHASE_STEP and trainer.world_size > 1:
            snap = agree_across_ranks(snap)
        state.snapshots[key] = snap
    return snap


def lift_min_limits(trainer: pl.Trainer) -> str | None:
    """Let ``trainer.should_stop`` take effect now, although ``min_steps``/``min_epochs`` are not met.

    Lightning ignores ``should_stop`` until ``Trainer(min_steps=..., min_epochs=...)`` are
    reached (``FitLoop._can_stop_early``): after a halt the run would go on with every
    update dropped. The limits are set to ``None`` on the fit loop (public attributes)
    until :func:`restore_min_limits`. Returns what was lifted (``"min_steps=100"``), or
    ``None`` when nothing stood in the way.
    """
    loop = trainer.fit_loop
    lifted = []
    if loop.min_epochs and loop.epoch_progress.current.processed < loop.min_epochs:
        lifted.append(("min_epochs", loop.min_epochs))
    if loop.epoch_loop.min_steps and loop.epoch_loop.global_step < loop.epoch_loop.min_steps:
        lifted.append(("min_steps", loop.epoch_loop.min_steps))
    if not lifted:
        return None
    for name, _ in lifted:
        if name == "min_epochs":
            loop.min_epochs = None
        else:
            loop.epoch_loop.min_steps = None
    return ", ".join(f"{name}={value}" for name, value in lifted)


def restore_min_limits(trainer: pl.Trainer, lifted: str | None) -> None:
    """Put back what :func:`lift_min_limits` took away (so a later ``fit`` sees the user's limits)."""
    if not lifted:
        return None
    for part in lifted.split(", "):
        name, value = part.split("=")
        if name == "min_epochs":
            trainer.fit_loop.min_epochs = int(value)
        else:
            trainer.fit_loop.epoch_loop.min_steps = int(value)
    return None


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Turn the coming ``optimizer.step()`` into a no-op by setting its gradients to ``None``.

    Called from ``on_before_optimizer_step``, which Lightning runs inside the optimizer's
    closure, just before the update. torch's optimizers skip parameters without a
    gradient entirely: no weight change, no weight decay, no moment or step-count update,
    so nothing of a bad gradient reaches the weights or the optimizer state. Under a
    ``GradScaler`` the scaler's own bookkeeping (``step``/``update``) goes on unchanged.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def wrap_clip_gradients(trainer: pl.Trainer, wrapper: Any) -> Any:
    """Route the precision plugin's ``clip_gradients`` through ``wrapper(original, optimizer, clip_val, algorithm)``.

    Both ``LightningModule.clip_gradients`` (manual optimisation) and Lightning's own
    ``gradient_clip_val`` end in this method. Returns a callable that undoes the wrap.
    """
    plugin = trainer.precision_plugin
    original = plugin.clip_gradients

    def clip_gradients(optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        return wrapper(original, optimizer, clip_val, gradient_clip_algorithm)

    plugin.clip_gradients = clip_gradients  # instance attribute shadows the method

    def restore() -> None:
        if plugin.__dict__.get("clip_gradients") is clip_gradients:
            del plugin.clip_gradients

    return restore


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of the trainer, on rank zero.

    A ``TensorBoardLogger`` gets all of them in one event (one ``Summary`` with one value
    per tag), which costs 0.3 ms for 75 tags where ``log_metrics`` — one ``add_scalar``
    each — took 8.6 ms here. Other loggers get their own ``log_metrics``.
    """
    if not trainer.loggers or not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        writer = getattr(logger.experiment, "_get_file_writer", None) if isinstance(logger, TensorBoardLogger) else None
        if writer is None:
            logger.log_metrics(metrics, step=step)
            continue
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
        writer().add_summary(summary, step)
