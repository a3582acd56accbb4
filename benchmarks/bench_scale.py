"""Per-step hook time of gradguard as the number of gradient tensors grows.

The model is made of ``tensors / 2`` independent ``nn.Linear(16, 16)`` layers whose outputs
are summed (so nothing vanishes with depth), trained with AdamW on random data: with
layers this small the per-tensor overhead dominates, which is what grows with model size
in tensor count. The conditions:

* ``clip_grad_norm``: a callback calling ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` in
  ``on_before_optimizer_step`` (what ``gradient_clip_val=1.0`` runs); the baseline.
* ``defaults``: ``GradientNormLogger()``, ``VanishExplodeAlarm()``, ``AdaptiveClipper()`` and
  ``AmpUnscaleCheck()`` at their defaults (``Trainer(log_every_n_steps=50)``).
* ``logger_every_step``: ``GradientNormLogger(log_every_n_steps=1)`` writing to a real
  ``TensorBoardLogger`` on every one of its steps.

The figure is the time spent inside the condition's callback hooks per optimizer step
(every hook method of those callbacks is wrapped with a timer), median over the measured
steps. This machine's speed drifts by +-20% from one fit to the next, so for each size
all conditions run inside one ``Trainer.fit``, interleaved step by step: step ``k``
belongs to condition ``k mod 3``, and a condition's callbacks do nothing on the other
steps (each sees every third step). A drift hits every condition alike; ratios are
against ``clip_grad_norm`` in the same fit. ``--repeats`` runs more fits and pools them.

On CUDA (``--device cuda``) the hook time is also measured on the device with CUDA events
around each hook, and ``--count-syncs`` counts the host-device synchronisations the hooks
make per step (``torch.cuda.set_sync_debug_mode``; a separate, untimed pass). On CPU there
is nothing to count.

Usage::

    python benchmarks/bench_scale.py                        # 128, 1024, 4096 tensors, ~2 min on 2 cores
    python benchmarks/bench_scale.py --tensors 128 --steps 30   # a quick look
    python benchmarks/bench_scale.py --device cuda --count-syncs --json scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_gradguard import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm

CONDITIONS = ("clip_grad_norm", "defaults", "logger_every_step")
#: the hooks a callback may implement inside a training step
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class ManySmallLayers(pl.LightningModule):
    """``layers`` parallel ``Linear(16, 16)`` whose outputs are summed; ``2 * layers`` tensors."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(layers))

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = torch.stack([block(x) for block in self.blocks]).sum(0) / len(self.blocks) ** 0.5
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ClipGradNorm(Callback):
    """The baseline: ``clip_grad_norm_`` on every step, as ``gradient_clip_val=1.0`` does."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 1.0)


class HookClock:
    """Sums the time spent in one condition's hooks during each of its training steps."""

    def __init__(self, device: torch.device, count_syncs: bool) -> None:
        self.cuda = device.type == "cuda"
        self.count_syncs = count_syncs
        self.host_ms = 0.0
        self.syncs = 0
        self.events: list[tuple[Any, Any]] = []
        self.steps: list[dict[str, float]] = []

    def wrap(self, callback: Callback, active: Callable[[], bool]) -> None:
        """Time ``callback``'s per-step hooks; they run only while ``active()`` (its condition's steps)."""
        for name in STEP_HOOKS:
            if getattr(type(callback), name) is getattr(Callback, name):
                continue  # not implemented: Lightning's no-op
            setattr(callback, name, self._timed(getattr(callback, name), active))

    def _timed(self, hook: Callable[..., Any], active: Callable[[], bool]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not active():
                return None
            if self.count_syncs:
                return self._counting(hook, *args, **kwargs)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.host_ms += (time.perf_counter() - t0) * 1e3
                if self.cuda:
                    end.record()
                    self.events.append((start, end))

        return timed

    def _counting(self, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return hook(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self.syncs += sum("synchroniz" in str(w.message) for w in caught)

    def step_done(self) -> None:
        record = {"host_ms": self.host_ms, "syncs": float(self.syncs)}
        if self.cuda and self.events:
            torch.cuda.synchronize()
            record["device_ms"] = sum(start.elapsed_time(end) for start, end in self.events)
        self.steps.append(record)
        self.host_ms, self.syncs, self.events = 0.0, 0, []


class Rotation(Callback):
    """The first callback: picks each step's condition (round-robin) and closes its account at the end."""

    def __init__(self, clocks: dict[str, HookClock]) -> None:
        self.clocks = clocks
        self.order = tuple(clocks)
        self.current = self.order[0]

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.current = self.order[trainer.global_step % len(self.order)]

    def close(self) -> None:
        self.clocks[self.current].step_done()


class StepBoundary(Callback):
    """The last callback: closes the step's account."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation

    def on_train_batch_end(self, *args: Any) -> None:
        self.rotation.close()


def condition_callbacks(condition: str) -> list[Callback]:
    if condition == "clip_grad_norm":
        return [ClipGradNorm()]
    if condition == "defaults":
        return [GradientNormLogger(), VanishExplodeAlarm(), AdaptiveClipper(), AmpUnscaleCheck()]
    if condition == "logger_every_step":
        return [GradientNormLogger(log_every_n_steps=1)]
    raise ValueError(f"unknown condition {condition!r}")


def run_size(tensors: int, args: argparse.Namespace, log_root: Path) -> dict[str, dict[str, Any]]:
    """One ``Trainer.fit`` with every condition interleaved; per condition, its hook times after warm-up."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ManySmallLayers(tensors // 2)
    data = torch.utils.data.TensorDataset(torch.randn(args.batch * 4, 16), torch.randn(args.batch * 4, 16))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
    clocks = {c: HookClock(device, count_syncs=args.count_syncs) for c in CONDITIONS}
    rotation = Rotation(clocks)
    callbacks: list[Callback] = [rotation]
    for condition in CONDITIONS:
        for cb in condition_callbacks(condition):
            clocks[condition].wrap(cb, lambda c=condition: rotation.current == c)
            callbacks.append(cb)
    logger = TensorBoardLogger(log_root, name=f"scale_{tensors}")
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=(args.warmup + args.steps) * len(CONDITIONS),
        callbacks=[*callbacks, StepBoundary(rotation)],
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    out: dict[str, dict[str, Any]] = {}
    for condition, clock in clocks.items():
        measured = clock.steps[args.warmup :]
        out[condition] = {
            "host_ms_all": [s["host_ms"] for s in measured],
            "syncs_per_step": statistics.mean(s["syncs"] for s in measured),
        }
        if measured and "device_ms" in measured[0]:
            out[condition]["device_ms_all"] = [s["device_ms"] for s in measured]
    # the tags of one of the every-step logger's steps (no other condition writes at its steps)
    own_step = (args.warmup + 1) * len(CONDITIONS) + CONDITIONS.index("logger_every_step")
    out["logger_every_step"]["tags"] = count_scalar_tags(Path(logger.log_dir), own_step)
    return out


def count_scalar_tags(log_dir: Path, step: int) -> int:
    """How many scalar tags have a value at ``step`` in the event files of ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return sum(any(e.step == step for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[128, 1024, 4096], help="gradient tensors")
    parser.add_argument("--steps", type=int, default=120, help="measured steps per condition and fit")
    parser.add_argument("--warmup", type=int, default=10, help="steps per condition dropped first in each fit")
    parser.add_argument("--repeats", type=int, default=1, help="fits per size (pooled)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--count-syncs", action="store_true", help="CUDA only: count syncs (an untimed pass)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    if args.count_syncs and args.device != "cuda":
        parser.error("--count-syncs needs --device cuda (a CPU run makes no host-device syncs)")
    if any(n < 2 or n % 2 for n in args.tensors):
        parser.error("--tensors must be even numbers >= 2 (each layer has a weight and a bias)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for tensors in args.tensors:
            pooled: dict[str, dict[str, Any]] = {c: {"host_ms_all": [], "device_ms_all": []} for c in CONDITIONS}
            for rep in range(args.repeats):
                for condition, res in run_size(tensors, args, Path(tmp) / f"rep{rep}").items():
                    pooled[condition]["host_ms_all"] += res.pop("host_ms_all")
                    pooled[condition]["device_ms_all"] += res.pop("device_ms_all", [])
                    pooled[condition].update(res)
                print(
                    f"  {tensors} tensors, fit {rep + 1}/{args.repeats} ({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            row: dict[str, dict[str, Any]] = {}
            for c in CONDITIONS:
                times, device_times = pooled[c].pop("host_ms_all"), pooled[c].pop("device_ms_all")
                row[c] = {**pooled[c], "host_ms": statistics.median(times)}
                if device_times:
                    row[c]["device_ms"] = statistics.median(device_times)
            base = row["clip_grad_norm"]["host_ms"]
            for c in CONDITIONS:
                row[c]["ratio"] = row[c]["host_ms"] / base
            results["sizes"][str(tensors)] = row
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def print_table(results: dict[str, Any]) -> None:
    print("\n| tensors | defaults | clip_grad_norm_ | ratio | logger every step | ratio | tags per step |")
    print("|---|---|---|---|---|---|---|")
    for tensors, row in results["sizes"].items():
        d, c, lg = row["defaults"], row["clip_grad_norm"], row["logger_every_step"]
        print(
            f"| {int(tensors):,} | {d['host_ms']:.2f} ms | {c['host_ms']:.2f} ms | {d['ratio']:.2f}x "
            f"| {lg['host_ms']:.2f} ms | {lg['ratio']:.2f}x | {lg.get('tags', '?')} |"
        )
    print(f"\nwall time {results['wall_s']:.0f} s; host time in the callbacks' hooks, median per optimizer step")


if __name__ == "__main__":
    main()
