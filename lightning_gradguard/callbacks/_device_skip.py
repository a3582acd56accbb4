"""Skipping an optimizer step from a device flag, with no host read.

torch's fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``) take
two optional tensor attributes from ``GradScaler``: ``grad_scale`` and ``found_inf``. When
``found_inf`` is non-zero the fused kernel leaves the weights and every state tensor
untouched and takes the step count back: the step is skipped exactly, decided on the
device.

A callback sets ``found_inf`` to its verdict from ``on_before_optimizer_step``, which
Lightning runs inside the optimizer's closure, before the fused kernel reads the
attribute; a step post-hook removes it again. Under an fp16 ``GradScaler`` the closure
runs first and the scaler then sets ``found_inf`` itself, overwriting ours, just before
it calls ``step()``: a step pre-hook ORs our verdict into a new tensor there (the
scaler's loss-scale bookkeeping keeps its own record, so a step we skip does not back the
scale off, and the scaler deletes the attribute afterwards). Several callbacks' verdicts
for one step are OR-ed.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradguard.callbacks import _session

#: the verdict for the coming step, and the marker of an optimizer that has our hooks
_PENDING = "_gradguard_skip"
_UNBORN = "_gradguard_unborn_momentum"
_BORN = "_gradguard_momentum_born"  # the parameter layout for which every momentum buffer exists
_HOOKED = "_gradguard_skip_hooks"


def fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` reads ``found_inf`` (torch's fused optimizers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def unborn_momentum(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Parameters whose SGD momentum buffer the coming step would create.

    torch's fused SGD makes a missing buffer with ``torch.empty_like`` and fills it in the
    kernel; a step skipped through ``found_inf`` keeps the buffer, unfilled. Such a step
    must not be skipped from an unknown device flag, and one skipped for certain has the
    buffers it made removed afterwards (:func:`skip_on_device`), so that the next real step
    makes them again. Once every buffer exists, that is remembered for the optimizer's
    parameter layout: the per-parameter look runs again only when the layout changes.
    """
    layout = _session.optimizer_layout(optimizer)
    if optimizer.__dict__.get(_BORN) == layout:
        return []
    unborn = [
        p
        for group in optimizer.param_groups
        if group.get("momentum", 0)
        for p in group["params"]
        if "momentum_buffer" not in optimizer.state.get(p, {})
    ]
    if not unborn:
        setattr(optimizer, _BORN, layout)
    return unborn


def accepts_device_skip(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """Whether a callback may decide ``optimizer``'s next step on the device, with no host read.

    A fused optimizer outside an fp16 ``GradScaler``, past the step that creates its
    momentum buffers (see :func:`unborn_momentum`). Under a scaler the callbacks keep their
    host path, which is what they are tested with there (:func:`skip_on_device` itself
    works under a scaler: :func:`~lightning_gradguard.callbacks._session.drop_gradients`
    uses it for fused optimizers).
    """
    return fused(optimizer) and _session.grad_scaler(trainer) is None and not unborn_momentum(optimizer)


def skip_on_device(optimizer: torch.optim.Optimizer, flag: Tensor, *, certain: bool = False) -> None:
    """Skip the coming ``optimizer.step()`` exactly when ``flag`` (a 0-dim tensor) is true.

    Only for :func:`fused` optimizers. The verdict never outlives the step it was set for.
    ``certain``: the flag is known to be true on the host; the momentum buffers the skipped
    step creates are then removed after it (:func:`unborn_momentum`).
    """
    if certain:
        unborn = unborn_momentum(optimizer)
        if unborn:
            setattr(optimizer, _UNBORN, unborn)
    flag = flag.detach().reshape(()).to(torch.float32)
    pending = optimizer.__dict__.get(_PENDING)
    if pending is not None:
        flag = torch.maximum(pending, flag.to(pending.device))
    setattr(optimizer, _PENDING, flag)
    current = optimizer.__dict__.get("found_inf")
    if current is None or current is pending:
        optimizer.found_inf = flag  # type: ignore[attr-defined]
    if not optimizer.__dict__.get(_HOOKED):
        optimizer.register_step_pre_hook(_merge)
        optimizer.register_step_post_hook(_clear)
        setattr(optimizer, _HOOKED, True)


def _merge(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """At the start of ``step()``: OR the pending verdict into a ``found_inf`` someone else set since."""
    flag = optimizer.__dict__.get(_PENDING)
    theirs = optimizer.__dict__.get("found_inf")
    if flag is not None and theirs is not None and theirs is not flag:
        optimizer.found_inf = torch.maximum(theirs, flag.to(theirs.device))  # type: ignore[attr-defined]


def _clear(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    flag = optimizer.__dict__.pop(_PENDING, None)
    if flag is not None and optimizer.__dict__.get("found_inf") is flag:
        del optimizer.found_inf  # type: ignore[attr-defined]
    for p in optimizer.__dict__.pop(_UNBORN, ()):  # made by a skipped step, never filled
        optimizer.state.get(p, {}).pop("momentum_buffer", None)
        optimizer.__dict__.pop(_BORN, None)
