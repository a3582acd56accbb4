"""One namespace of small array operations, backed by torch on an accelerator and by numpy on the CPU.

The detector's and the clipper's running statistics are a few dozen scalars and short
vectors updated every step. On an accelerator they stay in torch, on the device, so
that no step waits for the host. On the CPU there is no device to wait for, and each
torch operation on a 0-dim tensor costs 1-3 µs of dispatch, where numpy scalar
arithmetic on the same values costs tens of nanoseconds and a small-array operation
well under a microsecond: with about 150 such operations a step, the dispatch was most
of the callbacks' own time on small models.

The rules are written once, against :class:`Ops`. Python operators (``+ - * / % < & |
~``) work on both kinds of value; what differs (``where``, ``log``, a NaN-ignoring
median, index reads and writes, writes under a flag) is here. Both backends compute in
float32, the state's type (numpy >= 2 keeps ``np.float32 * 2.5`` float32), so a rule
gives the same flags on either; the numbers may differ in the last bit (torch's CPU
``sqrt`` is not always correctly rounded, numpy's is).

The state stays in tensors either way (checkpoints, accessors and devices see tensors):
:class:`InPlace` lets numpy write into their memory.

The backend follows the data: :func:`ops_for` gives numpy for CPU tensors and torch
otherwise; :func:`forced` overrides it, for tests that run the rules under both and for
those that count host reads as a device would make them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEVICE", "HOST", "InPlace", "Ops", "forced", "ops_for"]


class Ops:
    """The torch backend: every operation a torch call, nothing leaves the device."""

    name = "torch"
    where = staticmethod(torch.where)
    log = staticmethod(torch.log)
    exp = staticmethod(torch.exp)
    sqrt = staticmethod(torch.sqrt)
    isnan = staticmethod(torch.isnan)
    isfinite = staticmethod(torch.isfinite)
    minimum = staticmethod(torch.minimum)

    @staticmethod
    def clamp_min(x: Any, low: float) -> Any:
        return x.clamp_min(low)

    @staticmethod
    def clamp_max(x: Any, high: float) -> Any:
        return x.clamp_max(high)

    @staticmethod
    def array(t: Tensor) -> Any:
        """A tensor as this backend's value (torch: the tensor itself)."""
        return t

    @staticmethod
    def as_tensor(x: Any, dtype: torch.dtype) -> Tensor:
        """A 0-dim value of this backend as a 0-dim tensor of ``dtype`` (torch: itself)."""
        return x

    @staticmethod
    def constant(values: Sequence[Any] | float, dtype: torch.dtype, device: torch.device) -> Any:
        """A new value of ``values`` (made once and cached by callers: on a device it is a copy)."""
        return torch.tensor(values, dtype=dtype, device=device)

    @staticmethod
    def f32(x: Any) -> Any:
        """``x`` (flags, counts) as float32."""
        return x.float()

    @staticmethod
    def slot(count: Any, size: int) -> Any:
        """The ring position ``count % size`` (a float count; torch: a 1-element device index)."""
        return (count % size).long().reshape(1)

    @staticmethod
    def write_row(state: Any, name: str, slot: Any, row: Any, when: Any) -> None:
        """Where ``when``, put ``row`` at ``slot`` of the state's array ``name`` (its first axis)."""
        ring = getattr(state, name)
        setattr(state, name, torch.where(when, ring.index_copy(0, slot, row.unsqueeze(0)), ring))

    @staticmethod
    def write_at(state: Any, name: str, positions: Any, values: Any, when: Any) -> None:
        """Where ``when``, put ``values`` at ``positions`` of the state's vector ``name``."""
        vector = getattr(state, name)
        setattr(state, name, torch.where(when, vector.index_copy(0, positions, values), vector))

    @staticmethod
    def take(x: Any, positions: Any) -> Any:
        """The elements of ``x`` at ``positions`` (a new array; a device index, no host read)."""
        return x.index_select(0, positions)

    @staticmethod
    def row(x: Any, position: Any) -> Any:
        """Row ``position`` of ``x``; a device position is not read on the host."""
        return x.index_select(0, position.reshape(1))[0]

    @staticmethod
    def argmin(x: Any) -> tuple[Any, Any]:
        """``(smallest, its position)`` of a vector; the position stays on the device."""
        return x.min(0)

    @staticmethod
    def nanmedian(x: Any) -> Any:
        """The median of the non-NaN values, the lower one of an even count (NaN if none): torch's rule."""
        return x.nanmedian()

    @staticmethod
    def add_at(positions: Any, values: Any, size: int) -> Any:
        """A float32 vector of ``size`` holding the sum of ``values`` at each of ``positions``."""
        return torch.zeros(size, dtype=torch.float32, device=positions.device).index_add_(0, positions, values)

    @staticmethod
    def quiet() -> Any:
        """A context where invalid arithmetic (``inf - inf``) gives NaN silently: torch never warns."""
        return nullcontext()


