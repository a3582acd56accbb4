"""Two-process DDP training on CPU/gloo with AdaptiveClipper, for tests/test_adaptive_clipper.py.

Usage::

    python ddp_clipper.py OUT_DIR

Lightning starts this script again for rank 1 with the same arguments. Each rank trains
on its own rows (DistributedSampler). At ``NAN_STEP`` only rank 0's loss is NaN, at
``SPIKE_STEP`` only rank 1's loss is multiplied by 1000: after DDP's all-reduce both ranks
see the bad gradient, and the clipper (``skip_factor``) must take the same decision on
both. Every rank writes ``OUT_DIR/rank<r>.json`` with, per step, the clipper's
``last_decision()``, the number of norms its statistics hold, its first local loss and
its final weights. Rank 0 also logs to TensorBoard under ``OUT_DIR/tb``.
"""

from __future__ import annotations

import json
import math
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper

MAX_STEPS = 14
NAN_STEP = 5
SPIKE_STEP = 10
N_ROWS = 128


class Regression(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_ROWS, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(N_ROWS, 1, generator=g)

    def __len__(self) -> int:
        return N_ROWS

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Model(pl.LightningModule):
    def __init__(self, out_dir: str, clipper: AdaptiveClipper) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.out_dir = out_dir
        self.clipper = clipper
        self.decisions: dict[int, dict] = {}
        self.first_loss: float | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.first_loss is None:
            self.first_loss = loss.item()
        step = self.trainer.global_step
        if step == NAN_STEP and self.global_rank == 0:
            loss = loss * math.nan
        if step == SPIKE_STEP and self.global_rank == 1:
            loss = loss * 1000.0
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_before_optimizer_step(self, optimizer):
        # runs after the callbacks: what the clipper decided for this step
        self.decisions[self.trainer.global_step] = self.clipper.last_decision(0)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            optimizer.zero_grad(set_to_none=True)  # keep the NaN step out of the weights

    def on_fit_end(self):
        record = {
            "global_rank": self.global_rank,
            "world_size": self.trainer.world_size,
            "max_steps": MAX_STEPS,
            "nan_step": NAN_STEP,
            "spike_step": SPIKE_STEP,
            "first_loss": self.first_loss,
            "decisions": self.decisions,
            "seen": int(self.clipper.threshold_rule(0).seen),
            "weights": torch.cat([p.detach().flatten() for p in self.parameters()]).tolist(),
        }
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}.json"), "w") as fh:
            json.dump(record, fh)


def main() -> None:
    out_dir = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveClipper(mode="zscore", warmup_steps=3, skip_factor=5.0, log_every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        logger=pl.loggers.TensorBoardLogger(out_dir, name="tb", version=0),
        callbacks=[clipper],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Model(out_dir, clipper), DataLoader(Regression(), batch_size=8, shuffle=False))


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
