"""GradientNormLogger under Lightning's ModelParallelStrategy (FSDP2) on CPU/gloo, two processes.

Usage::

    python model_parallel_logger.py OUT_DIR

``configure_model`` applies ``fully_shard`` over the data-parallel mesh to each Linear
and to the root, so every gradient the callback sees is a sharded DTensor (the layers
have 7, 5 and 3 output features: uneven shards on two ranks). Lightning relaunches this
script for rank 1. Rank 0 writes TensorBoard events under ``OUT_DIR/tb`` and
``OUT_DIR/reference.json``: per step, ``torch.linalg.vector_norm`` of the full gradients
(``grad.full_tensor()``, a collective, so every rank computes it), per Linear layer and
in total, in float64.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientNormLogger

MAX_STEPS = 4


class ShardedMLP(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
        self.out_dir = out_dir
        self.reference: dict[int, dict[str, float]] = {}
        self.grad_types: set[str] = set()

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_before_optimizer_step(self, optimizer):
        layers: dict[str, list[torch.Tensor]] = defaultdict(list)
        flat = []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            self.grad_types.add(type(p.grad).__name__)
            full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            g = full.detach().double().flatten()
            layers[name.rsplit(".", 1)[0]].append(g)
            flat.append(g)
        norms = {k: torch.linalg.vector_norm(torch.cat(v)).item() for k, v in layers.items()}
        norms["total"] = torch.linalg.vector_norm(torch.cat(flat)).item()
        self.reference[self.trainer.global_step] = norms

    def on_fit_end(self):
        if self.global_rank == 0:
            record = {
                "world_size": self.trainer.world_size,
                "strategy": type(self.trainer.strategy).__name__,
                "grad_types": sorted(self.grad_types),
                "steps": self.reference,
            }
            with open(os.path.join(self.out_dir, "reference.json"), "w") as fh:
                json.dump(record, fh)


def main() -> None:
    out_dir = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.randn(64, 3, generator=g)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=MAX_STEPS,
        logger=pl.loggers.TensorBoardLogger(out_dir, name="tb", version=0),
        callbacks=[GradientNormLogger(log_every_n_steps=1)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ShardedMLP(out_dir), DataLoader(TensorDataset(x, y), batch_size=8))


if __name__ == "__main__":
    main()
