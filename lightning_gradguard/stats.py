"""Gradient snapshots: one pass over the gradients of one optimizer step.

This module is plain PyTorch; nothing in it needs a ``Trainer``.

The pipeline is:

1. :class:`ParamSet` — the ordered parameters that one optimizer (or one module)
   owns, with their qualified names. Built once, reused every step.
2. :class:`Grouping` — a partition of a ``ParamSet`` into named layers
   (by owning module, per tensor, by module depth, or by user patterns). Built once.
3. :func:`take_snapshot` — per-tensor L2 norms of the gradients, computed with
   ``torch._foreach_norm`` per (device, dtype) bucket as ``clip_grad_norm_`` does, kept
   meaningful where float32 squares under- or overflow (on the CPU exact, from a float64
   read of just those tensors: one read of the gradients as a rule; on other devices
   bounds from a max |g| pass; NaN/Inf show in the norm, so finiteness needs no second
   pass; max |g| only where asked for),
   divided by a pending loss scale when given, reduced across ranks for sharded
   (DTensor / FSDP2) gradients, and kept on the device.
   Groups are ordered as the layers run in the forward pass when that order is known
   (:class:`ForwardOrder`, read once per parameter set from the autograd graph of a
   loss), else as the model registers them.
4. :meth:`GradSnapshot.grouped` — per-group norms, total norm and finiteness from
   the per-tensor values with one ``index_add`` (no second pass over gradients).
5. :meth:`GroupedStats.to_host` — everything copied to the host in one transfer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_gradguard.stats import ParamSet, Grouping, take_snapshot
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> model(torch.randn(16, 4)).sum().backward()
    >>> params = ParamSet.from_module(model)
    >>> layers = Grouping.build(params, group_by="module")
    >>> stats = take_snapshot(params).grouped(layers).to_host()
    >>> sorted(stats.group_norms)
    ['0', '2']
    >>> stats.all_finite
    True
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_gradguard import _arrays, _lightning, _validation

try:  # torch.distributed may be absent from some builds
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - exercised only on builds without distributed
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "AUTO_MAX_GROUPS",
    "GROUP_BY_CHOICES",
    "MAX_ABS_LEARNING",
    "ForwardOrder",
    "GradSnapshot",
    "GroupedStats",
    "Grouping",
    "HostStats",
    "ParamSet",
    "UnitLayout",
    "UnitStats",
    "agree_across_ranks",
    "bucket",
    "iter_group_tensors",
    "local_tensor",
    "record_forward_order",
    "reduce_norms",
    "stored_values",
    "take_snapshot",
    "tensor_max_abs",
    "tensor_norms",
    "tensor_stats",
    "total_norm",
    "unit_activity",
    "zero_fractions",
]

#: Allowed values of ``group_by``.
GROUP_BY_CHOICES = _validation.GROUP_BY_CHOICES

_RESERVED_GROUP_NAMES = _validation.RESERVED_GROUP_NAMES
_ROOT_GROUP = "root"
_UNMATCHED_GROUP = "other"


# --------------------------------------------------------------------------------------
# Parameter sets
# --------------------------------------------------------------------------------------


def _reduce_groups(t: Tensor) -> tuple[Any, ...]:
    """Process groups over which a sharded tensor's local squared norms must be summed.

    A plain tensor or a fully replicated DTensor needs no reduction. A DTensor sharded
    along some mesh dimensions needs a sum over each of those dimensions' groups; doing
    the sums one dimension after the other gives the sum over all shards.
    """
    if DTensor is None or not isinstance(t, DTensor):
        return ()
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            groups.append(t.device_mesh.get_group(dim))
        elif placement.is_partial():
            raise RuntimeError(
                "lightning_gradguard cannot take norms of a DTensor with a Partial placement "
                f"(placements={t.placements}); reduce it first."
            )
    return tuple(groups)


@dataclass(frozen=True, eq=False)
class ParamSet:
    """The trainable parameters of one optimizer or module, in a fixed order.

    Args:
        params: the parameter tensors.
        names: one qualified name per parameter (``"encoder.0.weight"``).

    Built once and reused: computing it walks ``named_parameters()``.
    """

    params: tuple[Tensor, ...]
    names: tuple[str, ...]
    reduce_keys: tuple[tuple[Any, ...], ...] = field(default=())
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.params) != len(self.names):
            raise ValueError(
                f"`names` must have one entry per parameter: got {len(self.names)} names "
                f"for {len(self.params)} parameters."
            )
        if not self.reduce_keys:
            object.__setattr__(self, "reduce_keys", tuple(_reduce_groups(p) for p in self.params))

    def __len__(self) -> int:
        return len(self.params)

    @cached_property
    def uniform_device(self) -> torch.device | None:
        """The one device of every parameter, when all are plain, non-empty and unsharded; else ``None``.

        torch keeps a dense ``.grad`` on its parameter's device and shape, so the gradients
        of such a set need no per-step device or emptiness check (:func:`bucket`).
        """
        devices = {p.device for p in self.params}
        plain = all(type(p) in (Tensor, nn.Parameter) and p.numel() > 0 for p in self.params)
        return devices.pop() if len(devices) == 1 and plain and not self.sharded else None

    def grads(self) -> list[Tensor | None]:
        """Each parameter's ``.grad`` now, in order (a C-level map: this runs several times a step)."""
        return list(map(_GRAD, self.params))

    @property
    def forward_order(self) -> ForwardOrder | None:
        """Where each parameter runs in the forward pass, once :func:`record_forward_order` found it."""
        return self.cache.get(_FORWARD_ORDER_KEY)

    @property
    def sharded(self) -> bool:
        """Whether any parameter is a sharded DTensor (FSDP2), so norms need a collective."""
        return any(self.reduce_keys)

    @classmethod
    def from_module(cls, module: nn.Module, *, include_frozen: bool = False) -> ParamSet:
        """The parameters of ``module``, in registration order.

        Args:
            module: the module.
            include_frozen: also take parameters with ``requires_grad=False``. A set that
                must stay right while layers are frozen and unfrozen during training takes
                them all: a parameter without a gradient simply counts as absent at that
                step (:attr:`GradSnapshot.has_grad`).
        """
        pairs = [(n, p) for n, p in module.named_parameters() if include_frozen or p.requires_grad]
        return cls(params=tuple(p for _, p in pairs), names=tuple(n for n, _ in pairs))

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, module: nn.Module | None = None) -> ParamSet:
        """Every parameter that ``optimizer`` holds, named after ``module``.

        Frozen parameters (``requires_grad=False``) are included: the optimizer updates any
        parameter that has a gradient at ``step()``, whatever its flag, and a layer that is
        unfrozen later must be seen at once. A parameter without a gradient counts as
        absent at that step (:attr:`GradSnapshot.has_grad`).

        Parameters are ordered as ``module`` registers them, not as the optimizer lists
        them; the groupings built on the set follow the forward pass instead once a
        :class:`ForwardOrder` is recorded (:func:`record_forward_order`). Parameters the
        module does not own are named ``param_groups.<i>.<j>`` and come last.
        """
        in_opt: dict[int, tuple[Tensor, str]] = {}
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                in_opt.setdefault(id(p), (p, f"param_groups.{i}.{j}"))
        pairs: list[tuple[str, Tensor]] = []
        if module is not None:
            for n, p in module.named_parameters():
                if id(p) in in_opt:
                    pairs.append((n, p))
                    del in_opt[id(p)]
        pairs.extend((fallback, p) for p, fallback in in_opt.values())
        return cls(params=tuple(p for _, p in pairs), names=tuple(n for n, _ in pairs))


# --------------------------------------------------------------------------------------
# Forward order
# --------------------------------------------------------------------------------------

_FORWARD_ORDER_KEY = "forward_order"
_TRIED_KEY = "forward_order_tried"


@dataclass(frozen=True)
class ForwardOrder:
    """Where each parameter of a :class:`ParamSet` is first used in the forward pass.

    Registration order is not depth: a head defined before the body, a decoder registered
    before the encoder, a stem used after a branch. The autograd graph of a loss knows the
    real order: every operation records a sequence number when the forward pass runs it,
    and each parameter hangs off the operations that use it. The first (smallest) of those
    numbers places the parameter; a tied or shared parameter is placed where it is first
    used.

    Attributes:
        first_use: per parameter of the set, its position in the forward pass (``None``:
            not reached by the graph: frozen, unused, or behind a reentrant checkpoint).
        skips: skip connections found in the graph: an addition or concatenation one of
            whose inputs is computed from another (``x + f(x)``, ``cat([x, f(x)])``), the
            residuals a model writes in ``forward`` that its modules do not show.
        traced: whether any parameter was reached (``False``: registration order only).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class HeadFirst(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head = nn.Linear(4, 1)  # registered first, runs last
        ...         self.body = nn.Linear(3, 4)
        ...     def forward(self, x):
        ...         return self.head(torch.relu(self.body(x)))
        >>> net = HeadFirst()
        >>> params = ParamSet.from_module(net)
        >>> order = ForwardOrder.of(net(torch.randn(2, 3)).sum(), params)
        >>> Grouping.build(params, order=order).names
        ('body', 'head')
    """

    first_use: tuple[int | None, ...]
    skips: int = field(default=0, compare=False)
    #: positions (in the set) of the parameters the graph did not reach; derived once, so the
    #: per-step check of :func:`record_forward_order` looks at these only
    unreached: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unreached", tuple(i for i, u in enumerate(self.first_use) if u is None))

    @property
    def traced(self) -> bool:
        return len(self.unreached) < len(self.first_use)

    @property
    def complete(self) -> bool:
        """Every parameter was reached."""
        return not self.unreached

    @classmethod
    def of(cls, loss: Tensor | None, params: ParamSet) -> ForwardOrder:
        """Walk the autograd graph of ``loss`` once (its structure outlives ``backward()``).

        Cost: one visit per graph node (about 1 ms for the 775 nodes of a 12-layer
        transformer), once per parameter set.
        """
        first: dict[int, int] = {}
        root = getattr(loss, "grad_fn", None)
        seen: set[Any] = set()
        joins: list[Any] = []
        stack = [root] if root is not None else []
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            seq = node._sequence_nr()  # the forward position of the operation (public on every Node)
            if type(node).__name__.startswith(_JOINS):
                joins.append(node)
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                variable = getattr(nxt, "variable", None)  # AccumulateGrad: the leaf it feeds
                if variable is not None:
                    key = id(variable)
                    if key not in first or seq < first[key]:
                        first[key] = seq
                elif nxt not in seen:
                    stack.append(nxt)
        skips = sum(_is_skip(node) for node in joins)
        return cls(tuple(first.get(id(p)) for p in params.params), skips)


