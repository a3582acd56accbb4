"""In-place clipping of gradient lists: total-norm and element-wise, with a device-side coefficient.

Everything stays on the device (decisions are ``torch.where``/``clamp``, never a Python
``if`` on a device value; on the CPU the coefficient is computed in numpy, see
:mod:`lightning_gradguard._arrays`), tensors are grouped by :func:`~lightning_gradguard.stats.bucket`
and changed with the foreach wrappers of :mod:`lightning_gradguard._lightning`, DTensors
through their local shard, sparse COO tensors through their stored values.

Example:
    >>> import torch
    >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # total norm 13
    >>> clip_by_norm_(grads, torch.tensor(13.0), 1.3)
    tensor(0.1000)
    >>> grads
    [tensor([0.3000, 0.4000]), tensor([1.2000])]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard import _arrays, _lightning
from lightning_gradguard.stats import bucket

__all__ = ["clip_by_norm_", "clip_by_value_", "clip_coefficient", "coalesce_sparse_grads_", "scale_"]


def clip_coefficient(norm: Tensor, threshold: Tensor | float) -> Tensor:
    """The factor that brings a gradient of total norm ``norm`` down to ``threshold``.

    ``min(1, threshold / norm)``, computed on the device. It is exactly 1 when the norm is
    within the threshold, when the norm is 0, and when the norm is NaN or infinite (a
    non-finite gradient is left alone: there is no meaningful way to rescale it). An
    infinite threshold means "no clipping".

    Args:
        norm: 0-dim tensor, the total L2 norm (unscaled).
        threshold: the largest norm allowed (tensor or float, >= 0).

    Returns:
        A 0-dim float32 tensor in ``[0, 1]`` on ``norm``'s device.

    Example:
        >>> clip_coefficient(torch.tensor(10.0), 2.5)
        tensor(0.2500)
        >>> clip_coefficient(torch.tensor(float("nan")), 2.5)
        tensor(1.)
    """
    ops = _arrays.ops_for(norm.device)  # on the CPU: numpy scalars, a fraction of a torch dispatch each
    norm = ops.array(norm.to(torch.float32))
    if isinstance(threshold, Tensor):
        threshold = ops.array(threshold.to(device=norm.device if ops is _arrays.DEVICE else "cpu", dtype=torch.float32))
    with ops.quiet():  # x / tiny may overflow and inf / inf is NaN: both are handled below
        ratio = threshold / ops.clamp_min(norm, _TINY)  # a float stays a scalar: no copy
        coef = ops.clamp_max(ratio, 1.0)
    # comparisons with NaN are false: a NaN norm or coefficient keeps 1, and so do 0 and inf
    keep = (norm > 0) & (norm < math.inf) & (coef == coef)
    return ops.as_tensor(ops.where(keep, coef, 1.0), torch.float32)


_TINY = torch.finfo(torch.float32).tiny


def _sparse_elements(t: Tensor) -> Tensor:
    """The stored values of a coalesced sparse COO tensor (an alias: changing them changes ``t``).

    Raises:
        ValueError: for an uncoalesced tensor (an element-wise operation on duplicate
            entries would be wrong) or a layout other than COO.
    """
    if t.layout is not torch.sparse_coo or not t.is_coalesced():
        raise ValueError(
            f"element-wise clipping needs dense or coalesced sparse COO tensors, got layout {t.layout} "
            f"(coalesced: {t.layout is torch.sparse_coo and t.is_coalesced()}); use coalesce_sparse_grads_() first."
        )
    return t.values()


def coalesce_sparse_grads_(params: Iterable[Tensor]) -> None:
    """Replace every uncoalesced sparse COO ``.grad`` of ``params`` by its coalesced equivalent.

    The same gradient (duplicate indices summed), so optimizers see no difference; it lets
    element-wise and unit-wise clipping act on each entry once.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> p.grad = torch.sparse_coo_tensor([[1, 1]], [2.0, 3.0], (3,), check_invariants=True)
        >>> coalesce_sparse_grads_([p])
        >>> p.grad.is_coalesced(), p.grad.values()
        (True, tensor([5.]))
    """
    for p in params:
        g = p.grad
        if g is not None and g.layout is torch.sparse_coo and not g.is_coalesced():
            p.grad = g.coalesce()


def scale_(
    tensors: Iterable[Tensor | None],
    coef: Tensor,
    buckets: dict[tuple[Any, ...], tuple[list[Tensor], list[int]]] | None = None,
) -> None:
    """Multiply every tensor in place by the 0-dim device tensor ``coef``.

    One foreach multiplication per (device, dtype) bucket of dense tensors; sparse
    tensors are scaled one by one (a coalesced COO tensor through its values, so it stays
    coalesced); ``None`` entries are skipped and DTensors are scaled through their local
    shard. No host synchronisation. ``buckets``: :func:`~lightning_gradguard.stats.bucket`
    of ``tensors`` when the caller has it already (a snapshot of the same gradients).

    Example:
        >>> g = [torch.ones(2), None, torch.ones(3)]
        >>> scale_(g, torch.tensor(0.5))
        >>> g[2]
        tensor([0.5000, 0.5000, 0.5000])
    """
    with torch.no_grad():
        for (device, _, _, dense), (group, _) in (buckets or bucket(_as_list(tensors))).items():
            c = coef.to(device=device, non_blocking=True)
            if dense:
                _lightning.foreach_mul_(group, c, plain=True)
                continue
            for t in group:
                if t.layout is torch.sparse_coo and t.is_coalesced():
                    t.values().mul_(c)
                else:
                    t.mul_(c)


def clip_by_norm_(tensors: Iterable[Tensor | None], norm: Tensor, threshold: Tensor | float) -> Tensor:
    """Scale ``tensors`` in place so that their total norm is at most ``threshold``.

    ``norm`` is the total norm of ``tensors`` as already measured (unscaled; when the
    tensors still carry a loss scale the same coefficient is right, because it is a
    ratio). The direction is unchanged; a non-finite ``norm`` leaves the tensors alone.

    Returns:
        The coefficient applied (0-dim device tensor); the norm after clipping is
        ``norm * coef``.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> clip_by_norm_(g, torch.tensor(5.0), 1.0)
        tensor(0.2000)
        >>> g[0]
        tensor([0.6000, 0.8000])
    """
    coef = clip_coefficient(norm, threshold)
    scale_(tensors, coef)
    return coef


def clip_by_value_(
    tensors: Iterable[Tensor | None],
    clip_value: float,
    *,
    scale: Tensor | None = None,
    finite: Tensor | None = None,
) -> None:
    """Clamp every element to ``[-clip_value, clip_value]`` in place.

    Args:
        tensors: the gradients (``None`` skipped; DTensors through their local shard;
            sparse COO tensors must be coalesced, see :func:`coalesce_sparse_grads_`).
        clip_value: the bound on the unscaled gradient, > 0.
        scale: a loss scale still applied to the tensors (the bound becomes
            ``clip_value * scale``), or ``None``.
        finite: 0-dim bool device tensor; where ``False`` the tensors are left alone (a
            clamp would turn an Inf into a finite value and hide an overflow).

    Raises:
        ValueError: for complex tensors (clip by norm instead) and uncoalesced sparse ones.

    Example:
        >>> g = [torch.tensor([-3.0, 0.5, 2.0])]
        >>> clip_by_value_(g, 1.0)
        >>> g[0]
        tensor([-1.0000,  0.5000,  1.0000])
    """
    buckets = bucket(_as_list(tensors))
    if not buckets:
        return
    for (_, dtype, _, _), (group, _) in buckets.items():
        if dtype.is_complex:
            raise ValueError(
                f"value clipping is not defined for complex tensors (got {dtype}, shape {tuple(group[0].shape)}): "
                "clip by norm instead."
            )
    ref = next(iter(buckets.values()))[0][0]
    bound = torch.full((), float(clip_value), dtype=torch.float32, device=ref.device)
    if scale is not None:
        bound = bound * scale.to(bound.device)
    if finite is not None:
        bound = torch.where(finite.to(bound.device), bound, torch.full_like(bound, math.inf))
    with torch.no_grad():
        for (device, dtype, _, dense), (group, _) in buckets.items():
            high = bound.to(device=device, dtype=dtype)  # beyond fp16's range it becomes +inf: no bound
            _lightning.foreach_clamp_(group if dense else [_sparse_elements(t) for t in group], -high, high)


def _as_list(tensors: Iterable[Tensor | None]) -> Sequence[Tensor | None]:
    return tensors if isinstance(tensors, Sequence) else list(tensors)
