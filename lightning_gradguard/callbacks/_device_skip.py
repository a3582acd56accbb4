"""Skipping an optimizer step from a device flag, with no host read.

torch's fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``) take
two optional tensor attributes from ``GradScaler``: ``grad_scale`` and ``found_inf``. When
``found_inf`` is non-zero the fused kernel leaves the weights and every state tensor
untouched and takes the step count back: the step is skipped exactly, decided on the
device. Outside a ``GradScaler`` nobody sets the attribute, so a callback may set it to
its own verdict and skip a step without copying anything to the host first.

Under a ``GradScaler`` the scaler writes (and afterwards deletes) ``found_inf`` itself,
overwriting ours, so there the callbacks keep their host read and drop the gradients
(:func:`~lightning_gradguard.callbacks._session.drop_gradients`).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradguard.callbacks import _session

#: the attribute that marks a ``found_inf`` as ours, and the step post-hook that removes it
_OURS = "_gradguard_found_inf"
_HOOKED = "_gradguard_skip_hook"


def accepts_device_skip(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s next step can be skipped from a device flag (see the module docstring)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and _session.grad_scaler(trainer) is None


def skip_on_device(optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
    """Skip the coming ``optimizer.step()`` exactly when ``flag`` (a 0-dim tensor) is true.

    Several callbacks may call this before the same step: their flags are OR-ed. The
    attribute is removed again right after the step (a step post-hook), so that it never
    outlives the step it was set for. Only for optimizers that :func:`accepts_device_skip`.
    """
    flag = flag.detach().reshape(()).to(torch.float32)
    mine = optimizer.__dict__.get(_OURS)
    if mine is not None and optimizer.__dict__.get("found_inf") is mine:
        flag = torch.maximum(mine, flag.to(mine.device))
    optimizer.found_inf = flag  # type: ignore[attr-defined]
    setattr(optimizer, _OURS, flag)
    if not optimizer.__dict__.get(_HOOKED):
        optimizer.register_step_post_hook(_clear)
        setattr(optimizer, _HOOKED, True)


def _clear(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    mine = optimizer.__dict__.pop(_OURS, None)
    if mine is not None and optimizer.__dict__.get("found_inf") is mine:
        del optimizer.found_inf  # type: ignore[attr-defined]
