"""How often each callback stops the device: host reads per optimizer step, measured in real fits.

Each row of :data:`ROWS` is one configuration and the number of host reads (device-to-host
copies: ``.item()``, ``bool()``, ``.tolist()``, ...) its callback makes per step, on steps
that log and on steps that do not, summed over the callback's per-step hooks. The table is
the documentation: ``python tests/test_syncs.py OUT.md`` writes it as markdown (the
README's table comes from there).

The reads are counted on the CPU by :class:`~test_clipping.HostSyncCounter` plus a
patched ``Tensor.tolist`` (which copies without dispatching an op), as in
``test_adaptive_clipper.Probe``. A copy with ``.cpu()`` is a no-op on the CPU and is not
seen here (only the logger's optional histograms make one, on logging steps). The runs
are healthy: a step with a flag up may cost the alarm more. The running statistics are
computed in torch, as on a device (on the CPU they run in numpy on views of the same
memory, see :mod:`lightning_gradguard._arrays`, which reads nothing from a device).
"""

from __future__ import annotations

import functools
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordingMLP, fp16_cpu_plugin, loader, make_trainer
from test_clipping import HostSyncCounter

from lightning_gradguard import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm, _arrays
from lightning_gradguard.callbacks._base import GradGuardCallback

#: the hooks Lightning calls on every training batch, in order
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
)
STEPS = 8
LOG_EVERY = 4  # the Trainer's log_every_n_steps: steps 3 and 7 log


@dataclass(frozen=True)
class Row:
    """One configuration and its host reads per step (``None``: it has no such step)."""

    config: str
    make: Callable[[], GradGuardCallback]
    non_log: int | None
    log: int
    optimizer: str = "SGD"  # "SGD", "AdamW" or "AdamW(fused=True)"
    fp16: bool = False  # fp16 AMP with a GradScaler (on the CPU)
    note: str = ""  # what the reads are
    first: int | None = None  # reads at the first step, where they differ from the others


ROWS = [
    Row("GradientNormLogger()", GradientNormLogger, 0, 1, note="the logged norms, one copy"),
    Row("GradientNormLogger(log_every_n_steps=1)", lambda: GradientNormLogger(log_every_n_steps=1), None, 1),
    Row(
        "VanishExplodeAlarm()",
        VanishExplodeAlarm,
        1,
        1,
        note="the reading (flags, norms, the numbers a finding quotes), one copy",
    ),
    Row(
        "VanishExplodeAlarm(defer_host_read=True)",
        lambda: VanishExplodeAlarm(defer_host_read=True),
        1,
        1,
        optimizer="AdamW(fused=True)",
        first=0,
        note="the previous step's reading, copied asynchronously a step earlier (none at the first step); "
        "the skip on the device",
    ),
    Row("AdaptiveClipper()", AdaptiveClipper, 0, 1, note="zscore, no skip_factor: the logged values, one copy"),
    Row(
        "AdaptiveClipper(skip_factor=5.0)",
        lambda: AdaptiveClipper(skip_factor=5.0),
        1,
        2,
        optimizer="AdamW",
        note="the skip verdict, one bool per step (all ranks agree through the strategy)",
    ),
    Row(
        "AdaptiveClipper(skip_factor=5.0)",
        lambda: AdaptiveClipper(skip_factor=5.0),
        0,
        1,
        optimizer="AdamW(fused=True)",
        note="the skip decided on the device (`found_inf`, all-reduce across ranks)",
    ),
    Row("AmpUnscaleCheck()", AmpUnscaleCheck, 0, 1, fp16=True, note="loss scale and overflow counts, one copy"),
]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "AdamW": torch.optim.AdamW,
    "AdamW(fused=True)": functools.partial(torch.optim.AdamW, fused=True),
}


@dataclass
class Measured:
    """Host reads per step of one run: totals on non-logging and logging steps, and the hooks that read."""

    non_log: set[int]
    log: set[int]
    hooks: set[str]
    first: int


