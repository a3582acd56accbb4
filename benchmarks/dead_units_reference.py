"""Are the dead units the alarm counts on the reference transformer really dead? An independent check.

Trains the reference model of ``bench_overhead.py`` (12-layer post-LN
``nn.TransformerEncoder``, ReLU feed-forward layers of 256 units) with
``VanishExplodeAlarm()`` at its defaults for ``--steps`` steps, then, in eval mode (no
dropout), runs 20 batches through it and counts, per feed-forward layer, the units whose
ReLU input is never positive on any of their 20,480 tokens: units that cannot pass a
gradient. Beside it, the alarm's own share per layer at the end (units whose gradient was
exactly zero for ``dead_patience`` training steps in a row, dropout on) and its dead
findings.

Usage::

    python benchmarks/dead_units_reference.py --steps 900     # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bo

from lightning_gradguard import VanishExplodeAlarm
from lightning_gradguard.callbacks import _session


class Reference(bo.ReferenceModel):
    """The benchmark model without its benchmark conditions."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    pl.seed_everything(args.seed, verbose=False)
    model = Reference(bo.Switch(["baseline"]))
    ids = torch.randint(0, bo.VOCAB, (bo.BATCH * 40, bo.SEQ + 1), generator=torch.Generator().manual_seed(args.seed))
    alarm = VanishExplodeAlarm()
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[alarm],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(ids), batch_size=bo.BATCH, shuffle=True))
    params = _session.param_set(trainer, model, trainer.optimizers[0])
    shares = dict(zip(alarm._grouping(params).names, alarm.detectors[0].dead_unit_shares().tolist()))
    fired: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(model.encoder.layers):
        layer.linear1.register_forward_hook(
            lambda mod, inp, out, i=i: fired.setdefault(i, []).append((out > 0).reshape(-1, out.shape[-1]).any(0))
        )
    model.eval()
    with torch.no_grad():
        for k in range(20):
            model(ids[k * bo.BATCH : (k + 1) * bo.BATCH, :-1])
    dead = [(f.step, f.units) for f in alarm.findings if f.kind == "dead"]
    print(f"\n{args.steps} steps, seed {args.seed}; dead findings: {dead}")
    print("| layer | never active in eval, 20 batches | alarm: zero for dead_patience steps (training) |")
    print("|---|---|---|")
    for i in range(len(model.encoder.layers)):
        name = f"encoder.layers.{i}.linear1"
        never = (~torch.stack(fired[i]).any(0)).float().mean().item()
        print(f"| `{name}` | {never:.2f} | {shares.get(name, 0.0):.2f} |")


if __name__ == "__main__":
    main()
