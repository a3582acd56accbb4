"""The alarm's reading, read on the host one optimizer step late (``defer_host_read``).

Why: ``VanishExplodeAlarm`` copies a small reading to the host at every optimizer step.
On a GPU that copy makes the CPU wait in ``on_before_optimizer_step`` until the device has
finished the step's backward pass, so the CPU cannot queue the next kernels meanwhile:
the device idles at every step for as long as the CPU needs to catch up.

How: the one decision that must take effect at the step itself, whether to skip it, is
taken on the device (:meth:`DeferredReadings.skip`) and handed to a fused optimizer as its
``found_inf`` (:mod:`~lightning_gradguard.callbacks._device_skip`), which then leaves the
weights and every optimizer state exactly as they were. The reading itself leaves with a
non-blocking copy (into pinned memory, behind a CUDA event; :meth:`DeferredReadings.hold`),
and the host's share (counters, findings, warnings, crash dump, stop or raise, logging)
runs at the next ``on_before_optimizer_step``, before the new step is read
(:meth:`DeferredReadings.take`), when the copy has long arrived. A latch on the device
keeps every later step skipped once a stop- or raise-level kind fired, so no update
reaches the weights before the host has learnt of it.

The detector's own state never leaves the device, so its findings do not change: they
are the immediate mode's, one step later, and carry the step they happened at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradguard.callbacks._device_skip import accepts_device_skip, skip_on_device
from lightning_gradguard.diagnosis import DeviceReading, Reading
from lightning_gradguard.stats import GroupedStats

#: ``defer_host_read``: always (where a fused optimizer can skip a step from the device), never,
#: or where it pays: gradients on a CUDA device.
DeferMode = Literal[True, False, "auto"]

T = TypeVar("T")


class DeferredReadings(Generic[T]):
    """One step's reading held for the next hook, and the device-side skip that cannot wait.

    Args:
        mode: ``defer_host_read``, checked (``True``, ``False`` or ``"auto"``).
        actions: the alarm's action per kind (``warn``, ``skip``, ``stop``, ``raise``; a
            ``nonfinite`` one is never ``warn``). The step of a kind that skips, stops or
            raises is skipped; once a kind that stops or raises fired, the latch skips every
            later step until the host halts training.
        crash_dump: the alarm writes a crash dump on a stop or a raise.

    Example:
        >>> import torch
        >>> from lightning_gradguard.diagnosis import HealthDetector
        >>> from lightning_gradguard.stats import Grouping, ParamSet, take_snapshot
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> params = ParamSet.from_module(net)
        >>> reading = HealthDetector().update(take_snapshot(params).grouped(Grouping.build(params)))
        >>> held = DeferredReadings(True, {"nonfinite": "stop", "exploding": "warn"})
        >>> held.hold(reading, lambda host: host.nonfinite)
        >>> held.take(), held.take()
        (False, None)
    """

    def __init__(self, mode: bool | str, actions: Mapping[str, str], *, crash_dump: bool = False) -> None:
        self.mode = mode
        self.skip_kinds = tuple(k for k, a in actions.items() if a in ("skip", "stop", "raise"))
        self.halt_kinds = tuple(k for k, a in actions.items() if a in ("stop", "raise"))
        # a crash dump written one step late needs max |g| of its own step, not of the gradients by then
        self.max_abs_now = crash_dump and bool(self.halt_kinds)
        self._latch: Tensor | None = None
        self._pending: tuple[Tensor, Tensor, Any, Callable[[Reading], T]] | None = None

    def applies(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
        """Whether this step's host read is deferred: asked for (``True``, or ``"auto"`` on CUDA) and possible.

        Possible only where ``optimizer`` can skip its step from a device flag
        (:func:`~lightning_gradguard.callbacks._device_skip.accepts_device_skip`: a fused
        optimizer, no fp16 ``GradScaler``); elsewhere the alarm reads at once, as without
        deferring. On the CPU deferring gains nothing (the values are ready when read), so
        ``"auto"`` does not defer there.
        """
        if self.mode is False or (self.mode == "auto" and device.type != "cuda"):
            return False
        return accepts_device_skip(trainer, optimizer)

    def defer(
        self,
        optimizer: torch.optim.Optimizer,
        reading: DeviceReading,
        build: Callable[[Reading], T],
        stats: GroupedStats,
    ) -> None:
        """Skip the step on the device as its flags say (:meth:`skip`) and hold its reading (:meth:`hold`).

        Where a crash dump may follow, max |g| of ``stats`` is computed now, on the device
        (the dump is written a step late, when the gradients are the next step's).
        """
        if self.max_abs_now:
            _ = stats.max_abs
        self.skip(optimizer, reading)
        self.hold(reading, build)

    def skip(self, optimizer: torch.optim.Optimizer, reading: DeviceReading) -> None:
        """Skip ``optimizer``'s coming step on the device when a skip kind's flag or the latch is up; no host read."""
        device = reading.nonfinite.device
        latch = self._latch.to(device) if self._latch is not None else torch.zeros((), dtype=torch.bool, device=device)
        for kind in self.halt_kinds:
            latch = latch | getattr(reading, kind)
        flag = latch
        for kind in self.skip_kinds:
            flag = flag | getattr(reading, kind)
        self._latch = latch
        skip_on_device(optimizer, flag)

    def hold(self, reading: DeviceReading, build: Callable[[Reading], T]) -> None:
        """Start the non-blocking copy of ``reading``; :meth:`take` returns ``build(host reading)``.

        At most one reading is held: the caller takes the previous one first.
        """
        if self._pending is not None:
            raise RuntimeError("a deferred reading is still held: take() it before holding the next one")
        values = reading.stacked()  # what DeviceReading.to_host copies
        event = None
        host = values
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(values.device))
        self._pending = (values, host, event, build)

    def take(self) -> T | None:
        """The held step, built with its host reading (waiting for its copy only), or ``None``."""
        if self._pending is None:
            return None
        _, host, event, build = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # the copy recorded at the held step, not the work queued since
        return build(Reading.of(host.tolist()))

    @property
    def pending_buffer(self) -> Tensor | None:
        """The host buffer of the held reading (the only tensor :meth:`take` reads), if one is held."""
        return self._pending[1] if self._pending is not None else None

    def reset(self) -> None:
        """Forget the held reading and the latch (a new fit, a restored checkpoint)."""
        self._pending = None
        self._latch = None