def _scalar_math(
    vector: Callable[[Any], Any], scalar: Callable[[float], float], outside: Callable[[float], float]
) -> staticmethod:
    """``vector`` for arrays, ``scalar`` (from :mod:`math`) for scalars, ``outside(x)`` where ``scalar`` raises."""

    def apply(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return vector(x)
        try:
            return _like(x, scalar(x))  # float32 in, float32 out
        except (ValueError, OverflowError):
            return _like(x, outside(x))

    return staticmethod(apply)


class _Numpy(Ops):
    """The host backend, for CPU tensors: the same rules on numpy views of the same memory.

    A 0-dim tensor is read as a numpy scalar (``np.float32``, ``np.bool_``) and its
    arithmetic stays in numpy's scalar fast path (tens of nanoseconds, float32);
    ``log``/``exp``/``sqrt`` of a scalar use :mod:`math` (float64, narrowed back to
    float32 by the next operation with the state) and ``where`` with a scalar condition
    picks one side in Python. Writes under a scalar condition happen in place, or not at
    all. Flags stay ``np.bool_``, never Python ``bool``, so ``~`` negates them.
    """

    name = "numpy"
    log = _scalar_math(np.log, math.log, lambda x: -math.inf if x == 0 else math.nan)
    exp = _scalar_math(np.exp, math.exp, lambda x: math.inf)
    sqrt = _scalar_math(np.sqrt, math.sqrt, lambda x: math.nan)
    isnan = staticmethod(np.isnan)
    isfinite = staticmethod(np.isfinite)  # np.bool_ for a scalar too: never a Python bool

    @staticmethod
    def where(condition: Any, a: Any, b: Any) -> Any:
        if isinstance(condition, np.ndarray):
            return np.where(condition, a, b)
        return a if condition else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.minimum(a, b)
        return a if a <= b or a != a else b  # NaN wins, as in torch

    @staticmethod
    def clamp_min(x: Any, low: float) -> Any:
        if isinstance(x, np.ndarray):
            return np.maximum(x, low)
        return x if x >= low or x != x else _like(x, low)

    @staticmethod
    def clamp_max(x: Any, high: float) -> Any:
        if isinstance(x, np.ndarray):
            return np.minimum(x, high)
        return x if x <= high or x != x else _like(x, high)

    @staticmethod
    def array(t: Tensor) -> Any:
        view = t.numpy()
        return view[()] if not view.ndim else view

    @staticmethod
    def as_tensor(x: Any, dtype: torch.dtype) -> Tensor:
        return torch.tensor(x, dtype=dtype)

    @staticmethod
    def constant(values: Sequence[Any] | float, dtype: torch.dtype, device: torch.device) -> Any:
        return _Numpy.array(torch.tensor(values, dtype=dtype))

    @staticmethod
    def f32(x: Any) -> Any:
        return x.astype(np.float32)

    @staticmethod
    def slot(count: Any, size: int) -> Any:
        return int(count) % size

    @staticmethod
    def write_row(state: Any, name: str, slot: Any, row: Any, when: Any) -> None:
        if when:
            getattr(state, name)[slot] = row

    @staticmethod
    def write_at(state: Any, name: str, positions: Any, values: Any, when: Any) -> None:
        if when:
            getattr(state, name)[positions] = values

    @staticmethod
    def take(x: Any, positions: Any) -> Any:
        return x[positions]

    @staticmethod
    def row(x: Any, position: Any) -> Any:
        return x[position]

    @staticmethod
    def argmin(x: Any) -> tuple[Any, Any]:
        at = x.argmin()
        return x[at], at

    @staticmethod
    def nanmedian(x: Any) -> Any:
        values = np.sort(x)  # NaN sorts last
        count = len(values) if values[-1] == values[-1] else int((values == values).sum())
        return values[(count - 1) // 2] if count else np.float32(math.nan)

    @staticmethod
    def add_at(positions: Any, values: Any, size: int) -> Any:
        return np.bincount(positions, weights=values, minlength=size).astype(np.float32)

    @staticmethod
    def quiet() -> Any:
        return np.errstate(all="ignore")


def _like(x: Any, value: float) -> Any:
    """``value`` in the type of the numpy scalar ``x`` (float32 stays float32), or as it is."""
    return x.dtype.type(value) if isinstance(x, np.generic) else value


#: the backend of device tensors, and of CPU tensors
DEVICE: Ops = Ops()
HOST: Ops = _Numpy()


_forced: Ops | None = None  # set by forced(), for tests


def ops_for(device: torch.device) -> Ops:
    """The backend for statistics on ``device``: numpy on the CPU, torch elsewhere."""
    if _forced is not None:
        return _forced
    return HOST if device.type == "cpu" else DEVICE


class InPlace:
    """Named tensors as ``ops`` computes with them: assigning a name writes into its tensor.

    What lets rules update a state object's tensors in place (checkpoints, accessors,
    references held elsewhere keep seeing the same tensors) under either backend:
    ``view.mean = x`` copies ``x`` into the tensor ``mean``. Under numpy a 0-dim tensor
    reads as a numpy scalar (a copy) and a vector as a view of its memory; under torch
    reading gives the tensor and assigning is ``copy_``.

    Example:
        >>> t = torch.zeros(2)
        >>> view = InPlace({"t": t})
        >>> view.t = view.t + 1.5
        >>> t
        tensor([1.5000, 1.5000])
    """

    __slots__ = ("_scalars", "_views")

    def __init__(self, tensors: Mapping[str, Tensor], ops: Ops | None = None) -> None:
        on_host = (ops or HOST) is not DEVICE
        views = {name: t.numpy() if on_host else t for name, t in tensors.items()}
        object.__setattr__(self, "_views", views)
        object.__setattr__(self, "_scalars", {name for name, v in views.items() if on_host and not v.ndim})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (a copy being made): no lookup through _views
            raise AttributeError(name)
        try:
            view = self._views[name]
        except KeyError:
            raise AttributeError(name) from None
        return view[()] if name in self._scalars else view

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):  # its own slots (a copy being made)
            object.__setattr__(self, name, value)
            return
        view = self._views[name]
        if isinstance(view, Tensor):
            view.copy_(value)
        else:
            view[...] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)


@contextmanager
def forced(ops: Ops) -> Iterator[None]:
    """Within the block, every device uses ``ops`` (for tests that run the rules under both backends)."""
    global _forced
    before, _forced = _forced, ops
    try:
        yield
    finally:
        _forced = before
