"""GradientNormLogger under Lightning's ModelParallelStrategy (FSDP2) on CPU/gloo, two processes.

Usage::

    python model_parallel_logger.py OUT_DIR [--head-out N]

``configure_model`` applies ``fully_shard`` over the data-parallel mesh to each Linear
and to the root, so every gradient the callback sees is a sharded DTensor (the layers
have 7, 5 and ``--head-out`` (default 3) output features: uneven shards on two ranks).
Lightning relaunches this script for rank 1. Rank 0 writes TensorBoard events under
``OUT_DIR/tb`` and ``OUT_DIR/reference.json``, computed without gradguard from the full
tensors (``full_tensor()`` is a collective, so every rank computes them), in float64,
per step: ``grad``, the gradient norms per Linear layer and in total; ``param``, the
weight norms before the step; ``update_ratio``, ``|W_after - W_before| / |W_before|``.
"""

from __future__ import annotations

import argparse
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
    def __init__(self, out_dir: str, head_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, head_out))
        self.out_dir = out_dir
        self.reference: dict[int, dict[str, dict[str, float]]] = {}
        self.grad_types: set[str] = set()
        self._before: torch.Tensor | None = None

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

    def _full(self, use_grad: bool) -> dict[str, list[torch.Tensor]]:
        """Full (unsharded) gradients or weights, flattened, by owning module."""
        layers: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, p in self.named_parameters():
            t = p.grad if use_grad else p
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            layers[name.rsplit(".", 1)[0]].append(t.detach().double().flatten())
        return layers

    @staticmethod
    def _norms(layers: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        out = {k: torch.linalg.vector_norm(torch.cat(v)).item() for k, v in layers.items()}
        out["total"] = torch.linalg.vector_norm(torch.cat([t for v in layers.values() for t in v])).item()
        return out

    def on_before_optimizer_step(self, optimizer):
        self.grad_types.update(type(p.grad).__name__ for p in self.parameters())
        weights = self._full(use_grad=False)
        self._before = torch.cat([t for v in weights.values() for t in v])
        self.reference[self.trainer.global_step] = {
            "grad": self._norms(self._full(use_grad=True)),
            "param": self._norms(weights),
        }

    def on_train_batch_end(self, outputs, batch, batch_idx):
        after = torch.cat([t for v in self._full(use_grad=False).values() for t in v])
        ratio = torch.linalg.vector_norm(after - self._before) / torch.linalg.vector_norm(self._before)
        self.reference[self.trainer.global_step - 1]["update_ratio"] = {"total": ratio.item()}

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
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--head-out", type=int, default=3)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.randn(64, args.head_out, generator=g)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=MAX_STEPS,
        logger=pl.loggers.TensorBoardLogger(args.out_dir, name="tb", version=0),
        callbacks=[GradientNormLogger(log_every_n_steps=1, log_param_norms=True, log_update_ratio=True)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ShardedMLP(args.out_dir, args.head_out), DataLoader(TensorDataset(x, y), batch_size=8))


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