#: the autograd nodes of an addition or a concatenation (where a skip connection rejoins)
_JOINS = ("AddBackward", "CatBackward")


def _is_skip(join: Any) -> bool:
    """Whether an addition/concatenation node adds a learned function of a value to that value.

    Its inputs (operations, not leaves) are ordered by forward position; one is a skip's
    source when another input's graph reaches it through an operation that uses a
    parameter (``x + f(x)`` with a layer in ``f``; plain arithmetic such as a hand-written
    GELU's ``x + 0.044715 * x**3`` is no skip connection). The search from the later input
    stops at operations that ran before the earliest input (they cannot lead to it), so it
    covers one block's operations, not the whole graph.
    """
    inputs = sorted(
        {n for n, _ in join.next_functions if n is not None and getattr(n, "variable", None) is None},
        key=lambda n: n._sequence_nr(),
    )
    if len(inputs) < 2:
        return False
    source, floor = inputs[0], inputs[0]._sequence_nr()
    for later in inputs[1:]:
        seen: set[Any] = set()
        stack = [later]
        reached = learned = False
        while stack:
            node = stack.pop()
            if node is source:
                reached = True
                continue
            if node in seen or node._sequence_nr() < floor:
                continue
            seen.add(node)
            for n, _ in node.next_functions:
                if n is None:
                    continue
                if getattr(n, "variable", None) is not None:  # a parameter feeds this operation
                    learned = True
                else:
                    stack.append(n)
        if reached and learned:
            return True
    return False


def record_forward_order(
    params: ParamSet, loss: Tensor | None, *, agree: Callable[[list[int | None]], list[int | None]] | None = None
) -> bool:
    """Find ``params``' :class:`ForwardOrder` from ``loss`` if it is not known yet, or must be refreshed.

    Runs once per parameter set, and again only when a parameter the last walk did not
    reach (frozen then, unused then) now has a gradient. When the order changes, the
    groupings cached in ``params.cache`` are dropped, so the next grouping follows it.

    Args:
        params: the parameter set (its ``cache`` keeps the order).
        loss: a loss whose graph covers the parameters (``None``: nothing to walk).
        agree: makes the order the same on every rank (e.g. a broadcast from rank zero).
            Under it no refresh happens: a refresh decided by one rank's gradients alone
            would issue a collective on that rank only.

    Returns:
        Whether the order was (re)computed.
    """
    known = params.forward_order
    if loss is None:
        return False
    if known is not None:
        if agree is not None or known.complete:
            return False
        # unreached parameters that have a gradient now; each set is walked for once only, so
        # parameters the graph never reaches (behind a reentrant checkpoint) cost no walk per step
        waiting = frozenset(i for i in known.unreached if params.params[i].grad is not None)
        if not waiting or waiting <= params.cache.get(_TRIED_KEY, frozenset()):
            return False
        params.cache[_TRIED_KEY] = waiting | params.cache.get(_TRIED_KEY, frozenset())
    order = ForwardOrder.of(loss, params)
    if agree is not None:
        order = ForwardOrder(tuple(agree(list(order.first_use))), order.skips)
    if known is not None and order.first_use == known.first_use:
        return False
    params.cache[_FORWARD_ORDER_KEY] = order
    for key in [k for k in params.cache if isinstance(k, tuple) and k and k[0] == "grouping"]:
        del params.cache[key]
    return True


# --------------------------------------------------------------------------------------
# Groupings
# --------------------------------------------------------------------------------------


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else _ROOT_GROUP


#: ``group_by="auto"``: at most this many groups.
AUTO_MAX_GROUPS = 64


def _span_name(modules: Sequence[str]) -> str:
    """A name for consecutive modules: ``blocks.0-7`` for ``blocks.0.attn`` … ``blocks.7.mlp``.

    The dotted components the first and last module share, then the first component where
    they differ as ``first-last`` (``embed-blocks.0`` style spans that share nothing read
    ``embed-blocks.0``). One module keeps its name.

    Example:
        >>> _span_name(["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"])
        'blocks.0-1'
        >>> _span_name(["blocks.3.attn.q", "blocks.3.mlp"])
        'blocks.3.attn-mlp'
        >>> _span_name(["embed", "blocks.0.attn"])
        'embed-blocks.0'
    """
    first, last = modules[0], modules[-1]
    if len(modules) == 1 or first == last:
        return first
    a, b = first.split("."), last.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == min(len(a), len(b)):  # one is a prefix of the other (a module and its child)
        return ".".join(a[:common]) or first
    head = ".".join(a[:common])
    span = f"{_label(a, common)}-{_label(b, common)}"
    return f"{head}.{span}" if head else span


def _label(parts: list[str], k: int) -> str:
    """``parts[k]``, with the next component when it is an index (``blocks.0``)."""
    if k + 1 < len(parts) and parts[k + 1].isdigit():
        return f"{parts[k]}.{parts[k + 1]}"
    return parts[k]


def _group_name(name: str, group_by: str, depth: int | None, patterns: Sequence[tuple[str, re.Pattern[str]]]) -> str:
    if group_by == "parameter":
        return name
    if group_by == "module":
        return _owner(name)
    if group_by == "depth":
        owner = _owner(name)
        if owner == _ROOT_GROUP:
            return owner
        return ".".join(owner.split(".")[:depth])
    if group_by == "pattern":
        for label, regex in patterns:
            if regex.search(name):
                return label
        return _UNMATCHED_GROUP
    return "all"  # group_by == "total"


@dataclass(frozen=True, eq=False)
class Grouping:
    """A partition of a :class:`ParamSet` into named groups ("layers").

    Attributes:
        names: group names, input side first: in the order the layers run in the forward
            pass when a :class:`ForwardOrder` is known (a group is placed by its first
            parameter to run), else in registration order.
        index: for each parameter of the set, the position of its group in ``names``.
        members: for each group, the qualified names of its parameters.
        ordered_by: ``"forward"``; ``"registration"`` (no forward order was given or
            recorded); or ``"untraced"`` (one was looked for, but the graph reached none of
            the parameters: a loss without a graph, parameters used behind a reentrant
            checkpoint or another copy of them, as FSDP2's unsharded ones; registration
            order is kept).
        unplaced: groups none of whose parameters the forward pass reached; they sit
            right after the group registered before them.
        skips: the skip connections the forward pass showed (:attr:`ForwardOrder.skips`);
            ``None`` when it was not looked at.
    """

    names: tuple[str, ...]
    index: tuple[int, ...]
    members: tuple[tuple[str, ...], ...]
    ordered_by: str = "registration"
    unplaced: tuple[str, ...] = ()
    skips: int | None = None
    _index_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        params: ParamSet,
        *,
        group_by: str = "module",
        group_depth: int | None = None,
        group_patterns: Mapping[str, str] | None = None,
        order: ForwardOrder | None = None,
    ) -> Grouping:
        """Partition ``params``, groups in the order the layers run.

        Args:
            params: the parameter set to partition.
            group_by: ``"module"`` (the module owning each parameter: ``encoder.0.weight`` and
                ``encoder.0.bias`` form ``encoder.0``), ``"parameter"`` (one group per tensor),
                ``"depth"`` (module names cut to their first ``group_depth`` components:
                with depth 2, ``encoder.layers.3.linear1`` falls in ``encoder.layers``),
                ``"pattern"`` (first regex of ``group_patterns`` that matches the parameter
                name with ``re.search``; parameters matching none go to ``"other"``),
                ``"total"`` (a single group), or ``"auto"`` (``"module"`` groups, and for a
                model with more than :data:`AUTO_MAX_GROUPS` of them, consecutive ones in
                forward order merged along the module tree into at most that many, named
                after what they cover: ``encoder.layers.3`` for a whole layer,
                ``blocks.0-1`` for ``blocks.0.*`` and ``blocks.1.*``).
            group_depth: the depth for ``group_by="depth"``.
            group_patterns: group name -> regular expression, for ``group_by="pattern"``.
            order: where each parameter runs (default: ``params.forward_order``, if
                recorded); ``None`` and nothing recorded: registration order.

        Raises:
            ValueError: on an unknown ``group_by`` or arguments that do not fit it.
        """
        *_, patterns = _validation.grouping(group_by, group_depth, group_patterns)
        if group_by == "auto":
            return cls.build(params, group_by="module", order=order)._merged(AUTO_MAX_GROUPS)
        names: list[str] = []
        position: dict[str, int] = {}
        index: list[int] = []
        members: list[list[str]] = []
        for pname in params.names:
            gname = _group_name(pname, group_by, group_depth, patterns)
            if gname in _RESERVED_GROUP_NAMES:
                gname = f"{gname}_"
            if gname not in position:
                position[gname] = len(names)
                names.append(gname)
                members.append([])
            index.append(position[gname])
            members[position[gname]].append(pname)
        order = order if order is not None else params.forward_order
        if order is None or not order.traced or len(order.first_use) != len(params):
            return cls(
                names=tuple(names),
                index=tuple(index),
                members=tuple(tuple(m) for m in members),
                ordered_by="registration" if order is None else "untraced",
                skips=None if order is None else order.skips,
            )
        first: list[int | None] = [None] * len(names)
        for gi, use in zip(index, order.first_use):
            if use is not None and (first[gi] is None or use < first[gi]):  # type: ignore[operator]
                first[gi] = use
        # a group the graph did not reach keeps its place after the group registered before it
        keys: list[tuple[float, int, int]] = []
        for gi, use in enumerate(first):
            keys.append((use, 0, gi) if use is not None else (keys[-1][0] if keys else -math.inf, 1, gi))
        perm = sorted(range(len(names)), key=keys.__getitem__)
        where = {old: new for new, old in enumerate(perm)}
        return cls(
            names=tuple(names[g] for g in perm),
            index=tuple(where[g] for g in index),
            members=tuple(tuple(members[g]) for g in perm),
            ordered_by="forward",
            unplaced=tuple(names[g] for g in perm if first[g] is None),
            skips=order.skips,
        )

    def __len__(self) -> int:
        return len(self.names)

    def _merged(self, max_groups: int) -> Grouping:
        """Consecutive groups merged into at most ``max_groups``, each named after what it covers.

        Merges follow the module tree: names are cut to their first ``d`` components and
        consecutive groups with the same cut merge. The deepest cut that leaves at most
        ``max_groups`` is taken when it leaves at least a quarter of them (one group per
        transformer layer, say); otherwise the next deeper cut is taken and its runs are
        merged in equal consecutive chunks (``blocks.0-1``, ``blocks.2-3``, ...).
        """
        g = len(self.names)
        if g <= max_groups:
            return self
        parts = [n.split(".") for n in self.names]

        def runs(depth: int) -> list[list[int]]:
            out: list[list[int]] = []
            last: list[str] | None = None
            for k, p in enumerate(parts):
                cut = p[:depth]
                if cut != last:
                    out.append([])
                    last = cut
                out[-1].append(k)
            return out

        deepest = max(len(p) for p in parts)
        by_depth = {d: runs(d) for d in range(1, deepest + 1)}
        fitting = [d for d in by_depth if len(by_depth[d]) <= max_groups]
        best = max(fitting) if fitting else None
        if best is not None and len(by_depth[best]) * 4 >= max_groups:
            depth, chunk = best, 1
        else:
            depth = best + 1 if best is not None else 1
            chunk = math.ceil(len(by_depth[depth]) / max_groups)
        units = by_depth[depth]
        spans = [[k for unit in units[i : i + chunk] for k in unit] for i in range(0, len(units), chunk)]
        prefixes = [".".join(parts[unit[0]][:depth]) for unit in units]
        names: list[str] = []
        for i in range(0, len(units), chunk):
            first, last = prefixes[i], prefixes[min(i + chunk, len(units)) - 1]
            name = _span_name([first, last]) if first != last else first
            while name in names or name in _RESERVED_GROUP_NAMES:
                name = f"{name}_"
            names.append(name)
        where = {k: gi for gi, span in enumerate(spans) for k in span}
        unplaced = set(self.unplaced)
        return Grouping(
            names=tuple(names),
            index=tuple(where[gi] for gi in self.index),
            members=tuple(tuple(m for k in span for m in self.members[k]) for span in spans),
            ordered_by=self.ordered_by,
            skips=self.skips,
            unplaced=tuple(n for n, span in zip(names, spans) if all(self.names[k] in unplaced for k in span)),
        )

    def present(self, has_grad: tuple[bool, ...]) -> tuple[bool, ...]:
        """Per group, whether any of its parameters has a gradient (cached for the last pattern seen)."""
        cached = self._index_cache.get("present")
        if cached is not None and cached[0] == has_grad:
            return cached[1]
        present = [False] * len(self)
        for gi, has in zip(self.index, has_grad):
            present[gi] = present[gi] or has
        self._index_cache["present"] = (has_grad, tuple(present))
        return tuple(present)

    def index_tensor(self, device: torch.device) -> Tensor:
        """``index`` as a long tensor on ``device`` (built once per device)."""
        cache = self._index_cache
        t = cache.get(device)
        if t is None:
            t = cache[device] = torch.tensor(self.index, dtype=torch.long, device=device)
        return t


