"""Every place where lightning_gradguard touches a private torch or Lightning API.

Each function says which private attribute or kernel it uses and why no public one does
the job, so that a torch or Lightning upgrade that moves one has a single place to mend.
Nothing here imports the rest of the package.

torch kernels: the ``torch._foreach_*`` family computes one operation over a list of
tensors in a few kernel launches; it is what ``torch.nn.utils.clip_grad_norm_`` and the
optimizers use, and it is private. As ``torch/nn/utils/clip_grad.py`` does, support is
checked up front (:func:`foreach_ok`: a device with foreach kernels and plain strided
tensors); anything else takes a per-tensor loop, and an error raised by a kernel is a
real error, never swallowed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support  # private: torch's own foreach gate

if TYPE_CHECKING:
    import lightning.pytorch as pl

# --------------------------------------------------------------------------------------
# torch: foreach kernels
# --------------------------------------------------------------------------------------


def foreach_ok(tensors: Sequence[Tensor], *, plain: bool = False) -> bool:
    """Whether foreach kernels take ``tensors``: one device that has them, plain strided tensors.

    The same test as ``torch.nn.utils.clip_grad`` (``_has_foreach_support``), plus the
    layout: sparse tensors have no foreach kernels. ``plain``: the caller knows that the
    tensors are plain, strided and on one device (a dense bucket of ``stats.bucket``), so
    only the device is checked.
    """
    if not tensors:
        return False
    if plain:
        return _device_has_foreach_support(tensors[0].device)
    # C-level maps, not a Python loop: this runs on every gradient list of every step
    return (
        _device_has_foreach_support(tensors[0].device)
        and set(map(type, tensors)) == _PLAIN
        and set(map(_LAYOUT, tensors)) == _STRIDED
    )


_PLAIN = {Tensor}
_STRIDED = {torch.strided}
_LAYOUT = operator.attrgetter("layout")


def foreach_norm(
    tensors: Sequence[Tensor], ord: float, dtype: torch.dtype | None = None, *, plain: bool = False
) -> list[Tensor]:
    """Per-tensor vector norms (``torch._foreach_norm``; a ``linalg.vector_norm`` loop where unsupported)."""
    if foreach_ok(tensors, plain=plain):
        return list(torch._foreach_norm(list(tensors), ord, dtype=dtype))
    return [torch.linalg.vector_norm(t, ord, dtype=dtype) for t in tensors]


def foreach_max_abs(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor max |x|.

    On CUDA the foreach inf-norm kernel does it without a copy. On CPU that kernel is slow
    (2.5 ms against 0.5 ms for the 147 gradients of the benchmark model, one thread), so
    the CPU path takes ``abs`` into a temporary copy and a foreach max instead
    (``torch._foreach_max``, present since torch 2.4).
    """
    if foreach_ok(tensors) and tensors[0].device.type == "cpu" and hasattr(torch, "_foreach_max"):
        return list(torch._foreach_max(torch._foreach_abs(list(tensors))))
    return foreach_norm(tensors, float("inf"))


def foreach_mul_(tensors: Sequence[Tensor], factors: Tensor | Sequence[Tensor], *, plain: bool = False) -> None:
    """``t *= factor`` in place for every tensor: one 0-dim factor for all, or one each (``plain``: see foreach_ok)."""
    tensors = list(tensors)
    if not tensors:
        return
    if foreach_ok(tensors, plain=plain):
        torch._foreach_mul_(tensors, factors if isinstance(factors, Tensor) else list(factors))
        return
    each = [factors] * len(tensors) if isinstance(factors, Tensor) else factors
    for t, f in zip(tensors, each):
        t.mul_(f)


def foreach_clamp_(tensors: Sequence[Tensor], low: Tensor, high: Tensor) -> None:
    """Clamp every tensor in place to ``[low, high]`` (0-dim tensors of the tensors' dtype)."""
    tensors = list(tensors)
    if foreach_ok(tensors):
        torch._foreach_clamp_max_(tensors, [high] * len(tensors))
        torch._foreach_clamp_min_(tensors, [low] * len(tensors))
        return
    for t in tensors:
        t.clamp_(min=low, max=high)


def foreach_sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``[x - y for x, y in zip(a, b)]`` in a few kernel launches."""
    if foreach_ok(a) and foreach_ok(b):
        return list(torch._foreach_sub(list(a), list(b)))
    return [x - y for x, y in zip(a, b)]


# --------------------------------------------------------------------------------------
# torch: GradScaler
# --------------------------------------------------------------------------------------


def optimizer_unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran for the current step."""
    from torch.amp.grad_scaler import OptState

    # private: GradScaler keeps the per-optimizer stage in `_per_optimizer_states`, and no
    # public method tells whether `unscale_` ran. A defaultdict: .get does not create.
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is not None and state["stage"] is OptState.UNSCALED


def current_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """The scale as a device tensor (no host sync), or ``None`` before the first ``scale()``.

    private: the public ``get_scale()`` copies the scale to the host (a sync every step).
    """
    return scaler._get_scale_async()


# --------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------


def raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself).

    private: ``LightningOptimizer._optimizer``; its public ``optimizer`` property exists
    too, but hooks also receive plain torch optimizers, which have neither.
    """
    return getattr(optimizer, "_optimizer", optimizer)


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


def tensorboard_writer(logger: Any) -> Any | None:
    """The ``FileWriter`` behind a ``TensorBoardLogger``, or ``None`` for any other logger.

    ``SummaryWriter._get_file_writer`` is private; it lets one logging step's scalars go
    out as one ``Summary`` event (0.3 ms for 75 tags, where ``log_metrics``, one
    ``add_scalar`` each, took 8.6 ms here).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return None
    get = getattr(logger.experiment, "_get_file_writer", None)
    return get() if get is not None else None


def batches_that_stepped(trainer: pl.Trainer) -> int | None:
    """``fit_loop.epoch_loop._batches_that_stepped``: the step Lightning gives ``self.log`` values.

    Private; there is no public equivalent (``global_step`` counts optimizer steps, twice
    per batch with two optimizers). Lightning's own ``LearningRateMonitor`` and
    ``DeviceStatsMonitor`` read it too. ``None`` outside a fit loop.
    """
    loop = getattr(trainer, "fit_loop", None)
    step = getattr(getattr(loop, "epoch_loop", None), "_batches_that_stepped", None)
    return None if step is None else int(step)
