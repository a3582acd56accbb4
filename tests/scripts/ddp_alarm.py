"""Two-process DDP run where one rank alone gets a NaN gradient, for tests/test_distributed.py.

Usage::

    python ddp_alarm.py OUT_DIR [carry-on]

At step ``BAD_STEP`` a callback placed before the gradguard callbacks writes a NaN into one
gradient element on rank 1 only (after DDP's all-reduce, so rank 0's gradients stay
finite). By default ``VanishExplodeAlarm`` must stop both ranks at that step, skip it on
both, and leave identical, finite weights. With ``carry-on``, an ``AdaptiveClipper``
(z-score) sits before ``VanishExplodeAlarm(halt_on_nan=False)``: both ranks must skip the
step, go on, and keep identical clipping statistics and weights. Every rank writes
``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import AdaptiveClipper, VanishExplodeAlarm

BAD_STEP = 3


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.weights_after: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, *args) -> None:
        flat = torch.cat([p.detach().flatten() for p in self.parameters()])
        self.weights_after[self.trainer.global_step] = flat.tolist()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class PoisonOneRank(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == 1 and trainer.global_step == BAD_STEP:
            with torch.no_grad():
                pl_module.net[0].weight.grad[0, 0] = float("nan")


def main() -> None:
    out_dir = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    carry_on = sys.argv[2:] == ["carry-on"]
    model = Net()
    alarm = VanishExplodeAlarm(dump_dir=os.path.join(out_dir, "dumps"), halt_on_nan=not carry_on)
    clipper = AdaptiveClipper(mode="zscore", warmup_steps=2)
    callbacks = [PoisonOneRank(), clipper, alarm] if carry_on else [PoisonOneRank(), alarm]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=12 if carry_on else 20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, data)
    rank = trainer.global_rank
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    record = {
        "rank": rank,
        "halted_at": alarm.halted_at,
        "global_step": trainer.global_step,
        "counts": alarm.counts,
        "skipped_steps": alarm.skipped_steps,
        "final": final.tolist(),
        "finite": bool(torch.isfinite(final).all()),
        "before_bad_step": model.weights_after.get(BAD_STEP),
        "dumps": alarm.dump_paths,
    }
    if carry_on:
        rule = clipper.threshold_rule(0)
        record["clip_state"] = {k: v.tolist() for k, v in rule.state_dict().items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)


def _shutdown() -> None:
    """Tear the process group down before exit: a live gloo group at interpreter exit can
    abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without running C++ static destructors: a c10d/gloo helper thread still
    # joinable at interpreter teardown aborts the process now and then ("terminate
    # called without an active exception", exit -6) after all the work is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    _shutdown()
