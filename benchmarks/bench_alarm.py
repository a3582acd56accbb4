"""Per-step cost of ``VanishExplodeAlarm``'s rules, interleaved inside one ``Trainer.fit``.

The reference model, the switch and the statistics are ``bench_overhead.py``'s (see its
docstring for why conditions are interleaved step by step). Conditions, round-robin:

* ``baseline`` (twice per round): nothing attached does anything on that step;
* ``alarm_core``: ``VanishExplodeAlarm(growth_total=None, dead_unit_share=None)``, the
  rules without geometric growth and dead units;
* ``alarm_default``: ``VanishExplodeAlarm()`` with every rule at its default.

Usage::

    python benchmarks/bench_alarm.py --rounds 100 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_overhead import BASELINE, BATCH, SEQ, VOCAB, Gated, ReferenceModel, Stopwatch, Switch, summarize

from lightning_gradguard import VanishExplodeAlarm

CORE = "alarm_core"
DEFAULT = "alarm_default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    slots = [BASELINE, CORE, BASELINE, DEFAULT]
    conditions = [BASELINE, CORE, DEFAULT]
    total = args.rounds + args.warmup_rounds
    steps = total * len(slots)
    pl.seed_everything(0, verbose=False)
    switch = Switch(slots, total_rounds=total)
    model = ReferenceModel(switch)
    ids = torch.randint(0, VOCAB, (steps * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    gated = [
        Gated(VanishExplodeAlarm(growth_total=None, dead_unit_share=None), CORE, switch),
        Gated(VanishExplodeAlarm(), DEFAULT, switch),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=1,
        logger=False,
        callbacks=[switch, *gated, Stopwatch(switch)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(ids), batch_size=BATCH))
    records = [r for r in switch.records if r["round"] >= args.warmup_rounds]
    result = summarize(records, conditions)
    elapsed = time.perf_counter() - start
    print(f"{len(records)} measured steps in {elapsed:.0f} s, {result['clean_rounds']} clean rounds")
    print("condition        median ms  median ovh  mean ovh  paired ovh [95% CI]")
    for c in conditions:
        r = result["conditions"][c]
        lo, hi = r["paired_overhead_ci95_pct"]
        print(
            f"{c:16s} {r['median_ms']:9.1f}  {r['median_overhead_pct']:+9.1f}% {r['mean_overhead_pct']:+8.1f}% "
            f"{r['paired_overhead_pct']:+9.1f}% [{lo:+.1f}, {hi:+.1f}]"
        )
    core = [r["ms"] for r in records if r["condition"] == CORE]
    full = [r["ms"] for r in records if r["condition"] == DEFAULT]
    print(f"alarm_default vs alarm_core, median step: {statistics.median(full) - statistics.median(core):+.2f} ms")


if __name__ == "__main__":
    main()
