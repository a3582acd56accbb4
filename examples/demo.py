"""lightning-gradguard demo: watch gradients vanish in a deep sigmoid net, and not in a residual one.

Trains two 20-layer classifiers on an embedded two-spirals data set (generated here,
nothing is downloaded) with :class:`lightning_gradguard.GradientNormLogger` and
:class:`lightning_gradguard.VanishExplodeAlarm` attached, writes TensorBoard logs, and
prints what the alarm found, what the logs show and how to open them.

Run: ``make demo`` (or ``python examples/demo.py --help``).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientNormLogger, VanishExplodeAlarm
from lightning_gradguard.stats import Grouping, ParamSet


def two_spirals(n: int = 2048, noise: float = 0.15, seed: int = 0) -> TensorDataset:
    """Two interleaved spirals in the plane, labelled 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sqrt(torch.rand(n // 2, generator=g)) * 3 * math.pi
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (3 * math.pi)
    x = torch.cat([arm, -arm]) + noise * torch.randn(n, 2, generator=g) / 3
    y = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    return TensorDataset(x, y)


class DeepSigmoidMLP(nn.Module):
    """The textbook vanishing-gradient net: many sigmoid layers, default init."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2, width), nn.Sigmoid()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        layers.append(nn.Linear(width, 2))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + torch.relu(self.linear(self.norm(x)))


class ResidualReLUMLP(nn.Module):
    """The same depth with the usual cures: ReLU, He init, LayerNorm, skip connections."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        self.stem = nn.Linear(2, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth - 2)])
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float):
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _last(acc: EventAccumulator, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default="runs/demo", help="where TensorBoard logs go (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per model (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=20, help="layers per model (default: %(default)s)")
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    data = DataLoader(two_spirals(), batch_size=128, shuffle=True)
    models = {
        "deep_sigmoid": DeepSigmoidMLP(args.depth, args.width),
        "residual_relu": ResidualReLUMLP(args.depth, args.width),
    }
    log_dirs = {}
    alarms = {}
    layer_names = {}
    for name, net in models.items():
        # the logger's own grouping, input side first: names its per-layer tags
        layer_names[name] = Grouping.build(ParamSet.from_module(Classifier(net, lr=0.0))).names
        logger = TensorBoardLogger(args.logdir, name=name)
        alarm = VanishExplodeAlarm()  # warns once per episode; see its summary below
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            logger=logger,
            log_every_n_steps=10,
            callbacks=[
                GradientNormLogger(log_param_norms=True, log_update_ratio=True, flow_every_n_steps=100),
                alarms.setdefault(name, alarm),
            ],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        start = time.perf_counter()
        trainer.fit(Classifier(net, lr=1e-3), data)
        print(f"[{name}] trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
        log_dirs[name] = logger.log_dir

    print("\nWhat VanishExplodeAlarm found:")
    for name, alarm in alarms.items():
        found = ", ".join(f"{f.kind} at step {f.step}" for f in alarm.findings) or "nothing"
        print(f"  {name:14s} {found}")
        for finding in alarm.findings[:1]:
            print("    " + finding.message().replace("\n", "\n    "))

    print("\nWhat the gradient logs say (last logged step):")
    for name, log_dir in log_dirs.items():
        files = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
        acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
        acc.Reload()
        first, last = f"grad_norm/{layer_names[name][0]}", f"grad_norm/{layer_names[name][-1]}"
        g_first, g_last = _last(acc, first), _last(acc, last)
        ratio = g_last / g_first if g_first > 0 else math.inf
        print(
            f"  {name:14s} loss {_last(acc, 'train/loss'):.3f}  acc {_last(acc, 'train/acc'):.2f}  "
            f"|grad| first layer ({first.split('/', 1)[1]}) {g_first:.2e}  "
            f"last layer ({last.split('/', 1)[1]}) {g_last:.2e}  deep/shallow {ratio:.1e}"
        )
        assert files, f"no event file in {log_dir}"
    print(
        f"\nTensorBoard logs: {os.path.abspath(args.logdir)}\n"
        f"Open them with:   .venv/bin/tensorboard --logdir {args.logdir}   (then http://localhost:6006)\n"
        "  Images: grad_flow/heatmap (log10 |grad|, layer x step) and grad_flow/profile (per layer, newest step)\n"
        "  Custom Scalars ('gradguard'): total norm, first/middle/last layer in log10, update/weight ratio\n"
        "  Scalars: grad_norm/<layer>, param_norm/*, update_ratio/*, alarm/*; Text: layers in forward order\n"
        f"Or one HTML page, no server: .venv/bin/python -m lightning_gradguard report {args.logdir}"
    )


if __name__ == "__main__":
    main()
