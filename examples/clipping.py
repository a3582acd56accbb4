"""AdaptiveClipper on two small tasks whose training blows up without clipping.

``rnn``: a ReLU RNN with an identity-initialised recurrence (Le et al. 2015's IRNN)
reads 50 steps of 4-dimensional Gaussian noise and must output a fixed linear function
of their sum, scaled so that the target has variance 1. The recurrence applies the same
matrix 50 times: as soon as SGD pushes its largest eigenvalue above 1 the gradient grows
like its 50th power, and without clipping the loss is NaN within three steps. Here the
whole regime is explosive, not a few steps.

``spikes``: a tanh MLP regresses a fixed random teacher (targets of variance ~40, so
ordinary gradient norms are ~5-15), but 2% of the batches are corrupted, their targets
multiplied by 1000, as a bad shard or a mislabelled batch would. Every corrupted batch
sends a gradient ~1000x the usual one; without clipping the first of them wrecks the
weights. A fixed ``gradient_clip_val=1.0`` survives the spikes but also shrinks every
ordinary step 5-15x; a threshold learned from the run clips the spikes only.

Both report the loss on clean held-out data at the end; a run *diverged* when its
training loss became non-finite or its final loss is above that of always predicting 0.

This script trains one task twice, without clipping and with ``AdaptiveClipper``, writes
TensorBoard logs (the ``clip/...`` curves) and prints the outcome.
``benchmarks/bench_clipping.py`` runs both tasks over seeds and settings.

Run::

    python examples/clipping.py                                # rnn task, AGC; ~15 s on 2 CPU cores
    python examples/clipping.py --task spikes --mode zscore
    tensorboard --logdir runs/clipping
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper

BATCH = 32
HELD_OUT = 1024


# --------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------


class RegressionTask(pl.LightningModule):
    """Shared plumbing: SGD with momentum, a loss per step, a clean held-out loss at the end."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        value = loss.item()
        self.losses.append(value)
        self.log("train_loss", loss)
        if not math.isfinite(value):  # nothing recovers from NaN weights: stop here
            self.trainer.should_stop = True
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    @torch.no_grad()
    def held_out_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return nn.functional.mse_loss(self(x), y).item()


