"""gradguard from the command line: a LightningCLI script with no gradguard code in it.

The callbacks are configured on the command line or in a YAML file (see
``examples/cli_config.yaml``)::

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --trainer.max_steps=200 --trainer.callbacks+=GradGuard
    python examples/cli.py fit --trainer.callbacks+=GradientNormLogger --trainer.callbacks.group_by=depth \\
        --trainer.callbacks.group_depth=2 --trainer.callbacks.flow_every_n_steps=50
    python examples/cli.py fit --help    # lists every argument, with the choices of each

Trains a small tanh MLP on a synthetic regression task (generated here, nothing is
downloaded); TensorBoard logs go to ``runs/cli/``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gradguard  # noqa: F401  (makes the short names GradGuard, GradientNormLogger, ... known)


class RegressionMLP(pl.LightningModule):
    """A tanh MLP fitting y = x @ w + noise.

    Args:
        depth: hidden layers.
        width: units per hidden layer.
        lr: SGD learning rate.
    """

    def __init__(self, depth: int = 6, width: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        size = 8
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.Tanh()]
            size = width
        layers.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 8, generator=g)
        y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(1024, 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args``: the command line, default ``sys.argv``)."""
    return LightningCLI(
        RegressionMLP,
        args=args,
        trainer_defaults={
            "accelerator": "cpu",
            "logger": {"class_path": "TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "cli"}},
        },
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
