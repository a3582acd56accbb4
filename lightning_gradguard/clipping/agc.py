"""Adaptive gradient clipping (AGC, Brock et al. 2021, NFNets): each unit's gradient bounded by its weight.

:class:`UnitwiseClip` clips one optimizer's gradients in place, on the device, from the
per-parameter gradient norms of a snapshot; :class:`AGCResult` says how many units it
looked at and clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.stats import DTensor, ParamSet, local_tensor, tensor_stats

__all__ = ["AGCResult", "UnitwiseClip"]


def _placements_ok(p: Tensor) -> bool:
    """Whether every unit (row) of a sharded parameter lives whole on one rank."""
    if DTensor is None or not isinstance(p, DTensor):
        return True
    return all(not pl.is_shard() or pl.dim == 0 for pl in p.placements)


@dataclass
class _Group:
    """Matrices whose gradients share device, dtype and row length: one concatenation."""

    row: int
    members: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # local rows of each member
    weights: list[Tensor] | None = None  # cached (rows, row) views of plain parameters


@dataclass
class _Layout:
    vectors: list[int]
    vector_index: Tensor
    vectors_sharded: bool
    groups: list[_Group]
    sparse: list[int] = field(default_factory=list)  # matrices with a sparse COO gradient (embeddings)


def _rows(t: Tensor, rows: int, row: int) -> Tensor:
    """``t`` as a ``(rows, row)`` real matrix: complex numbers count as two real coordinates."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(rows, row)


@dataclass
class AGCResult:
    """What one :meth:`UnitwiseClip.clip_` call did (device tensors, no host sync).

    Attributes:
        units: number of units the rule looked at on this rank (host int; with sharded
            parameters, the rows of the local shards).
        clipped_units: how many of them were scaled down (0-dim int64 device tensor).
    """

    units: int
    clipped_units: Tensor