class SyncTally:
    """Counts the host reads inside every per-step hook a callback overrides, per training batch."""

    def __init__(self, callback: GradGuardCallback) -> None:
        self.callback = callback
        self.batch = -1
        self.log_batches: set[int] = set()
        self.reads: dict[int, Counter[str]] = defaultdict(Counter)
        for name in PER_STEP_HOOKS:
            if name == "on_train_batch_start" or getattr(type(callback), name) is not getattr(pl.Callback, name):
                setattr(callback, name, self._counted(name, getattr(callback, name)))

    def _counted(self, name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def counted(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
            if name == "on_train_batch_start":
                self.batch += 1
                cb = self.callback
                if cb.is_log_step(trainer, cb.log_step(trainer)):
                    self.log_batches.add(self.batch)
            calls: list[int] = []
            original = torch.Tensor.tolist

            def counting_tolist(t: torch.Tensor) -> Any:
                calls.append(1)
                return original(t)

            torch.Tensor.tolist = counting_tolist  # type: ignore[method-assign]
            try:
                with HostSyncCounter() as counter:
                    return hook(trainer, *args, **kwargs)
            finally:
                torch.Tensor.tolist = original  # type: ignore[method-assign]
                self.reads[self.batch][name] += len(counter.syncs) + len(calls)

        return counted

    def result(self, skip_first: bool = False) -> Measured:
        totals = {batch: sum(self.reads[batch].values()) for batch in range(self.batch + 1)}
        first = totals.pop(0) if skip_first else totals[0]
        return Measured(
            non_log={n for b, n in totals.items() if b not in self.log_batches},
            log={n for b, n in totals.items() if b in self.log_batches},
            hooks={hook for counts in self.reads.values() for hook, n in counts.items() if n},
            first=first,
        )


def measure(row: Row, root: Path) -> Measured:
    """One short fit of ``row``'s configuration; the host reads its callback made per step."""
    callback = row.make()
    tally = SyncTally(callback)
    model = RecordingMLP(optimizer_cls=OPTIMIZERS[row.optimizer], lr=0.01)
    plugins = [fp16_cpu_plugin()] if row.fp16 else []
    trainer = make_trainer(root, [callback], max_steps=STEPS, log_every_n_steps=LOG_EVERY, plugins=plugins)
    with _arrays.forced(_arrays.DEVICE):  # what a device would run
        trainer.fit(model, loader())
    assert tally.batch == STEPS - 1
    return tally.result(skip_first=row.first is not None)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.config} {r.optimizer}{' fp16' if r.fp16 else ''}" for r in ROWS])
def test_host_reads_per_step(tmp_path, row):
    got = measure(row, tmp_path)
    if row.first is not None:
        assert got.first == row.first, f"{row.config}: the first step"
    assert got.non_log == (set() if row.non_log is None else {row.non_log}), f"{row.config}: non-logging steps"
    assert got.log == {row.log}, f"{row.config}: logging steps"


def markdown(rows: list[Row], measured: list[Measured]) -> str:
    """The table of host reads per step, from measurements (one line per row)."""
    lines = [
        "| configuration | optimizer | host reads per step, not logging | logging | in | what |",
        "|---|---|---|---|---|---|",
    ]
    for row, got in zip(rows, measured):
        config = f"`{row.config}`" + (" (fp16 AMP)" if row.fp16 else "")
        non_log = "/".join(map(str, sorted(got.non_log))) or "(every step logs)"
        log = "/".join(map(str, sorted(got.log)))
        where = ", ".join(f"`{h}`" for h in PER_STEP_HOOKS if h in got.hooks) or "-"
        lines.append(f"| {config} | `{row.optimizer}` | {non_log} | {log} | {where} | {row.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        table = markdown(ROWS, [measure(row, Path(root) / str(i)) for i, row in enumerate(ROWS)])
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(table)
    print(table)