# --------------------------------------------------------------------------------------
# Per-tensor statistics
# --------------------------------------------------------------------------------------

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def _norms(tensors: list[Tensor], ord: float) -> Tensor:
    """Per-tensor norms of a bucket (plain, strided, same-device, same-dtype tensors), as one float32 vector."""
    dtype = torch.float32 if tensors[0].dtype in _LOW_PRECISION else None
    return torch.stack(_lightning.foreach_norm(tensors, ord, dtype=dtype, plain=True)).to(torch.float32)


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """Per-tensor max |x| of same-device, same-dtype tensors, as one float32 vector.

    A float64 maximum beyond float32's range saturates (see :func:`_narrow`) rather than
    reading Inf, so that Inf keeps meaning a non-finite element.
    """
    m = torch.stack(_lightning.foreach_max_abs(tensors))
    return _narrow(m) if m.dtype == torch.float64 else m.to(torch.float32)


#: float32's largest finite value and its smallest positive (subnormal) one.
_F32_MAX = torch.finfo(torch.float32).max
_F32_SMALLEST = 2.0**-149
_WIDE = (torch.float64, torch.complex128)


def _narrow(values: Tensor) -> Tensor:
    """Non-negative float64 values as float32 that keep what matters: finite stays finite, non-zero stays non-zero.

    Values beyond float32's range saturate at its largest finite value (3.4e38) and
    positive values below its smallest subnormal (1.4e-45) read that subnormal; NaN and Inf
    are kept. Every value of fp32/fp16/bf16 gradients' norms lies in range, so nothing
    changes for them; only float64 gradients reach these bounds.
    """
    clamped = values.clamp(max=_F32_MAX)
    clamped = torch.where(values > 0, clamped.clamp(min=_F32_SMALLEST), clamped)
    return torch.where(torch.isfinite(values), clamped, values).to(torch.float32)


#: Below this RMS (norm / sqrt(numel)) a float32 sum of squares may have lost precision:
#: squares under float32's smallest normal number (1.2e-38) are subnormal. At an RMS of
#: 1e-18 their relative error on the sum is at most 1.4e-45 / 1e-36, about 1e-9.
_F32_SMALL_RMS = 1e-18


