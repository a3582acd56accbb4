"""The state that every gradguard callback of one Trainer shares: one snapshot per step.

:class:`Session` is attached to the trainer (a weak mapping, so it dies with it). It
counts backward passes, keeps each optimizer's :class:`~lightning_gradguard.stats.ParamSet`
(rebuilt only when the optimizer's param groups change) and the snapshot of the current
moment, so that norms are computed once whatever the number and order of the callbacks.
It also holds what the callbacks tell each other (which gradguard callbacks are
attached), instead of looking each other up by name.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradguard import _lightning
from lightning_gradguard.stats import GradSnapshot, ParamSet, agree_across_ranks, take_snapshot

PHASE_BACKWARD = "backward"
PHASE_STEP = "step"


@dataclass
class Session:
    """Per-trainer state shared by every gradguard callback attached to it.

    Attributes:
        backward_count: backward passes seen so far (the snapshot key of a micro-batch).
        attached: the gradguard callbacks of the trainer, by class (filled at ``setup``).
        layout: the custom-scalars charts last written (:func:`write_layout`).
        wants_max_abs: an attached callback reads max |g| (``needs_max_abs``): snapshots
            compute it with the norms, before anything changes the gradients.
        last_loss: the loss of the latest backward pass while something still holds it
            (its autograd graph's structure gives the forward order of the layers,
            ``stats.ForwardOrder``); ``None`` once it is gone.
    """

    backward_count: int = 0
    attached: dict[type, list[Any]] = field(default_factory=dict)
    layout: dict[str, list[Any]] | None = None
    _last_loss: weakref.ref[Tensor] | None = None
    _held_loss: Tensor | None = None
    _stepped: bool = False
    _order_wanted: list[ParamSet] = field(default_factory=list)
    wants_max_abs: bool = False
    _param_sets: dict[Any, tuple[Any, list[Any], ParamSet]] = field(default_factory=dict)
    _snapshot_key: tuple[Any, ...] | None = None
    _snapshots: dict[tuple[Any, ...], GradSnapshot] = field(default_factory=dict)

    @property
    def last_loss(self) -> Tensor | None:
        return self._last_loss() if self._last_loss is not None else None

    def needs_loss(self) -> bool:
        """Whether the next loss may be needed for a forward order: before the first step, or a set still waits."""
        self._order_wanted = [ps for ps in self._order_wanted if ps.forward_order is None]
        return not self._stepped or bool(self._order_wanted)

    def want_order(self, params: ParamSet) -> None:
        """``params`` asked for its forward order and has none yet (no loss was at hand): keep the next loss."""
        if params.forward_order is None and all(ps is not params for ps in self._order_wanted):
            self._order_wanted.append(params)

    def clear_snapshots(self) -> None:
        """Forget the snapshot of the current moment (the next request computes it again)."""
        self._snapshots.clear()
        self._snapshot_key = None

    def has(self, kind: type) -> bool:
        """Whether a callback of class ``kind`` (or a subclass) is attached."""
        return any(issubclass(k, kind) for k in self.attached)


_SESSIONS: weakref.WeakKeyDictionary[pl.Trainer, Session] = weakref.WeakKeyDictionary()


def session(trainer: pl.Trainer) -> Session:
    """The shared state of ``trainer`` (created on first use)."""
    state = _SESSIONS.get(trainer)
    if state is None:
        state = _SESSIONS[trainer] = Session()
    return state


def note_backward(trainer: pl.Trainer, loss: Tensor) -> None:
    """Count one backward pass; every gradguard callback calls this in ``on_before_backward``.

    All callbacks of one backward receive the same ``loss`` object, so the count moves
    once per backward whatever the number of callbacks. A weak reference to the loss is
    kept (a loss that is gone cannot be the one at hand, so a reused ``id`` cannot be
    mistaken for it), and a strong one only while a parameter set still waits for its
    forward order, which is read from the loss's graph at the optimizer step: holding
    every loss would keep its autograd graph alive until the next backward, and free it
    inside this hook. Lightning holds the loss through the step (the closure's result);
    the strong reference covers a manual ``manual_backward(self.loss(batch))`` too.
    """
    state = session(trainer)
    if state.last_loss is not loss:
        state._last_loss = weakref.ref(loss)
        state._held_loss = loss if state.needs_loss() else None
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
        sources = [_lightning.raw_optimizer(o) for o in trainer.optimizers]
    else:
        key = id(optimizer)
        sources = [optimizer]
    fingerprint = tuple(optimizer_layout(o) for o in sources)
    cached = state._param_sets.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[2]
    if optimizer is None:
        params = ParamSet.from_module(pl_module, include_frozen=True)
    else:
        params = ParamSet.from_optimizer(optimizer, pl_module)
    pinned = [g["params"] for o in sources for g in o.param_groups]  # keeps the fingerprint's ids unique
    state._param_sets[key] = (fingerprint, pinned, params)
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
    if state._snapshot_key is None or state._snapshot_key[:3] != key[:3]:
        state._snapshots.clear()
    state._snapshot_key = key
    state._stepped = state._stepped or phase == PHASE_STEP
    snap = state._snapshots.get(key)
    if snap is None:
        params = param_set(trainer, pl_module, optimizer)
        max_abs = True if state.wants_max_abs else None
        snap = take_snapshot(params, scale=pending_scale(trainer, optimizer, phase), max_abs=max_abs)
        if phase == PHASE_STEP and trainer.world_size > 1:
            snap = agree_across_ranks(snap)
        state._snapshots[key] = snap
    return snap


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled fp16 ``GradScaler`` of the trainer's precision plugin, if any."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not hasattr(scaler, "is_enabled") or not scaler.is_enabled():
        return None
    return scaler


def pending_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer | None, phase: str) -> Tensor | None:
    """The loss scale still applied to the gradients at this point, or ``None``.

    In ``on_after_backward`` gradients are always scaled under an enabled scaler. In
    ``on_before_optimizer_step`` they are scaled unless ``unscale_`` ran for this optimizer
    (Lightning skips it for optimizers that unscale inside ``step()``).
    """
    scaler = grad_scaler(trainer)
    if scaler is None:
        return None
    if phase == PHASE_STEP and optimizer is not None and _lightning.optimizer_unscaled(scaler, optimizer):
        return None
    return _lightning.current_scale(scaler)


def log_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives this batch's ``self.log`` values: batches that stepped before this one.

    Read in a real ``Trainer.fit`` (Lightning 2.x, ``_LoggerConnector``): training values go
    out with ``step=fit_loop.epoch_loop._batches_that_stepped``, which moves once per batch
    that stepped (after the batch's hooks ran), not once per optimizer step as
    ``global_step`` does (see :func:`lightning_gradguard._lightning.batches_that_stepped`).
    """
    step = _lightning.batches_that_stepped(trainer)
    return trainer.global_step if step is None else step


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 if it is not there)."""
    for i, opt in enumerate(trainer.optimizers):
        if _lightning.raw_optimizer(opt) is optimizer:
            return i
    return 0


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


def drop_gradients(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Turn the coming ``optimizer.step()`` into a no-op by setting its gradients to ``None``.

    Called from ``on_before_optimizer_step``, which Lightning runs inside the optimizer's
    closure, just before the update. torch's optimizers skip parameters without a
    gradient entirely: no weight change, no weight decay, no moment or step-count update,
    so nothing of a bad gradient reaches the weights or the optimizer state. Under a
    ``GradScaler`` the scaler's own bookkeeping (``step``/``update``) goes on unchanged.

    Under a ``GradScaler`` a fused optimizer is skipped through its ``found_inf`` instead
    (:func:`~lightning_gradguard.callbacks._device_skip.skip_on_device`): without
    gradients, ``GradScaler.step`` would record no overflow check for it and
    ``GradScaler.update`` would raise.
    """
    from lightning_gradguard.callbacks import _device_skip  # it imports this module

    if _device_skip.fused(optimizer) and grad_scaler(trainer) is not None:
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), None)
        _device_skip.skip_on_device(optimizer, torch.ones((), device=device), certain=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int, *, finite_only: bool = False) -> None:
    """Send ``metrics`` to every logger of the trainer, on rank zero.

    A ``TensorBoardLogger`` gets all of them in one event (one ``Summary`` with one value
    per tag), which costs 0.3 ms for 75 tags where ``log_metrics`` — one ``add_scalar``
    each — took 8.6 ms here. Other loggers get their own ``log_metrics``.

    With ``finite_only=True`` NaN and infinite values are left out: TensorBoard cannot draw
    them (a chart with one shows nothing useful around it).
    """
    if not trainer.loggers or not trainer.is_global_zero:
        return
    if finite_only:
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        if not metrics:
            return
    from tensorboard.compat.proto.summary_pb2 import Summary

    for logger in trainer.loggers:
        writer = _lightning.tensorboard_writer(logger)
        if writer is None:
            logger.log_metrics(metrics, step=step)
            continue
        writer.add_summary(
            Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]), step
        )