class SequenceSum(RegressionTask):
    """The ``rnn`` task's model: IRNN (ReLU, identity recurrence) and a linear read-out."""

    SEQ_LEN, IN_FEATURES, HIDDEN = 50, 4, 32

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)
        self.rnn = nn.RNN(self.IN_FEATURES, self.HIDDEN, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(self.HIDDEN, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(self.HIDDEN))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.head(states[:, -1])

    @classmethod
    def data(cls, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, cls.SEQ_LEN, cls.IN_FEATURES, generator=g)
        direction = torch.randn(cls.IN_FEATURES, generator=torch.Generator().manual_seed(1234))
        y = (x @ (direction / direction.norm())).sum(1, keepdim=True) / math.sqrt(cls.SEQ_LEN)
        return x, y


class SpikyRegression(RegressionTask):
    """The ``spikes`` task's model: a 16-64-64-1 tanh MLP."""

    IN_FEATURES, CORRUPT_FRACTION, CORRUPT_FACTOR = 16, 0.02, 1000.0

    def __init__(self, lr: float = 0.003) -> None:
        super().__init__(lr)
        d = self.IN_FEATURES
        self.net = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def data(cls, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = torch.Generator().manual_seed(99)
        w1 = torch.randn(cls.IN_FEATURES, 32, generator=teacher) / math.sqrt(cls.IN_FEATURES)
        w2 = torch.randn(32, 1, generator=teacher) * 10 / math.sqrt(32)
        x = torch.randn(n, cls.IN_FEATURES, generator=torch.Generator().manual_seed(seed))
        return x, torch.tanh(x @ w1) @ w2

    @classmethod
    def corrupt(cls, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Multiply the targets of ``CORRUPT_FRACTION`` of the batches by ``CORRUPT_FACTOR``."""
        batches = y.shape[0] // BATCH
        bad = torch.rand(batches, generator=torch.Generator().manual_seed(seed + 1)) < cls.CORRUPT_FRACTION
        factor = torch.where(bad, cls.CORRUPT_FACTOR, 1.0).repeat_interleave(BATCH).unsqueeze(1)
        return y * factor


TASKS: dict[str, type[RegressionTask]] = {"rnn": SequenceSum, "spikes": SpikyRegression}
DEFAULT_LR = {"rnn": 0.01, "spikes": 0.003}


@dataclass
class Outcome:
    """How one training run ended."""

    final_loss: float  # on clean held-out data; nan if the weights are not finite
    baseline: float  # the held-out loss of always predicting 0
    nonfinite_step: int | None  # first step whose training loss was NaN/Inf
    steps: int

    @property
    def diverged(self) -> bool:
        return self.nonfinite_step is not None or not math.isfinite(self.final_loss) or self.final_loss > self.baseline

    def describe(self) -> str:
        if self.nonfinite_step is not None:
            return f"diverged: the training loss became non-finite at step {self.nonfinite_step}"
        verdict = "diverged (loss blow-up)" if self.diverged else "trained"
        return f"{verdict}: held-out loss {self.final_loss:.4g} (always answering 0 scores {self.baseline:.3g})"


def train(
    task: str,
    *,
    seed: int,
    lr: float | None = None,
    steps: int = 300,
    callbacks: list[pl.Callback] | None = None,
    gradient_clip_val: float | None = None,
    logger: Any = False,
) -> Outcome:
    """Train one model of ``task`` with the given clipping; return how it ended."""
    cls = TASKS[task]
    pl.seed_everything(seed, verbose=False)
    model = cls(lr=DEFAULT_LR[task] if lr is None else lr)
    x, y = cls.data(BATCH * steps, seed)
    if cls is SpikyRegression:
        y = SpikyRegression.corrupt(y, seed)
    x_val, y_val = cls.data(HELD_OUT, 10_000 + seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        log_every_n_steps=10,
        callbacks=callbacks or [],
        gradient_clip_val=gradient_clip_val,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False))
    bad = next((i for i, v in enumerate(model.losses) if not math.isfinite(v)), None)
    final = model.held_out_loss(x_val, y_val) if bad is None else math.nan
    return Outcome(final_loss=final, baseline=(y_val**2).mean().item(), nonfinite_step=bad, steps=len(model.losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="rnn", choices=sorted(TASKS))
    parser.add_argument("--mode", default=None, choices=["percentile", "zscore", "agc", "norm", "value"])
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: the task's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/clipping")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    mode = args.mode or {"rnn": "agc", "spikes": "zscore"}[args.task]
    kwargs = {
        "norm": dict(max_norm=1.0),
        "value": dict(clip_value=0.1),
        # no fixed ceiling after a 1.0 warm-up, so that the learned threshold shows (the default
        # max_norm=1.0 would make these runs the fixed clip's on both tasks, whose norms are above 1)
        "percentile": dict(warmup_max_norm=1.0, max_norm=math.inf),
        "zscore": dict(warmup_max_norm=1.0, max_norm=math.inf),
        "agc": {},
    }[mode]
    lr = DEFAULT_LR[args.task] if args.lr is None else args.lr

    print(f"task {args.task!r}, SGD lr={lr}, {args.steps} steps, seed {args.seed}")
    plain = train(args.task, seed=args.seed, lr=lr, steps=args.steps)
    print(f"  no clipping:  {plain.describe()}")
    clipper = AdaptiveClipper(mode=mode, **kwargs)
    logger = TensorBoardLogger(args.logdir, name=f"{args.task}-{mode}")
    clipped = train(args.task, seed=args.seed, lr=lr, steps=args.steps, callbacks=[clipper], logger=logger)
    print(f"  {clipper!r}:\n                {clipped.describe()}")
    rule = clipper.threshold_rule(0)
    if rule is not None:
        print(f"  learned threshold at the end: {rule.threshold().item():.4g} (from {int(rule.seen)} steps)")
    print(f"TensorBoard: tensorboard --logdir {logger.log_dir}   (clip/pre_norm, clip/post_norm, clip/coef, ...)")


if __name__ == "__main__":
    main()