def _bucket_norms(
    tensors: list[Tensor], numel: Tensor, floor: Tensor, inv_scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-tensor L2 norms of same-device, same-dtype tensors as float32, and max |x| when it was taken.

    The norm in the tensors' precision (float32 at least), one ``torch._foreach_norm``
    (what ``clip_grad_norm_`` runs). A float32 sum of squares underflows (elements below
    ~1e-19 lose precision, below ~1e-22 read 0) or overflows (norms beyond ~1.8e19 read
    Inf); a NaN or Inf element shows in the norm either way.

    - On the CPU (:func:`_cpu_norms`) the tensors whose norm may have left the range are
      found on the host at no cost (no device to wait for) and only they are read again,
      in float64: exact norms, one read of the gradients as a rule, max |x| not taken.
    - Elsewhere deciding that would be a host sync, so a max |x| pass reads every tensor
      up front and norms that under- or overflowed are replaced by bounds from it
      (:func:`_repair_range`); max |x| comes back.

    A finite tensor whose norm is beyond float32's range saturates at 3.4e38 rather than
    reading Inf, so that Inf means a non-finite element. ``inv_scale`` (a pending loss
    scale's reciprocal) is applied to both.
    """
    dtype = tensors[0].dtype
    device = tensors[0].device
    maxes: Tensor | None = None
    if device.type == "cpu":
        norms = _cpu_norms(tensors, numel, floor)
    else:
        norms = _norms(tensors, 2.0) if dtype not in _WIDE else torch.stack(_lightning.foreach_norm(tensors, 2.0))
        maxes = torch.stack(_lightning.foreach_max_abs(tensors))
        maxes = maxes if maxes.dtype == norms.dtype else maxes.to(norms.dtype)
        norms = _repair_range(norms, maxes, numel.to(device=device, dtype=norms.dtype))
    if inv_scale is not None:
        norms = norms * inv_scale.to(device=norms.device, dtype=norms.dtype)
        maxes = maxes * inv_scale.to(device=maxes.device, dtype=maxes.dtype) if maxes is not None else None
    narrow = lambda t: _narrow(t) if t.dtype == torch.float64 else t.to(torch.float32)  # noqa: E731
    return narrow(norms), (narrow(maxes) if maxes is not None else None)


def _cpu_norms(tensors: list[Tensor], numel: Tensor, floor: Tensor) -> Tensor:
    """Norms of CPU tensors, exact over their whole range, reading the gradients once as a rule.

    The norms are taken in the tensors' precision; the few whose norm came out Inf, or at
    most ``floor`` (zero, or so small that squares went subnormal: :data:`_F32_SMALL_RMS`
    times the root of the element count; 0 for float64) are read again with
    float64 accumulation. Squares of float32 values cannot under- or overflow in float64
    (the smallest subnormal squared is 2e-90, the largest float32 squared times 2**63
    elements is 1e96), so those norms are exact. Deciding which costs nothing on the CPU:
    the flags are viewed in place, no copy, no device to wait for. float64 tensors have no
    wider type: theirs are replaced by bounds from a max |x| pass (:func:`_repair_range`).
    """
    dtype = tensors[0].dtype
    norms = _norms(tensors, 2.0) if dtype not in _WIDE else torch.stack(_lightning.foreach_norm(tensors, 2.0))
    numel, floor = numel.to(norms.device), floor.to(norms.device)  # made on the results' device
    # the norms are a CPU tensor's memory, viewed through numpy: no copy, nothing to wait for
    values = norms.numpy()
    which = np.flatnonzero((values <= floor.numpy()) | (values == math.inf))
    if not len(which):
        return norms
    picked = torch.from_numpy(which)
    again = [tensors[i] for i in which]
    if dtype not in _WIDE:
        exact = torch.stack(_lightning.foreach_norm(again, 2.0, dtype=_wide_dtype(dtype)))
        return norms.to(exact.dtype).index_copy(0, picked, exact)
    maxes = torch.stack(_lightning.foreach_max_abs(again)).to(norms.dtype)
    return norms.index_copy(0, picked, _repair_range(norms[picked], maxes, numel[picked].to(norms.dtype)))


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _repair_range(norms: Tensor, maxes: Tensor, numel: Tensor) -> Tensor:
    """Keep norms that float32 squares pushed out of range meaningful.

    ``torch._foreach_norm`` sums squares in float32: a tensor whose elements are all
    below ~1e-22 reads 0, one whose norm exceeds ~1.8e19 reads Inf, although max |x|
    (which squares nothing) is exact. In those cases the norm is replaced by the closest
    bound that needs no second pass: ``max|x|`` when it underflowed (a lower bound) and
    ``max|x| * sqrt(numel)`` when it overflowed (an upper bound). A bound beyond float32's
    range saturates at its largest finite value, so that Inf keeps meaning a non-finite
    element. Zero stays zero and NaN/Inf elements keep their NaN/Inf.
    """
    underflow = (norms == 0) & (maxes > 0)
    overflow = torch.isinf(norms) & torch.isfinite(maxes)
    norms = torch.where(underflow, maxes, norms)
    norms = torch.where(overflow, maxes * numel.sqrt(), norms)
    return torch.where(torch.isfinite(maxes) & torch.isinf(norms), torch.full_like(norms, _F32_MAX), norms)


def stored_values(t: Tensor) -> Tensor:
    """The elements that make up ``t``'s norm: a DTensor's local shard, a sparse tensor's values.

    A sparse COO tensor is coalesced first when it is not (duplicate indices are summed,
    so the norm of its values is exact); compressed layouts (CSR, CSC, BSR, BSC) hold no
    duplicates. Dense tensors come back as they are.
    """
    t = local_tensor(t)
    if t.layout is torch.strided:
        return t
    if t.layout is torch.sparse_coo:
        return (t if t.is_coalesced() else t.coalesce())._values()
    return t.values()


def bucket(
    tensors: Sequence[Tensor | None],
    reduce_keys: Sequence[tuple[Any, ...]] | None = None,
    *,
    device: torch.device | None = None,
) -> dict[tuple[Any, ...], tuple[list[Tensor], list[int]]]:
    """Group tensors for foreach kernels: ``(device, dtype, reduce key, dense) -> (tensors, positions)``.

    The one bucketing helper of the package. DTensors contribute their local shard;
    sparse tensors get buckets of their own (``dense`` False: foreach kernels take
    strided tensors only, and callers read their values with :func:`stored_values`).
    ``None`` and empty tensors are left out (an FSDP2 rank whose shard of a small
    parameter is empty contributes nothing). A plain loop: it runs every step, so it does
    as little as possible per tensor.

    ``device``: the caller knows that every plain tensor in ``tensors`` lies on ``device``
    and is non-empty (the gradients of a :attr:`ParamSet.uniform_device` set), so those
    two checks are skipped.
    """
    uniform = _uniform_bucket(tensors, reduce_keys, device)
    if uniform is not None:
        return uniform
    buckets: dict[tuple[Any, ...], tuple[list[Tensor], list[int]]] = {}
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if type(t) is not Tensor:  # DTensor (or another subclass): the local shard
            t = local_tensor(t)
        if t.numel() == 0:
            continue
        key = (t.device, t.dtype, reduce_keys[i] if reduce_keys is not None else (), t.layout is torch.strided)
        entry = buckets.get(key)
        if entry is None:
            buckets[key] = ([t], [i])
        else:
            entry[0].append(t)
            entry[1].append(i)
    return buckets


_GRAD = operator.attrgetter("grad")
_PLAIN = {Tensor}
NoneType = type(None)
_NONE_OR_TENSOR = {NoneType, Tensor}
_UNSHARDED: set[tuple[Any, ...]] = {()}
_STRIDED = {torch.strided}
_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")
_LAYOUT = operator.attrgetter("layout")


def _uniform_bucket(
    tensors: Sequence[Tensor | None], reduce_keys: Sequence[tuple[Any, ...]] | None, device: torch.device | None
) -> dict[tuple[Any, ...], tuple[list[Tensor], list[int]]] | None:
    """:func:`bucket`'s answer when it is one bucket, found with C-level maps; ``None`` otherwise.

    The common case (every gradient a plain, non-empty, strided tensor of one device and
    dtype, nothing sharded, some maybe ``None``) then costs a few passes of ``map`` over
    the list instead of a Python loop: ~0.1 ms instead of ~1.3 ms at 1,024 tensors.
    """
    types = set(map(type, tensors))
    if types - _NONE_OR_TENSOR:
        return None
    if NoneType in types:
        idx = [i for i, t in enumerate(tensors) if t is not None]
        present: list[Tensor] = [tensors[i] for i in idx]  # type: ignore[misc]
    else:
        idx, present = list(range(len(tensors))), list(tensors)  # type: ignore[arg-type]
    if not present or (reduce_keys is not None and set(reduce_keys) != _UNSHARDED):
        return None
    dtypes = set(map(_DTYPE, present))
    if len(dtypes) != 1 or set(map(_LAYOUT, present)) != _STRIDED:
        return None
    if device is None or present[0].device != device:  # no hint, or the model moved since the hint
        devices = set(map(_DEVICE, present))
        if len(devices) != 1 or 0 in map(Tensor.numel, present):
            return None
        device = devices.pop()
    return {(device, dtypes.pop(), (), True): (present, idx)}


def _stored_buckets(
    tensors: Sequence[Tensor | None],
    reduce_keys: Sequence[tuple[Any, ...]] | None = None,
    device: torch.device | None = None,
) -> dict[tuple[Any, ...], tuple[list[Tensor], list[int]]]:
    """:func:`bucket`, with sparse tensors replaced by their stored values (what norms are taken of)."""
    out = bucket(tensors, reduce_keys, device=device)
    for key, (ts, idx) in out.items():
        if not key[-1]:
            values = [stored_values(t) for t in ts]
            keep = [k for k, v in enumerate(values) if v.numel()]
            out[key] = ([values[k] for k in keep], [idx[k] for k in keep])
    return {k: v for k, v in out.items() if v[0]}


def _bucket_index(
    cache: dict[Any, Any], key: tuple[Any, ...], device: torch.device, idx: list[int], ts: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Positions, element counts and small-norm floors of a bucket as device tensors, built once per layout.

    Buckets of sparse tensors (``key[-1]`` False) are built every time: their number of
    stored elements varies.
    """
    ckey = ("bucket", key, device, tuple(idx))
    cached = cache.get(ckey)
    if cached is None:
        sizes = torch.tensor([float(t.numel()) for t in ts], device=device)
        # the norm below which float32 squares may have gone subnormal (see _cpu_norms)
        floor = sizes.sqrt() * _F32_SMALL_RMS if key[1] not in _WIDE else torch.zeros_like(sizes)
        cached = (torch.tensor(idx, device=device), sizes, floor)
        if key[-1]:
            cache[ckey] = cached
    return cached


def _combine_shards(
    norms: Tensor,
    maxes: Tensor | None,
    reduce_keys: Sequence[tuple[Any, ...]],
    cache: dict[Any, Any],
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """Per-tensor norms (and maxima, if given) of sharded tensors combined over their ranks (:func:`tensor_stats`)."""
    n = len(norms)
    # Every rank must issue the same collectives in the same order, including ranks that
    # hold no local gradient for some key: take the keys from the parameter list (once per list).
    known = cache.get("shard keys")  # one slot: callers that build a new list each time replace it
    if known is None or known[0] is not reduce_keys:
        known = cache["shard keys"] = (reduce_keys, list(dict.fromkeys(k for k in reduce_keys if k)))
    for rkey in known[1]:
        mask = cache.get(("mask", rkey, device))
        if mask is None:
            mask = cache[("mask", rkey, device)] = torch.tensor([k == rkey for k in reduce_keys], device=device)
        for group in rkey:
            local_norms = torch.where(mask, norms, torch.zeros_like(norms))
            local_maxes = torch.where(mask, maxes, torch.zeros_like(maxes)) if maxes is not None else None
            # a NaN or Inf element shows in its tensor's norm already (norms saturate, so Inf is non-finite)
            flags = local_maxes if local_maxes is not None else local_norms
            peak = torch.cat([local_norms, local_maxes]) if local_maxes is not None else local_norms.clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            top = peak[:n]
            safe = torch.where(top > 0, top, torch.ones_like(top))
            # NaN/Inf are counted, not trusted to a MAX reduction (whose NaN handling is
            # backend-defined), so that every rank learns of a non-finite shard.
            summed = torch.cat([(local_norms / safe) ** 2, torch.isnan(flags).float(), torch.isinf(flags).float()])
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
            ratio_sq, nan_count, inf_count = summed[:n], summed[n : 2 * n], summed[2 * n :]
            combined = torch.where(torch.isinf(top), top, top * ratio_sq.sqrt())
            nan = torch.full_like(top, math.nan)
            inf = torch.full_like(top, math.inf)
            combined = torch.where(nan_count > 0, nan, torch.where(inf_count > 0, inf, combined))
            norms = torch.where(mask, combined, norms)
            if maxes is not None:
                gmax = torch.where(nan_count > 0, nan, torch.where(inf_count > 0, inf, peak[n:]))
                maxes = torch.where(mask, gmax, maxes)
    return norms, maxes


def _per_tensor(
    tensors: Sequence[Tensor | None],
    reduce_keys: Sequence[tuple[Any, ...]] | None,
    device: torch.device | None,
    inv_scale: Tensor | None,
    cache: dict[Any, Any] | None,
    *,
    norms: bool,
    maxes: bool | None,
    buckets: dict[tuple[Any, ...], tuple[list[Tensor], list[int]]] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The one loop behind :func:`tensor_stats`, :func:`tensor_norms` and :func:`tensor_max_abs`.

    ``buckets``: :func:`_stored_buckets` of ``tensors``, when the caller made them already.
    """
    if cache is None:
        cache = {}
    n = len(tensors)
    if reduce_keys is None:
        reduce_keys = [() for _ in range(n)]
    if buckets is None:
        buckets = _stored_buckets(tensors, reduce_keys)
    if device is None:
        device = next(iter(buckets))[0] if buckets else torch.device("cpu")
    if maxes is None:  # sparse gradients get coalesced (replaced) by clipping: their max is taken now
        maxes = any(not key[-1] for key in buckets)
    # one bucket holding every tensor, in order (the common case): its vectors are the result
    whole = len(buckets) == 1 and len(next(iter(buckets.values()))[1]) == n
    out_norms = torch.zeros(n, dtype=torch.float32, device=device) if not whole else None
    out_maxes: Tensor | None = None
    all_maxes = True  # every bucket took max |x| for its norms: it comes for free
    for key, (ts, idx) in buckets.items():
        index, sizes, floor = _bucket_index(cache, key, device, idx, ts)
        bucket_maxes = None
        if norms:
            bucket_norms, bucket_maxes = _bucket_norms(ts, sizes, floor, inv_scale)
            if whole:
                out_norms = bucket_norms.to(device)
            else:
                out_norms.index_copy_(0, index, bucket_norms.to(device))  # type: ignore[union-attr]
        all_maxes = all_maxes and bucket_maxes is not None
        if maxes or bucket_maxes is not None:
            if bucket_maxes is None:
                bucket_maxes = _max_abs(ts)
                if inv_scale is not None:
                    bucket_maxes = bucket_maxes * inv_scale.to(bucket_maxes.device)
            if whole:
                out_maxes = bucket_maxes.to(device)
            else:
                if out_maxes is None:
                    out_maxes = torch.zeros(n, dtype=torch.float32, device=device)
                out_maxes.index_copy_(0, index, bucket_maxes.to(device))
    if out_norms is None:  # nothing to read (no gradient at all), or maxes only
        out_norms = torch.zeros(n, dtype=torch.float32, device=device)
    if maxes and out_maxes is None:
        out_maxes = torch.zeros(n, dtype=torch.float32, device=device)
    if not maxes and not (norms and all_maxes):
        out_maxes = None
    if norms:
        out_norms, out_maxes = _combine_shards(out_norms, out_maxes, reduce_keys, cache, device)
    elif out_maxes is not None:
        _, out_maxes = _combine_shards(torch.zeros_like(out_maxes), out_maxes, reduce_keys, cache, device)
    return (out_norms if norms else None), out_maxes


def tensor_norms(
    tensors: Sequence[Tensor | None],
    reduce_keys: Sequence[tuple[Any, ...]] | None = None,
    *,
    device: torch.device | None = None,
    inv_scale: Tensor | None = None,
    cache: dict[Any, Any] | None = None,
) -> Tensor:
    """L2 norm of each tensor, on one device, in one read of the tensors and without a host sync.

    The arguments are those of :func:`tensor_stats`. One ``torch._foreach_norm`` per
    device/dtype bucket; on the CPU the fp32/fp16/bf16 norms are exact over the whole
    range (a 1e-30-scale tensor does not read 0, a 1e20-scale one not Inf: those few are
    read again in float64, see :func:`_bucket_norms`), elsewhere out-of-range norms become
    bounds. A NaN element makes its entry NaN; an Inf (no NaN) makes it Inf. A finite
    tensor never reads Inf: a norm beyond float32's range saturates at 3.4e38.

    Example:
        >>> tensor_norms([torch.full((4,), 1e-30), None, torch.full((4,), 1e20)])
        tensor([2.0000e-30, 0.0000e+00, 2.0000e+20])
    """
    return _per_tensor(tensors, reduce_keys, device, inv_scale, cache, norms=True, maxes=False)[0]  # type: ignore[return-value]


def tensor_max_abs(
    tensors: Sequence[Tensor | None],
    reduce_keys: Sequence[tuple[Any, ...]] | None = None,
    *,
    device: torch.device | None = None,
    inv_scale: Tensor | None = None,
    cache: dict[Any, Any] | None = None,
) -> Tensor:
    """max |x| of each tensor (a pass of its own; see :func:`tensor_stats` for the arguments)."""
    return _per_tensor(tensors, reduce_keys, device, inv_scale, cache, norms=False, maxes=True)[1]  # type: ignore[return-value]


def tensor_stats(
    tensors: Sequence[Tensor | None],
    reduce_keys: Sequence[tuple[Any, ...]] | None = None,
    *,
    device: torch.device | None = None,
    inv_scale: Tensor | None = None,
    cache: dict[Any, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """L2 norm and max |x| of each tensor, on one device, without a host sync.

    Two reads of the tensors: where only the norms are needed, :func:`tensor_norms` reads
    them once. ``None`` entries count as zero. Tensors are bucketed by device and dtype;
    each bucket takes one ``torch._foreach_norm`` for L2 (see :func:`tensor_norms` for its
    precision) and one pass for the max. With ``inv_scale``, both are multiplied by it (a
    pending loss scale divided out). Sharded DTensors contribute their local shard; the
    shards are combined across the ranks of their ``reduce_keys`` groups (max of the
    maxima; the norms as ``m * sqrt(sum((n_r / m)**2))`` with ``m`` the largest shard
    norm, which neither overflows nor underflows), with two collectives per group. Every
    rank must call this with the same parameter list.

    Args:
        tensors: the tensors (``None`` for a missing gradient).
        reduce_keys: per tensor, the process groups to combine shards over (see
            :class:`ParamSet`); ``None`` for none.
        device: where the results live (default: the first tensor's device).
        inv_scale: a factor applied to the results (``1 / loss_scale``).
        cache: a dict kept between calls for the same tensor list (``ParamSet`` holds
            one), so the small index tensors are built once rather than copied to the
            device every step (a host-to-device copy from pageable memory can stall).

    Returns:
        ``(norms, max_abs)``: float32 vectors of ``len(tensors)``. A NaN anywhere in a
        tensor makes both of its entries NaN; an Inf makes them Inf.
    """
    norms, maxes = _per_tensor(tensors, reduce_keys, device, inv_scale, cache, norms=True, maxes=True)
    return norms, maxes  # type: ignore[return-value]


def total_norm(norms: Tensor) -> Tensor:
    """``sqrt(sum(norms**2))`` of a vector of norms as a 0-dim tensor, without under- or overflow.

    The one total-norm combiner of the package (see :func:`reduce_norms`).

    Example:
        >>> total_norm(torch.tensor([3e-30, 4e-30]))
        tensor(5.0000e-30)
    """
    if _wide_sum(norms):
        return _saturate(norms.double().square().sum().sqrt(), norms.dtype)
    return reduce_norms(norms, torch.zeros_like(norms, dtype=torch.long), 1)[0]


def _wide_sum(norms: Tensor) -> bool:
    """Whether ``norms`` (float32 or narrower) can be squared and summed in float64 on their device.

    Their squares cannot under- or overflow there (float32's largest squared, times 2**63
    items, is 1e96), so the sums are exact in a few operations. Apple's MPS has no float64.
    """
    return norms.dtype in (torch.float32, torch.float16, torch.bfloat16) and norms.device.type != "mps"


def _saturate(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 ``values`` as ``dtype``, a finite value beyond its range at its largest finite one (NaN/Inf kept)."""
    top = torch.finfo(dtype).max
    return torch.where(values < math.inf, values.clamp(max=top), values).to(dtype)


def _on_host(norms: Tensor) -> bool:
    """Whether ``norms`` are float32 CPU values: combined in numpy, on a view of their memory.

    The same float64 sums in a few numpy calls, each a fraction of a torch dispatch: on
    the CPU there is no device for torch to keep the work on (see :mod:`lightning_gradguard._arrays`).
    """
    return norms.dtype == torch.float32 and _arrays.ops_for(norms.device) is _arrays.HOST


def _host_saturated(values: np.ndarray | np.float64) -> Tensor:
    """:func:`_saturate` of float64 numpy ``values`` (or one value) to float32, as a CPU tensor."""
    if not np.ndim(values):
        value = float(values)
        return torch.tensor(_F32_MAX if _F32_MAX < value < math.inf else value, dtype=torch.float32)
    return torch.from_numpy(np.where(values < math.inf, np.minimum(values, _F32_MAX), values).astype(np.float32))


def reduce_norms(norms: Tensor, index: Tensor, size: int) -> Tensor:
    """Combine L2 norms into ``size`` group norms: ``sqrt(sum of squares)`` per group.

    float32 (and narrower) norms are squared and summed in float64, exact for any values;
    a finite group norm beyond float32's range saturates at 3.4e38. Otherwise (float64
    norms, or no float64 on the device) it is ``m * sqrt(sum((n / m)**2))`` with ``m`` the
    group's largest norm, so that neither tiny (vanishing) nor huge (exploding) norms
    under- or overflow. NaN propagates; an Inf norm makes its group Inf.

    Args:
        norms: per-item norms, shape ``(N,)``.
        index: group of each item, shape ``(N,)``, values in ``[0, size)``.
        size: number of groups.
    """
    if _on_host(norms):
        squares = norms.numpy().astype(np.float64)
        squares *= squares
        return _host_saturated(np.sqrt(np.bincount(index.numpy(), weights=squares, minlength=size)))
    if _wide_sum(norms):
        sums = torch.zeros(size, dtype=torch.float64, device=norms.device).index_add_(0, index, norms.double().square())
        return _saturate(sums.sqrt(), norms.dtype)
    top = torch.zeros(size, dtype=norms.dtype, device=norms.device).scatter_reduce_(
        0, index, norms, reduce="amax", include_self=True
    )
    safe = torch.where(top > 0, top, torch.ones_like(top))
    ratio_sq = (norms / safe[index]) ** 2
    sums = torch.zeros(size, dtype=norms.dtype, device=norms.device).index_add_(0, index, ratio_sq)
    return torch.where(torch.isinf(top), top, top * sums.sqrt())


# --------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------


class HostStats:
    """Grouped gradient statistics on the host (one device-to-host copy).

    Attributes:
        total_norm: L2 norm of all gradients together (unscaled).
        group_norms: group name -> L2 norm, in group order.
        max_abs: largest |g| over all gradients. When it was not brought along in the
            copy (:meth:`GroupedStats.to_host` with ``max_abs=False``), reading it computes
            it then: a pass over the gradients and a host sync of its own.
        nonfinite_groups: groups holding a NaN or Inf, in group order.
        all_finite: no NaN or Inf anywhere.
        extras: the values of the ``extra`` tensors passed to :meth:`GroupedStats.to_host`.
    """

    def __init__(
        self,
        total_norm: float,
        group_norms: dict[str, float],
        max_abs: float | None = None,
        nonfinite_groups: tuple[str, ...] = (),
        extras: tuple[list[float], ...] = (),
        *,
        max_abs_of: Callable[[], float] | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self.total_norm = total_norm
        self._on_read = on_read
        self.group_norms = group_norms
        self.nonfinite_groups = tuple(nonfinite_groups)
        self.extras = tuple(extras)
        self._max_abs = max_abs
        self._max_abs_of = max_abs_of

    @property
    def max_abs(self) -> float:
        if self._on_read is not None:
            self._on_read()
        if self._max_abs is None:
            self._max_abs = self._max_abs_of() if self._max_abs_of is not None else math.nan
        return self._max_abs

    @property
    def all_finite(self) -> bool:
        return not self.nonfinite_groups

    def __repr__(self) -> str:
        shown = "…" if self._max_abs is None else self._max_abs
        return (
            f"HostStats(total_norm={self.total_norm}, group_norms={self.group_norms}, max_abs={shown}, "
            f"nonfinite_groups={self.nonfinite_groups}, extras={self.extras})"
        )


def _host_max(maxes: list[float]) -> float:
    return max(maxes, default=0.0) if not any(map(math.isnan, maxes)) else math.nan


class GroupedStats:
    """Per-group gradient statistics, still on the device.

    Attributes:
        grouping: the partition the values refer to.
        norms: L2 norm per group, shape ``(G,)``.
        max_abs: max |g| per group, shape ``(G,)``; computed on first read when the
            snapshot did not compute it (a pass over the gradients, see
            :attr:`GradSnapshot.max_abs`).
        present: per group, whether any of its parameters had a gradient (host info).
        nonfinite: per group, whether it holds a NaN or an Inf (device bool), known
            from the norms without reading ``max_abs``.
    """

    def __init__(
        self,
        grouping: Grouping,
        norms: Tensor,
        max_abs: Tensor | None = None,
        present: tuple[bool, ...] = (),
        *,
        nonfinite: Tensor | None = None,
        max_abs_of: Callable[[], Tensor] | None = None,
        on_read: Callable[[], None] | None = None,
        totals: GradSnapshot | None = None,
        nonfinite_of: Callable[[], Tensor] | None = None,
    ) -> None:
        self._on_read = on_read
        self._totals = totals  # the snapshot grouped: its total norm and finiteness are the groups' too
        self._nonfinite_of = nonfinite_of
        if max_abs is None and max_abs_of is None and nonfinite is None and nonfinite_of is None:
            raise ValueError("`GroupedStats` needs `max_abs`, or `nonfinite` (or `nonfinite_of`) and `max_abs_of`.")
        self.grouping = grouping
        self.norms = norms
        self.present = tuple(present)
        self._max_abs = max_abs
        self._max_abs_of = max_abs_of
        self._nonfinite = nonfinite

    @property
    def max_abs(self) -> Tensor:
        if self._on_read is not None:
            self._on_read()
        if self._max_abs is None:
            if self._max_abs_of is None:
                raise RuntimeError("this `GroupedStats` was built without max |g|.")
            self._max_abs = self._max_abs_of()
        return self._max_abs

    @property
    def max_abs_known(self) -> bool:
        """Whether ``max_abs`` is computed already (reading it costs nothing more)."""
        return self._max_abs is not None

    @property
    def total_norm(self) -> Tensor:
        """L2 norm of all gradients, a 0-dim device tensor."""
        return self._totals.total_norm if self._totals is not None else total_norm(self.norms)

    @property
    def nonfinite(self) -> Tensor:
        """Per group, whether it holds a NaN or an Inf (device bool tensor)."""
        if self._nonfinite is None:
            self._nonfinite = self._nonfinite_of() if self._nonfinite_of is not None else ~torch.isfinite(self.max_abs)
        return self._nonfinite

    @property
    def all_finite(self) -> Tensor:
        """0-dim device bool: no NaN or Inf in any gradient."""
        return self._totals.all_finite if self._totals is not None else ~self.nonfinite.any()

    def to_host(self, extra: Sequence[Tensor] = (), *, max_abs: bool | None = None) -> HostStats:
        """Copy the statistics (and optional extra tensors) to the host in one transfer.

        Args:
            extra: more device tensors to bring along in the same copy; their values come
                back flattened in ``HostStats.extras``, in order.
            max_abs: bring max |g| along (``True``: computed now if it was not); ``None``
                (default): only if it is computed already, else ``HostStats.max_abs`` is
                computed when read (a pass and a copy of its own); ``False``: never now.
        """
        g = len(self.grouping)
        with_max = bool(max_abs) or (max_abs is None and self._max_abs is not None)
        parts = [self.total_norm.view(1), self.norms, self.nonfinite.to(self.norms.dtype)]
        if with_max:
            mx = self._max_abs if self._max_abs is not None and not max_abs else self.max_abs
            parts.append(mx.to(self.norms.dtype))
        parts.extend(e.reshape(-1).to(self.norms) for e in extra)
        total, *values = torch.cat(parts).tolist()
        norms, bad = values[:g], values[g : 2 * g]
        rest = values[2 * g :]
        host_max = None
        if with_max:
            host_max, rest = _host_max(rest[:g]), rest[g:]
        extras: list[list[float]] = []
        for e in extra:
            extras.append(rest[: e.numel()])
            rest = rest[e.numel() :]
        names = self.grouping.names
        return HostStats(
            total_norm=total,
            group_norms=dict(zip(names, norms)),
            max_abs=host_max,
            nonfinite_groups=tuple(n for n, b in zip(names, bad) if b),
            extras=tuple(extras),
            max_abs_of=None if with_max else lambda: _host_max(self.max_abs.tolist()),
            on_read=self._on_read if with_max else None,
        )

    def __repr__(self) -> str:
        return f"GroupedStats(groups={len(self.grouping)}, norms={self.norms}, max_abs_known={self.max_abs_known})"


#: ``ParamSet.cache`` key: max |g| was asked for, so snapshots of the set compute it with the norms.
_WANT_MAX_KEY = "max_abs_wanted"
#: ``ParamSet.cache`` key: how many snapshots of the set were taken (up to :data:`MAX_ABS_LEARNING`).
_TAKEN_KEY = "snapshots_taken"
#: The first snapshots of a parameter set compute max |g| with the norms whatever happens; if
#: none of them is asked for it, later ones compute it only when read. A reader that reads every
#: step (the alarm, the value clipper) is thus never served stale values.
MAX_ABS_LEARNING = 8


class GradSnapshot:
    """Per-tensor gradient statistics of one :class:`ParamSet` at one moment.

    All values are unscaled (a pending loss scale was divided out) and stay on the device.

    Attributes:
        params: the parameter set.
        norms: L2 norm of each parameter's gradient, shape ``(N,)``; 0 if no grad. NaN or
            Inf exactly where the gradient holds a NaN or an Inf (a finite gradient's norm
            beyond float32's range reads 3.4e38).
        max_abs: max |g| of each parameter's gradient, shape ``(N,)``; 0 if no grad.
            Computed by :func:`take_snapshot` when asked for (``max_abs=True``), for the
            first :data:`MAX_ABS_LEARNING` snapshots of a parameter set, when an earlier
            snapshot of the set was asked for it, or in distributed runs; otherwise on
            first read, from the gradients as they are then (a ``RuntimeWarning`` says
            so if they changed in place since the snapshot). Any read makes later
            snapshots of the set compute it up front.
        has_grad: per parameter, whether ``.grad`` was set (host info, no sync).
        scale: the loss scale that was divided out, or ``None``.
    """

    def __init__(
        self,
        params: ParamSet,
        norms: Tensor,
        max_abs: Tensor | None = None,
        has_grad: tuple[bool, ...] = (),
        scale: Tensor | None = None,
        *,
        stamp: tuple[Any, ...] | None = None,
    ) -> None:
        self.params = params
        self.norms = norms
        self.has_grad = tuple(has_grad)
        self.scale = scale
        self._max_abs = max_abs
        self._stamp = stamp
        self._cache: dict[int, GroupedStats] = {}
        self._total: Tensor | None = None
        self._finite: Tensor | None = None
        #: the ids of the gradients it read and where each dense bucket's are (see :meth:`buckets_of`)
        self._layout: tuple[tuple[int, ...], dict[tuple[Any, ...], list[int]]] | None = None

    def buckets_of(
        self, grads: Sequence[Tensor | None]
    ) -> dict[tuple[Any, ...], tuple[list[Tensor], list[int]]] | None:
        """:func:`bucket` of ``grads`` from the snapshot's layout, if they are the very tensors it read; else ``None``.

        Scaling them in place (clipping) needs no second bucketing then. ``None`` when a
        gradient was replaced since (by another callback, or dropped) or a bucket was
        sparse: bucket again. The snapshot keeps ids and positions, never the tensors, so
        that it holds no gradient memory alive.
        """
        if self._layout is None or tuple(map(id, grads)) != self._layout[0]:
            return None
        return {key: ([grads[i] for i in idx], idx) for key, idx in self._layout[1].items()}  # type: ignore[misc]

    def _mark_wanted(self) -> None:
        self.params.cache[_WANT_MAX_KEY] = True

    @property
    def max_abs(self) -> Tensor:
        params = self.params
        params.cache[_WANT_MAX_KEY] = True
        if self._max_abs is None:
            if self._stamp is not None and self._stamp != _stamp(params.grads()):
                warnings.warn(
                    "max |g| of a gradient snapshot was first read after the gradients were changed in place "
                    "(clipped, unscaled) or replaced: it describes them as they are now. Later snapshots of "
                    "these parameters compute it with the norms; ask for it up front with "
                    "`take_snapshot(..., max_abs=True)` to get it right from the first step.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            inv = None if self.scale is None else self.scale.reciprocal()
            self._max_abs = tensor_max_abs(
                params.grads(),
                params.reduce_keys,
                device=self.norms.device,
                inv_scale=inv,
                cache=params.cache,
            )
        return self._max_abs

    @property
    def max_abs_known(self) -> bool:
        """Whether ``max_abs`` is computed already."""
        return self._max_abs is not None

    def grouped(self, grouping: Grouping) -> GroupedStats:
        """Aggregate per group with a few ``index_add`` (max |g| per group only when read)."""
        if len(grouping.index) != len(self.params):
            raise ValueError(
                f"`grouping` covers {len(grouping.index)} parameters but the snapshot has {len(self.params)}."
            )
        cached = self._cache.get(id(grouping))
        if cached is not None and cached.grouping is grouping:
            return cached
        g = len(grouping)
        index = grouping.index_tensor(self.norms.device)
        norms = reduce_norms(self.norms, index, g)

        def group_nonfinite() -> Tensor:  # on first read: most steps only ask whether all is finite
            bad = (~torch.isfinite(self.norms)).to(self.norms.dtype)
            return torch.zeros(g, dtype=self.norms.dtype, device=self.norms.device).index_add_(0, index, bad) > 0

        def group_max(values: Tensor | None = None) -> Tensor:
            values = self.max_abs if values is None else values
            return torch.zeros(g, dtype=torch.float32, device=self.norms.device).scatter_reduce_(
                0, index, values, reduce="amax", include_self=True
            )

        result = GroupedStats(
            grouping=grouping,
            norms=norms,
            max_abs=group_max(self._max_abs) if self._max_abs is not None else None,
            present=grouping.present(self.has_grad),
            nonfinite_of=group_nonfinite,
            max_abs_of=group_max,
            on_read=self._mark_wanted,
            totals=self,
        )
        self._cache[id(grouping)] = result
        return result

    @property
    def total_norm(self) -> Tensor:
        """L2 norm of all gradients, a 0-dim device tensor (computed once per snapshot)."""
        if self._total is None:
            self._totals()
        return self._total  # type: ignore[return-value]

    @property
    def all_finite(self) -> Tensor:
        """0-dim device bool: no NaN or Inf in any gradient (read from the norms; computed once per snapshot)."""
        if self._finite is None:
            self._totals()
        return self._finite  # type: ignore[return-value]

    def _totals(self) -> None:
        """The total norm and finiteness together: a float64 sum of squares is Inf/NaN exactly when a norm is."""
        if _on_host(self.norms):
            wide = self.norms.numpy().astype(np.float64)
            wide = np.sqrt(wide @ wide)
            self._total, self._finite = _host_saturated(wide), torch.from_numpy(np.asarray(wide < math.inf))
        elif _wide_sum(self.norms):
            wide = self.norms.double().square().sum().sqrt()
            self._total, self._finite = _saturate(wide, self.norms.dtype), wide < math.inf
        else:
            self._total, self._finite = total_norm(self.norms), torch.isfinite(self.norms).all()

    def __repr__(self) -> str:
        return f"GradSnapshot(tensors={len(self.params)}, norms={self.norms}, max_abs_known={self.max_abs_known})"


def _stamp(grads: Sequence[Tensor | None]) -> tuple[Any, ...]:
    """Which gradient tensors there are and their in-place version counters (C-level maps where none is missing)."""
    ids = tuple(map(id, grads))
    if _NONE_ID in ids:
        return ids, tuple([-1 if g is None else g._version for g in grads])
    return ids, tuple(map(_VERSION, grads))


_NONE_ID = id(None)
_VERSION = operator.attrgetter("_version")


def _distributed(group: Any = None) -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _agree(values: Tensor, group: Any) -> Tensor:
    """Per entry, the largest value over the ranks; NaN anywhere makes it NaN, an Inf Inf."""
    n = len(values)
    nan, inf = torch.isnan(values), torch.isinf(values)
    packed = torch.cat([torch.where(nan | inf, torch.zeros_like(values), values), nan.float(), inf.float()])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    out, any_nan, any_inf = packed[:n], packed[n : 2 * n], packed[2 * n :]
    out = torch.where(any_inf > 0, torch.full_like(out, math.inf), out)
    return torch.where(any_nan > 0, torch.full_like(out, math.nan), out)


def agree_across_ranks(snap: GradSnapshot, group: Any = None) -> GradSnapshot:
    """The same snapshot on every rank: per tensor, the largest norm and max |g| over the ranks.

    Data-parallel ranks hold equal gradients after their all-reduce, so this changes
    nothing on a healthy step; it makes every decision taken from the snapshot (clip,
    skip, stop, what enters a learned threshold) identical on every rank even when one
    rank's gradients differ (a NaN written by a hook after the all-reduce, a rank-local
    overflow). NaN and Inf travel as flags rather than through the MAX reduction (gloo's
    MAX drops NaN): a NaN on any rank makes the entry NaN everywhere, an Inf makes it
    Inf. One all-reduce of ``4 * len(params)`` floats (``2 *`` when the snapshot has no
    max |g|, which is then this rank's own when read); no host sync. Without an
    initialised process group, or with one rank, ``snap`` is returned as it is.
    """
    if not _distributed(group):
        return snap
    n = len(snap.params)
    known = snap._max_abs
    values = _agree(snap.norms if known is None else torch.cat([snap.norms, known]), group)
    return GradSnapshot(
        params=snap.params,
        norms=values[:n],
        max_abs=values[n:] if known is not None else None,
        has_grad=snap.has_grad,
        scale=snap.scale,
        stamp=snap._stamp,
    )


def take_snapshot(
    params: ParamSet, *, scale: Tensor | float | None = None, max_abs: bool | None = None
) -> GradSnapshot:
    """Per-tensor statistics of the current gradients of ``params``.

    Args:
        params: the parameters whose ``.grad`` to read.
        scale: a loss scale still applied to the gradients (fp16 ``GradScaler`` before
            ``unscale_``); the returned values are divided by it. ``None`` for unscaled
            gradients.
        max_abs: compute max |g| now (a second pass over the gradients). ``None``
            (default): for the first :data:`MAX_ABS_LEARNING` snapshots of ``params``,
            when an earlier snapshot of ``params`` was asked for it, and always
            in distributed runs (where computing it later would be a collective that
            every rank must join) or for sparse gradients (which clipping replaces);
            otherwise on first read (:attr:`GradSnapshot.max_abs`).

    Returns:
        A :class:`GradSnapshot`; no host synchronisation happened. Norms and finiteness
        take one read of every gradient (:func:`tensor_norms`).
    """
    grads = params.grads()
    has_grad = tuple(map(operator.is_not, grads, itertools.repeat(None)))
    device = next((g.device for g in grads if g is not None), None)
    scale_t: Tensor | None = None
    inv: Tensor | None = None
    if scale is not None:
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=device)
        inv = scale_t.reciprocal()
    want: bool | None = max_abs
    taken = params.cache.get(_TAKEN_KEY, 0)
    if taken < MAX_ABS_LEARNING:
        params.cache[_TAKEN_KEY] = taken + 1
    if want is None and (
        taken < MAX_ABS_LEARNING or params.cache.get(_WANT_MAX_KEY) or params.sharded or _distributed()
    ):
        want = True
    buckets = _stored_buckets(grads, params.reduce_keys, params.uniform_device)
    norms, mx = _per_tensor(
        grads, params.reduce_keys, device, inv, params.cache, norms=True, maxes=want, buckets=buckets
    )
    stamp = _stamp(grads) if mx is None else None
    snap = GradSnapshot(params=params, norms=norms, max_abs=mx, has_grad=has_grad, scale=scale_t, stamp=stamp)  # type: ignore[arg-type]
    if not params.sharded and all(key[-1] for key in buckets):  # dense buckets' layout, for a clipper (no tensor kept)
        snap._layout = (
            stamp[0] if stamp is not None else tuple(map(id, grads)),
            {k: i for k, (_, i) in buckets.items()},
        )
    return snap


def iter_group_tensors(params: ParamSet, grouping: Grouping, tensors: Iterable[Tensor | None]) -> list[list[Tensor]]:
    """Split per-parameter tensors into per-group lists (``None`` dropped)."""
    out: list[list[Tensor]] = [[] for _ in range(len(grouping))]
    for gi, t in zip(grouping.index, tensors):
        if t is not None:
            out[gi].append(t)
    return out


def zero_fractions(params: ParamSet, grouping: Grouping) -> Tensor:
    """Per group, the fraction of gradient elements that are exactly zero, on the device.

    One ``torch._foreach_norm(ord=0)`` (a count of non-zeros) per device/dtype bucket; no
    host sync. Groups without any gradient read 0. Local shards only for DTensors (the
    fraction of this rank's shard).
    """
    grads = params.grads()
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    nonzero = torch.zeros(len(grads), dtype=torch.float32, device=device)
    sizes = torch.zeros(len(grads), dtype=torch.float32, device=device)
    for key, (ts, idx) in _stored_buckets(grads).items():
        index, numel, _ = _bucket_index(params.cache, key, device, idx, ts)
        if not key[-1]:  # sparse: the elements not stored are zeros too
            numel = torch.tensor([float(local_tensor(grads[i]).numel()) for i in idx], device=device)
        nonzero.index_copy_(0, index, _norms(ts, 0.0).to(device))
        sizes.index_copy_(0, index, numel)
    gindex = grouping.index_tensor(device)
    g = len(grouping)
    group_nonzero = torch.zeros(g, device=device).index_add_(0, gindex, nonzero)
    group_size = torch.zeros(g, device=device).index_add_(0, gindex, sizes)
    return torch.where(group_size > 0, 1 - group_nonzero / group_size.clamp_min(1), torch.zeros_like(group_size))


# --------------------------------------------------------------------------------------
# Units: rows of Linear/Conv weights
# --------------------------------------------------------------------------------------

#: Modules whose weight's rows (dim 0) are output units. Transposed convolutions keep
#: their output channels in dim 1 and are not watched.
_UNIT_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True, eq=False)
class UnitLayout:
    """The weights whose rows are units (a Linear's output features, a Conv's output channels).

    Only parameters named ``<module>.weight`` of an ``nn.Linear`` or a (non-transposed)
    ``nn.Conv*d`` count: embeddings (rows are tokens, sparse by design), normalisation
    and RNN weights do not, nor do weights pruned with ``torch.nn.utils.prune`` (their
    parameter is ``weight_orig``, the mask a buffer), nor sharded DTensor weights.

    A unit's activity is read from its bias gradient where the layer has a bias in the
    set: ``bias.grad[i] = sum over the batch (and positions) of unit i's output gradient``,
    and so is ``weight.grad[i]`` times the inputs. When the output gradient is zero on every
    sample (a dead ReLU) both are exactly zero; an exactly-zero sum of non-zero terms
    almost never happens, and never ``dead_patience`` steps in a row. The bias holds one
    number per unit where the weight row holds ``fan_in`` (0.9% of the reference
    transformer's watched elements), so every such unit is looked at every step in one
    small read. Layers without a bias read their weight rows (``count_nonzero``), in turns
    (:data:`UNIT_WEIGHTS_PER_STEP`). The weights with a bias come first.

    Attributes:
        positions: the watched weights' positions in the :class:`ParamSet`.
        rows: the number of units of each.
        biases: the position of each one's bias in the set, ``None`` for the weights read by rows.
    """

    positions: tuple[int, ...]
    rows: tuple[int, ...]
    biases: tuple[int | None, ...] = ()
    _device_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, params: ParamSet, module: nn.Module | None) -> UnitLayout:
        """The layout of ``params`` (named after ``module``), built once per parameter set and module."""
        key = ("units", id(module))
        cached = params.cache.get(key)
        if cached is not None:
            return cached
        found: list[tuple[int, int, int | None]] = []
        if module is not None:
            kinds = {name: m for name, m in module.named_modules() if isinstance(m, _UNIT_MODULES)}
            where = {name: i for i, name in enumerate(params.names)}
            for i, (name, p) in enumerate(zip(params.names, params.params)):
                owner, _, leaf = name.rpartition(".")
                m = kinds.get(owner)
                if (
                    leaf == "weight"
                    and m is not None
                    and not getattr(m, "transposed", False)
                    and p.dim() >= 2
                    and p.shape[0] > 1
                    and not params.reduce_keys[i]
                    and type(p) in (Tensor, nn.Parameter)
                ):
                    b = where.get(f"{owner}.bias" if owner else "bias")
                    if b is not None:
                        bias = params.params[b]
                        if params.reduce_keys[b] or type(bias) not in (Tensor, nn.Parameter):
                            b = None
                        elif bias.shape != (p.shape[0],):
                            b = None
                    found.append((i, int(p.shape[0]), b))
        found.sort(key=lambda f: f[2] is None)  # stable: the weights with a bias first
        layout = params.cache[key] = cls(
            tuple(f[0] for f in found), tuple(f[1] for f in found), tuple(f[2] for f in found)
        )
        return layout

    def __len__(self) -> int:
        return sum(self.rows)

    @cached_property
    def num_biased(self) -> int:
        """How many watched weights (the first ones) are read from their bias."""
        return sum(b is not None for b in self.biases)

    def row_groups(self, grouping: Grouping, device: torch.device) -> Tensor:
        """Per unit, the position of its layer in ``grouping`` (long, built once per grouping and device)."""
        key = ("groups", id(grouping), device)
        cached = self._device_cache.get(key)
        if cached is None or cached[0] is not grouping:
            index = [grouping.index[p] for p, r in zip(self.positions, self.rows) for _ in range(r)]
            cached = self._device_cache[key] = (grouping, torch.tensor(index, dtype=torch.long, device=device))
        return cached[1]

    def per_group(self, grouping: Grouping) -> tuple[int, ...]:
        """Per group of ``grouping``, its number of watched units (built once per grouping)."""
        key = ("per_group", id(grouping))
        cached = self._device_cache.get(key)
        if cached is None or cached[0] is not grouping:
            counts = [0] * len(grouping)
            for p, r in zip(self.positions, self.rows):
                counts[grouping.index[p]] += r
            cached = self._device_cache[key] = (grouping, tuple(counts))
        return cached[1]

    def row_weights(self, device: torch.device, weights: Sequence[int]) -> Tensor:
        """Per unit of ``weights`` (layout positions), the position of its weight among them (long, built once)."""
        weights = tuple(weights)
        key = ("weights", device, weights)
        t = self._device_cache.get(key)
        if t is None:
            index = [k for k, w in enumerate(weights) for _ in range(self.rows[w])]
            t = self._device_cache[key] = torch.tensor(index, dtype=torch.long, device=device)
        return t

    def units_of(self, device: torch.device, weights: Sequence[int]) -> Tensor:
        """The positions, among all units, of the units of ``weights`` (long, built once)."""
        weights = tuple(weights)
        key = ("units", device, weights)
        t = self._device_cache.get(key)
        if t is None:
            starts = [0]
            for r in self.rows:
                starts.append(starts[-1] + r)
            index = [u for w in weights for u in range(starts[w], starts[w + 1])]
            t = self._device_cache[key] = torch.tensor(index, dtype=torch.long, device=device)
        return t


def _row_activity(grad: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """Per row of a weight gradient, whether it holds a non-zero element (all ``False`` without a gradient)."""
    if grad is None or grad.layout is not torch.strided:
        return torch.zeros(rows, dtype=torch.bool, device=device)
    return torch.count_nonzero(grad.reshape(rows, -1), dim=1).to(device) > 0


def unit_activity(
    params: ParamSet, layout: UnitLayout, device: torch.device, weights: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Per unit, whether its gradient is exactly zero, and whether it is non-zero, on the device.

    A unit's gradient is its bias entry where :class:`UnitLayout` found a bias (one read of
    all of them when each has a gradient), else its weight row (one ``count_nonzero`` per
    weight). A unit counts as zero only while its layer's gradient is non-zero elsewhere:
    a layer without a gradient (frozen, unused this step) or whose whole gradient is zero
    (an unused head) tells nothing about its units, and both flags are ``False`` for them.
    No host sync.

    Args:
        params: the parameter set.
        layout: its watched weights.
        device: where the flags live.
        weights: which of the watched weights to look at (positions in ``layout``); all by default.

    Returns:
        ``(zero, nonzero)``: two bool vectors, one entry per unit of the weights looked at.
    """
    weights = tuple(range(len(layout.rows)) if weights is None else weights)
    if not weights:
        empty = torch.zeros(0, dtype=torch.bool, device=device)
        return empty, empty
    grads = params.params
    key = ("bias params", weights)
    cached = layout._device_cache.get(key)
    if cached is None:  # the leading weights that have a bias (UnitLayout puts them first), and their biases
        lead = next((n for n, k in enumerate(weights) if layout.biases[k] is None), len(weights))
        cached = layout._device_cache[key] = (lead, [grads[layout.biases[k]] for k in weights[:lead]])  # type: ignore[index]
    lead, bias_params = cached
    flags: list[Tensor] = []
    if lead:
        biased = list(map(_GRAD, bias_params))  # C-level maps: one read of all their gradients
        if set(map(type, biased)) == _PLAIN and set(map(_LAYOUT, biased)) == _STRIDED:
            if set(map(_DEVICE, biased)) == {device}:
                flags.append(torch.cat(biased).ne(0))
        if not flags:
            flags = [_unit_activity_of(params, layout, k, device) for k in weights[:lead]]
    flags += [_unit_activity_of(params, layout, k, device) for k in weights[lead:]]
    return _zero_and_nonzero(layout, device, weights, torch.cat(flags))


def _unit_activity_of(params: ParamSet, layout: UnitLayout, k: int, device: torch.device) -> Tensor:
    """Per unit of watched weight ``k``: non-zero bias gradient, or (no bias, or none with a gradient) weight row."""
    b = layout.biases[k]
    bias_grad = params.params[b].grad if b is not None else None
    if bias_grad is not None and bias_grad.layout is torch.strided:
        return bias_grad.ne(0).to(device)
    return _row_activity(params.params[layout.positions[k]].grad, layout.rows[k], device)


def _zero_and_nonzero(
    layout: UnitLayout, device: torch.device, weights: tuple[int, ...], nonzero: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`unit_activity`'s flags from the per-unit non-zero flags of ``weights``."""
    which = layout.row_weights(device, weights)
    if _arrays.ops_for(device) is _arrays.HOST:  # numpy on views: a few calls at a fraction of a torch dispatch each
        rows, flags = which.numpy(), nonzero.numpy()
        alive = np.bincount(rows, weights=flags, minlength=len(weights)) > 0
        return torch.from_numpy(~flags & alive[rows]), nonzero
    alive = torch.zeros(len(weights), dtype=torch.bool, device=device).scatter_reduce_(
        0, which, nonzero, reduce="amax", include_self=True
    )
    # index_select, not alive[which]: advanced indexing of a few thousand elements goes parallel on CPU
    return ~nonzero & alive.index_select(0, which), nonzero


#: Watched weights without a bias whose rows are read per step. Models with more of them are
#: looked at in turns (those weights ``[k*W, (k+1)*W)`` at step ``k`` modulo the number of
#: turns), which keeps the per-step cost at ~16 small reductions (~0.2 ms on a CPU for
#: weights of the reference model's size). Weights with a bias are read every step.
UNIT_WEIGHTS_PER_STEP = 16


@dataclass(frozen=True, eq=False)
class UnitStats:
    """One step's unit activity (:func:`unit_activity`): every unit with a bias, one turn of the others.

    Attributes:
        zero: per unit looked at, its gradient is exactly zero while its layer's is not (device bool).
        nonzero: per unit looked at, its gradient is non-zero (device bool).
        looked: the positions, among all watched units, of the units looked at (device long).
        every: per unit looked at, how many steps apart it is looked at (1, or the number of turns).
        every_all: the same for every watched unit (device float).
        group: per watched unit (all of them), the position of its layer in the grouping (device long).
        per_group: per layer, its number of watched units (host).
    """

    zero: Tensor
    nonzero: Tensor
    looked: Tensor
    every: Tensor
    every_all: Tensor
    group: Tensor
    per_group: tuple[int, ...]

    @property
    def num_units(self) -> int:
        return len(self.group)

    @classmethod
    def take(
        cls, params: ParamSet, grouping: Grouping, module: nn.Module | None, device: torch.device, step: int = 0
    ) -> UnitStats:
        """The units of ``params`` (named after ``module``) at ``step``, grouped as ``grouping``.

        Looks at every weight with a bias and at the turn ``step % turns`` of the others
        (all of them when there are at most :data:`UNIT_WEIGHTS_PER_STEP`).
        """
        layout = UnitLayout.of(params, module)
        n, biased = len(layout.rows), layout.num_biased
        turns = max(1, math.ceil((n - biased) / UNIT_WEIGHTS_PER_STEP))
        start = biased + (step % turns) * UNIT_WEIGHTS_PER_STEP
        weights = (*range(biased), *range(start, min(n, start + UNIT_WEIGHTS_PER_STEP)))
        zero, nonzero = unit_activity(params, layout, device, weights)
        key = ("every", device, weights)
        cached = layout._device_cache.get(key)
        if cached is None:
            every_all = torch.tensor(
                [1.0 if k < biased else float(turns) for k, r in enumerate(layout.rows) for _ in range(r)],
                device=device,
            )
            looked = layout.units_of(device, weights)
            cached = layout._device_cache[key] = (looked, every_all[looked], every_all)
        looked, every, every_all = cached
        return cls(
            zero,
            nonzero,
            looked,
            every,
            every_all,
            layout.row_groups(grouping, device),
            layout.per_group(grouping),
        )
