"""Two-process DDP training on CPU/gloo with GradientNormLogger, for tests/test_distributed.py.

Usage::

    python ddp_logger.py OUT_DIR

Lightning starts this script again for rank 1 (``_SubprocessScriptLauncher``), with the
same arguments. Rank 0 writes TensorBoard events under ``OUT_DIR/tb``. Every rank writes
``OUT_DIR/rank<r>.json`` with what it saw, measured without gradguard:

- ``steps[step]["norms"]``: ``torch.linalg.vector_norm`` of the gradients the optimizer is
  about to apply (after DDP's all-reduce), per Linear layer and in total, in float64;
- ``steps[step]["grad"]`` / ``["local_grad"]``: those gradients flattened, and the gradient
  of this rank's own batch alone (recomputed outside the DDP wrapper), so the test can
  check that the former is the average of the ranks' latter;
- ``steps[step]["batch_rows"]``: the dataset rows of this rank's batch.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard import GradientNormLogger

MAX_STEPS = 5
N_ROWS = 64


class IndexedRegression(Dataset):
    """Fixed random regression rows that also return their own index."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_ROWS, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(N_ROWS, 1, generator=g)

    def __len__(self) -> int:
        return N_ROWS

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Recorder(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1))
        self.out_dir = out_dir
        self.steps: dict[int, dict] = {}
        self._batch = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, rows = batch
        self._batch = (x, y, rows)
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_before_optimizer_step(self, optimizer):
        # LightningModule hooks run after the callbacks' hooks: the gradients here are the
        # ones GradientNormLogger measured, and no optimizer step has happened yet.
        named = [(n, p) for n, p in self.named_parameters() if p.grad is not None]
        grads = [p.grad.detach().double().flatten() for _, p in named]
        layers: dict[str, list[torch.Tensor]] = defaultdict(list)
        for (name, _), g in zip(named, grads):
            layers[name.rsplit(".", 1)[0]].append(g)
        norms = {k: torch.linalg.vector_norm(torch.cat(v)).item() for k, v in layers.items()}
        norms["total"] = torch.linalg.vector_norm(torch.cat(grads)).item()

        # This rank's own gradient, through the bare module (no DDP hooks, no all-reduce).
        x, y, rows = self._batch
        params = [p for _, p in named]
        with torch.enable_grad():
            local = torch.autograd.grad(nn.functional.mse_loss(self.net(x), y), params)
        self.steps[self.trainer.global_step] = {
            "norms": norms,
            "grad": torch.cat(grads).tolist(),
            "local_grad": torch.cat([g.detach().double().flatten() for g in local]).tolist(),
            "batch_rows": rows.tolist(),
        }

    def on_fit_end(self):
        record = {
            "global_rank": self.global_rank,
            "world_size": self.trainer.world_size,
            "strategy": type(self.trainer.strategy).__name__,
            "steps": self.steps,
        }
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}.json"), "w") as fh:
            json.dump(record, fh)


def main() -> None:
    out_dir = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        logger=pl.loggers.TensorBoardLogger(out_dir, name="tb", version=0),
        callbacks=[GradientNormLogger(log_every_n_steps=1)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(IndexedRegression(), batch_size=8, shuffle=False)
    trainer.fit(Recorder(out_dir), loader)


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
