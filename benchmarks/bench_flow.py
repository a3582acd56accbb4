"""Cost of one gradient-flow picture step of ``GradientNormLogger`` on the reference model.

Trains the reference model of ``bench_overhead.py`` (12-layer ``nn.TransformerEncoder``,
147 parameter tensors, 74 layers by module) with ``GradientNormLogger(log_every_n_steps=1,
flow_every_n_steps=K)`` and a real ``TensorBoardLogger``, and times every optimizer step
(``on_train_batch_start`` -> ``on_train_batch_end``, after the logger's own hook). Steps
whose pictures were drawn are compared with the logging steps in between, whose cost the
pictures leave untouched (their history costs a dict lookup and a numpy row). It also
times the two pictures alone with a full history (``flow_history`` columns).

Usage::

    python benchmarks/bench_flow.py                 # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_flow.py --steps 120 --every 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from bench_overhead import BATCH, SEQ, VOCAB, ReferenceModel, Switch  # type: ignore[import-not-found]
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientNormLogger
from lightning_gradguard.flow import FlowHistory, heatmap_png, profile_png


class StepTimer(pl.Callback):
    """Wall time of each training batch, taken after every other callback's hooks."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times[trainer.global_step - 1] = time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25, help="flow_every_n_steps")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the pictures-alone timing")
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = StepTimer()
    logger_cb = GradientNormLogger(log_every_n_steps=1, flow_every_n_steps=args.every)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            logger=TensorBoardLogger(tmp, name="bench_flow"),
            callbacks=[logger_cb, timer],  # the timer's end hook runs after the logger's
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=1,
        )
        ids = torch.randint(0, VOCAB, (args.steps * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
        model = ReferenceModel(Switch(["baseline"]))  # the switch only serves bench_overhead's own conditions
        trainer.fit(model, DataLoader(TensorDataset(ids), batch_size=BATCH))
    history = logger_cb.flow_histories[""]
    drawn = {s for s in timer.times if (s + 1) % args.every == 0}
    warm = 10
    picture = [t for s, t in timer.times.items() if s in drawn and s >= warm]
    between = [t for s, t in timer.times.items() if s not in drawn and s >= warm]
    layers = len(history.names)
    print(f"reference model, {layers} layers, {args.steps} steps, pictures every {args.every}:")
    print(f"  logging steps without pictures: median {1e3 * statistics.median(between):.1f} ms ({len(between)} steps)")
    print(f"  steps with pictures:            median {1e3 * statistics.median(picture):.1f} ms ({len(picture)} steps)")
    print(f"  one picture step costs:         {1e3 * (statistics.median(picture) - statistics.median(between)):.0f} ms")

    full = FlowHistory(history.capacity)
    for step in range(4 * history.capacity):
        full.add(step, history.names, [10.0 ** (-(i % 17)) for i in range(layers)])
    full.extras = dict(history.extras)
    timings = {"heatmap": [], "profile": []}
    for _ in range(args.repeats):
        for name, draw in (("heatmap", heatmap_png), ("profile", profile_png)):
            start = time.perf_counter()
            draw(full, title="bench")
            timings[name].append(time.perf_counter() - start)
    for name, values in timings.items():
        print(f"  {name} alone, {len(full)} columns x {layers} layers: median {1e3 * statistics.median(values):.0f} ms")


if __name__ == "__main__":
    main()