def log_text(trainer: pl.Trainer, tag: str, markdown: str, step: int) -> None:
    """Write ``markdown`` to the Text tab of every ``TensorBoardLogger`` of the trainer, on rank zero.

    Other loggers have no common text API; callbacks keep what they write as attributes
    (e.g. ``VanishExplodeAlarm.findings``) for them.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if _lightning.tensorboard_writer(logger) is not None:
            logger.experiment.add_text(tag, markdown, global_step=step)


def log_image(trainer: pl.Trainer, tag: str, png: bytes, step: int) -> None:
    """Write a PNG image to the Images tab of every ``TensorBoardLogger`` of the trainer, on rank zero.

    The PNG goes into the event file as it is (no decoding and re-encoding, as
    ``add_figure``/``add_image`` would do).
    """
    if not trainer.is_global_zero:
        return
    from lightning_gradguard.flow import image_summary

    summary = None
    for logger in trainer.loggers:
        writer = _lightning.tensorboard_writer(logger)
        if writer is not None:
            summary = summary or image_summary(tag, png)
            writer.add_summary(summary, step)


def write_layout(trainer: pl.Trainer, charts: dict[str, list[Any]]) -> bool:
    """Write ``charts`` as the "gradguard" custom-scalars tab of every ``TensorBoardLogger``, on rank zero.

    TensorBoard shows the last layout written to a run, so the charts of all gradguard
    callbacks go out together, and only when they differ from the last ones written.

    Returns:
        Whether a layout was written.
    """
    state = session(trainer)
    if not charts or charts == state.layout or not trainer.is_global_zero:
        return False
    state.layout = charts
    written = False
    for logger in trainer.loggers:
        if _lightning.tensorboard_writer(logger) is not None:
            logger.experiment.add_custom_scalars({"gradguard": charts})
            written = True
    return written