class UnitwiseClip:
    r"""Adaptive gradient clipping (AGC), unit-wise, as in NFNets.

    Brock et al. (2021), "High-Performance Large-Scale Image Recognition Without
    Normalization": each unit's gradient ``G_i`` is rescaled so that
    ``||G_i|| / max(||W_i||, eps) <= clipping``::

        G_i <- G_i * min(1, clipping * max(||W_i||, eps) / ||G_i||)

    A unit is a row (output unit) of a weight of two or more dimensions (the norm runs
    over every dimension but the first: a Linear row, a conv filter), and the whole
    tensor for biases, gains and other vectors. The paper uses ``eps = 1e-3``, recommends
    smaller ``clipping`` for larger batches (0.01 at batch 4096) and does not clip the
    final linear classifier; ``exclude`` takes regular expressions searched in the
    qualified parameter names (e.g. ``[r"^head\."]``) for parameters left alone.

    Per step the weight and gradient row norms take one concatenation and one norm
    kernel per (device, dtype, row length) group, vectors take one foreach norm, and the
    coefficients are applied with one foreach multiplication; nothing is copied to the
    host. FSDP2 gradients sharded along their first dimension (the default) keep
    every row whole on one rank, so row norms are local; vector norms are combined
    across ranks by :func:`~lightning_gradguard.stats.tensor_stats`.

    Args:
        params: the parameters (one optimizer's :class:`~lightning_gradguard.stats.ParamSet`).
        clipping: the largest gradient/weight norm ratio per unit, > 0.
        eps: floor of the weight norm (so that zero-initialised units can move), > 0.
        exclude: regular expressions; parameters whose name matches any are not clipped.

    Raises:
        ValueError: on a bad argument or a pattern that is not a regular expression.
        RuntimeError: for a DTensor sharded along another dimension than the first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradguard.stats import ParamSet
        >>> lin = nn.Linear(4, 2)
        >>> _ = lin.weight.data.fill_(1.0)  # every row has norm 2
        >>> lin(torch.ones(1, 4)).sum().mul(100).backward()
        >>> agc = UnitwiseClip(ParamSet.from_module(lin), clipping=0.1, exclude=[r"bias"])
        >>> grad_norms = torch.stack([lin.weight.grad.norm(), lin.bias.grad.norm()])
        >>> _ = agc.clip_(grad_norms)
        >>> lin.weight.grad.norm(dim=1)  # each row now 0.1 * 2
        tensor([0.2000, 0.2000])
    """

    def __init__(
        self,
        params: ParamSet,
        *,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Sequence[str] | None = None,
    ) -> None:
        self.clipping = _validation.number("agc_clipping", clipping, low=0.0)
        self.eps = _validation.number("agc_eps", eps, low=0.0)
        patterns = _validation.patterns("agc_exclude", exclude)
        self.params = params
        self.exclude = tuple(exclude or ())
        self.excluded: tuple[str, ...] = tuple(n for n in params.names if any(r.search(n) for r in patterns))
        #: patterns of ``exclude`` that match no parameter name (most likely a typo)
        self.unmatched: tuple[str, ...] = tuple(
            text for text, r in zip(self.exclude, patterns) if not any(r.search(n) for n in params.names)
        )
        skip = set(self.excluded)
        self.matrices: tuple[int, ...] = ()
        self.vectors: tuple[int, ...] = ()
        mats, vecs = [], []
        for i, (name, p) in enumerate(zip(params.names, params.params)):
            if name in skip:
                continue
            if p.dim() >= 2:
                if not _placements_ok(p):
                    raise RuntimeError(
                        f"AGC needs every row of {name!r} on one rank, but it is sharded as {p.placements}; "
                        "only Shard(0) (FSDP2's default) and Replicate are supported."
                    )
                mats.append(i)
            else:
                vecs.append(i)
        self.matrices, self.vectors = tuple(mats), tuple(vecs)
        self._cache: dict[Any, Any] = {}

    def _layout(self, device: torch.device) -> _Layout:
        """Which units to clip this step and how they are grouped, cached per set of present gradients."""
        params = self.params.params
        present = tuple(params[i].grad is not None for i in self.matrices + self.vectors)
        key = (device, present)
        layout = self._cache.get(key)
        if layout is not None:
            return layout
        vectors = [i for i in self.vectors if params[i].grad is not None]
        groups: dict[tuple[Any, ...], _Group] = {}
        sparse: list[int] = []
        for i in self.matrices:
            grad = params[i].grad
            if grad is None:
                continue
            if grad.layout is not torch.strided:
                if grad.layout is not torch.sparse_coo or grad.sparse_dim() != 1:
                    raise ValueError(
                        f"AGC cannot clip the gradient of {self.params.names[i]!r}: layout {grad.layout} with "
                        f"{grad.sparse_dim()} sparse dimension(s); only dense gradients and sparse COO gradients "
                        "indexed by row (nn.Embedding(sparse=True)) are supported. Leave it out with `agc_exclude`."
                    )
                sparse.append(i)
                continue
            local = local_tensor(grad)
            row = math.prod(local.shape[1:]) * (2 if local.is_complex() else 1)
            group = groups.setdefault((local.device, local.dtype, row), _Group(row=row))
            group.members.append(i)
            group.rows.append(int(local.shape[0]))
        for group in groups.values():
            weights = [local_tensor(params[i]) for i in group.members]
            if not any(DTensor is not None and isinstance(params[i], DTensor) for i in group.members):
                # plain parameters keep their storage (optimizers update in place): reshape once
                group.weights = [_rows(w.detach(), r, group.row) for w, r in zip(weights, group.rows)]
        layout = _Layout(
            vectors=vectors,
            vector_index=torch.tensor(vectors, dtype=torch.long, device=device),
            vectors_sharded=any(self.params.reduce_keys[i] for i in vectors),
            groups=list(groups.values()),
            sparse=sparse,
        )
        self._cache[key] = layout
        return layout

    def clip_(
        self,
        grad_norms: Tensor,
        *,
        inv_scale: Tensor | None = None,
        finite: Tensor | None = None,
    ) -> AGCResult:
        """Apply AGC to the current gradients of ``params`` in place.

        Args:
            grad_norms: per-parameter gradient L2 norms, unscaled and (for sharded
                parameters) combined across ranks, shape ``(len(params),)``, as
                :attr:`~lightning_gradguard.stats.GradSnapshot.norms` provides them.
            inv_scale: ``1 / loss_scale`` when the gradients still carry a loss scale.
            finite: 0-dim bool; where ``False`` nothing is changed.

        Returns:
            An :class:`AGCResult`.
        """
        device = grad_norms.device
        params = self.params.params
        layout = self._layout(device)
        ok = finite.to(device) if finite is not None else torch.ones((), dtype=torch.bool, device=device)
        clipped = torch.zeros((), dtype=torch.int64, device=device)
        units = len(layout.vectors)
        targets: list[Tensor] = []
        factors: list[Tensor] = []
        with torch.no_grad():
            if layout.vectors:  # whole-tensor norms: the gradients' from the snapshot, the weights' here
                g_norms = grad_norms.index_select(0, layout.vector_index)
                coef = self._coef(self._vector_weight_norms(layout, device), g_norms, ok)
                clipped = clipped + (coef < 1).sum()
                targets += [local_tensor(params[i].grad) for i in layout.vectors]
                factors += coef.unbind()
            for group in layout.groups:  # matrices: row norms of the local shards, one concatenation per group
                grads = [local_tensor(params[i].grad) for i in group.members]
                coef = self._coef(*self._group_norms(group, grads, inv_scale, device), ok)
                units += sum(group.rows)
                clipped = clipped + (coef < 1).sum()
                coef = coef.to(device=grads[0].device, dtype=grads[0].dtype)
                for g, c in zip(grads, torch.split(coef, group.rows)):
                    targets.append(g)
                    factors.append(c.view(-1, *([1] * (g.dim() - 1))))
            for i in layout.sparse:  # sparse row gradients (embeddings): the unit is each stored row
                n, c = self._clip_sparse_rows(params[i], inv_scale, ok, device)
                units += n
                clipped = clipped + c
            _multiply_(targets, factors)
        return AGCResult(units=units, clipped_units=clipped)

    def _vector_weight_norms(self, layout: _Layout, device: torch.device) -> Tensor:
        """Whole-tensor weight norms of the clipped vectors (combined across ranks when sharded)."""
        weights = [self.params.params[i] for i in layout.vectors]
        if layout.vectors_sharded:
            keys = [self.params.reduce_keys[i] for i in layout.vectors]
            return tensor_stats(weights, keys, device=device, cache=self._cache.setdefault("stats", {}))[0]
        norms = _lightning.foreach_norm([w.detach() for w in weights], 2.0)
        return torch.stack([n.to(device, torch.float32) for n in norms])

    def _group_norms(
        self, group: _Group, grads: list[Tensor], inv_scale: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(weight row norms, unscaled gradient row norms) of one group, float32 on ``device``."""
        params = self.params.params
        weights = group.weights or [
            _rows(local_tensor(params[i]).detach(), r, group.row) for i, r in zip(group.members, group.rows)
        ]
        rows = [_rows(g, r, group.row) for g, r in zip(grads, group.rows)]
        total = sum(group.rows)
        if weights[0].dtype == rows[0].dtype:
            norms = _row_norms(torch.cat(rows + weights))
            g_rows, w_rows = norms[:total].to(device), norms[total:].to(device)
        else:
            g_rows = _row_norms(torch.cat(rows)).to(device)
            w_rows = _row_norms(torch.cat(weights)).to(device)
        if inv_scale is not None:
            g_rows = g_rows * inv_scale.to(device)
        return w_rows, g_rows

    def _clip_sparse_rows(
        self, param: Tensor, inv_scale: Tensor | None, ok: Tensor, device: torch.device
    ) -> tuple[int, Tensor]:
        """AGC on a row-indexed sparse COO gradient, in place; returns (rows seen, rows clipped)."""
        if not param.grad.is_coalesced():
            param.grad = param.grad.coalesce()  # the same gradient, each row stored once
        grad = param.grad
        values = grad.values()  # of a coalesced tensor: an alias, so changing it changes the gradient
        n = int(values.shape[0])
        if n == 0:
            return 0, torch.zeros((), dtype=torch.int64, device=device)
        row = math.prod(values.shape[1:]) * (2 if values.is_complex() else 1)
        g_rows = _row_norms(_rows(values, n, row)).to(device)
        weight = param.detach().index_select(0, grad.indices()[0])
        w_rows = _row_norms(_rows(weight, n, row)).to(device)
        if inv_scale is not None:
            g_rows = g_rows * inv_scale.to(device)
        coef = self._coef(w_rows, g_rows, ok)
        values.mul_(coef.to(device=values.device, dtype=values.dtype).view(-1, *([1] * (values.dim() - 1))))
        return n, (coef < 1).sum()

    def _coef(self, w_norms: Tensor, g_norms: Tensor, ok: Tensor) -> Tensor:
        """Per-unit factor ``min(1, clipping * max(|W|, eps) / |G|)``; 1 where not finite or not ``ok``."""
        limit = self.clipping * w_norms.clamp_min(self.eps)
        coef = (limit / g_norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
        good = ok & torch.isfinite(g_norms) & ~torch.isnan(coef)
        return torch.where(good, coef, torch.ones_like(coef))


def _row_norms(matrix: Tensor) -> Tensor:
    """The L2 norm of each row of a real matrix, float32; accumulated in float32 or, for float64, in float64."""
    exact = None if matrix.dtype == torch.float64 else torch.float32  # the norm kernel refuses to narrow float64
    return torch.linalg.vector_norm(matrix, dim=1, dtype=exact).to(torch.float32)


def _multiply_(targets: list[Tensor], factors: list[Tensor]) -> None:
    """``t *= f`` for each pair: dense tensors with one foreach multiplication, sparse ones one by one."""
    factors = [f if f.dtype == t.dtype and f.device == t.device else f.to(t) for t, f in zip(targets, factors)]
    dense = [k for k, t in enumerate(targets) if t.layout is torch.strided]
    _lightning.foreach_mul_([targets[k] for k in dense], [factors[k] for k in dense])
    for t, f in zip(targets, factors):
        if t.layout is not torch.strided:  # a 1-D parameter with a sparse gradient
            t.mul_(f)
