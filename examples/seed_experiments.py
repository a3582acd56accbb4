"""The seed documents' two experiments, as pictures in TensorBoard drawn by gradguard's callbacks.

The background documents this project grew from (``/work/shared/seeds/``, in Chinese)
explain vanishing and exploding gradients with two small experiments, each plotted on a
log axis. This script runs both under Lightning with
:class:`lightning_gradguard.GradientNormLogger` (per-layer norms, gradient-flow heatmap
and profile in the Images tab) and :class:`lightning_gradguard.VanishExplodeAlarm`
(findings in the Text tab) attached, then reads the norms back from the event files and
adds one summary figure per experiment.

**1. Gradient vs depth.** Back-propagation multiplies one Jacobian per layer, so a
factor below 1 per layer shrinks the gradient geometrically on its way to the input. The
seeds' rules of thumb: the sigmoid's slope is at most 1/4, so a stack of sigmoids
loses more than half a decade per layer whatever the initialisation; tanh's slope
reaches 1 only at zero, and ReLU's is exactly 1 where it is active, so both keep the
gradient alive when the weights are initialised for them (Xavier/Glorot for
sigmoid/tanh, He for ReLU); and a skip connection ``h + f(h)`` adds an identity term to
every Jacobian, a path on which the gradient reaches the first layer undamped. Here six
MLPs of the same depth (default 30 linear layers, 32 wide, the textbook initialisation
for each activation) are trained briefly on a small two-dimensional task: sigmoid, tanh
and ReLU, each plain (``h = f(W h + b)``) and residual (``h = h + f(W h + b) / sqrt(n)``
with ``n`` blocks; the ``1/sqrt(n)`` keeps an unnormalised residual stack from growing
with depth, which a bare ``h + relu(W h)`` does by a factor of two in variance per layer).
Each run's profile picture is its per-layer gradient norm on a log axis against depth;
the summary figure puts all six on one axis.

**2. Gradient vs sequence length.** A recurrent net applies the same cell at every time
step, so the gradient reaching step ``t`` of a ``T``-step sequence has passed through
``T - t`` recurrent Jacobians: the sequence length plays the role of depth. A plain
``nn.RNN`` (tanh, PyTorch's default initialisation, hidden size 32) reads sequences whose
label depends only on their first four steps, and is trained briefly at several lengths
(default 10, 20, 50, 100; the seeds used 10 to 200). gradguard measures gradients per
module, so the input encoder is two modules of the same shape: ``net.early`` encodes the
first four steps and ``net.recent`` the rest. The norm of ``net.early`` is the gradient
that reaches the earliest steps; it falls by orders of magnitude as the sequence grows,
while ``net.recent`` stays put. (The seeds' own RNN demo fills the recurrent weights with
2.0 to make the gradient explode; with tanh this mostly saturates the units, whose slope
is then near 0, and the gradient that reaches the early steps vanishes all the same.
Past about 200 steps here it underflows float32 to exactly 0.)

What to expect (one run on 2 CPU cores, the numbers printed at the end): the plain sigmoid
net's first layer gets a gradient some 18 decades below its last layer's, it stays at
chance (loss 0.69) and the alarm reports it vanishing; every other net has its first and
last layer within about one decade of each other and learns. The alarm also reports dead
units in the ReLU nets (a layer where half the units have had an exactly-zero gradient
for 10 steps), the seeds' caveat about ReLU. The RNN learns at length 10 (its
``net.early`` gradient then grows as it starts to use the first steps); from length 20 on
that gradient is about 1e-5 or less, the loss stays at chance and the alarm reports vanishing.

The seeds' thresholds for a glance at the numbers: an input-side layer whose gradient norm
is below about 1e-5 is suspect of vanishing, one above about 100 of exploding; the summary
figures mark 1e-5. The alarm applies its own rule (the deepest layer's norm over the
shallowest's, median over its ``patience`` steps, above 1e3).

Run: ``python examples/seed_experiments.py`` (about half a minute on 2 CPU cores), then
``tensorboard --logdir runs/seeds``: the Images tab holds each run's ``grad_flow/heatmap``
and ``grad_flow/profile`` and the summary run's ``seeds/gradient_vs_depth`` and
``seeds/gradient_vs_length``; the Text tab the alarm's findings and a table of the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientNormLogger, VanishExplodeAlarm

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
#: the steps whose content decides the label of a sequence (and that ``net.early`` encodes)
EARLY_STEPS = 4
#: the seeds' rule of thumb: an input-side gradient norm below this is suspect of vanishing
VANISH_HINT = 1e-5


# --------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------


def rings(n: int = 2048, seed: int = 0) -> TensorDataset:
    """Points in the plane, labelled by whether they lie outside the median radius (a non-linear task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x.norm(dim=1) > math.sqrt(2 * math.log(2))).long()
    return TensorDataset(x, y)


def early_signal(length: int, n: int = 1024, features: int = 4, seed: int = 0) -> TensorDataset:
    """Noise sequences labelled by the sign of their first feature summed over the first steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g)
    y = (x[:, :EARLY_STEPS, 0].sum(dim=1) > 0).long()
    return TensorDataset(x, y)


class DeepMLP(nn.Module):
    """``depth`` linear layers: a stem, ``depth - 2`` hidden blocks, a head; plain or residual blocks."""

    def __init__(self, activation: str, residual: bool, depth: int, width: int = 32):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.residual = residual
        self.stem = nn.Linear(2, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.head = nn.Linear(width, 2)
        for linear in self.blocks:  # the initialisation the seeds recommend for each activation
            if activation == "relu":
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            else:
                nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.branch_scale = 1.0 / math.sqrt(max(1, depth - 2))

    def forward(self, x):
        h = self.stem(x)
        for linear in self.blocks:
            h = h + self.branch_scale * self.act(linear(h)) if self.residual else self.act(linear(h))
        return self.head(h)


class ProbedRNN(nn.Module):
    """A plain tanh ``nn.RNN`` whose input encoder is split: ``early`` for the first steps, ``recent`` for the rest."""

    def __init__(self, features: int = 4, embed: int = 8, hidden: int = 32):
        super().__init__()
        self.early = nn.Linear(features, embed)
        self.recent = nn.Linear(features, embed)
        self.recent.load_state_dict(self.early.state_dict())  # the same weights: only the position differs
        self.rnn = nn.RNN(embed, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        u = torch.cat([self.early(x[:, :EARLY_STEPS]), self.recent(x[:, EARLY_STEPS:])], dim=1)
        _, h = self.rnn(u)
        return self.head(h[-1])


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3):
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def layer_names(module: Classifier) -> list[str]:
    """The modules that own parameters, as the logger names them (``group_by="module"``), input side first.

    The models above register their modules in the order they run, so registration order is forward order.
    """
    return [name for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One trained model: where its logs are, its layers in forward order, what the logs and the alarm say."""

    name: str
    log_dir: str
    layers: list[str]
    alarm: VanishExplodeAlarm
    seconds: float
    norms: dict[str, float] = field(default_factory=dict)  # layer -> gradient norm at the last logged step
    step: int = -1
    loss: float = math.nan

    @property
    def first(self) -> float:
        return self.norms.get(self.layers[0], math.nan)

    @property
    def last(self) -> float:
        return self.norms.get(self.layers[-1], math.nan)

    def alarm_line(self) -> str:
        found = [f"{f.kind} at step {f.step}" for f in self.alarm.findings]
        return ", ".join(found) or "nothing"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep Lightning's per-fit chatter and the alarm's printed warnings off the console.

    The findings are not lost: they are in the Text tab and in ``alarm.findings``, which the
    script prints in one line per run.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"\[gradguard\]")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def train(run_name: str, net: nn.Module, data: TensorDataset, logdir: str, steps: int, every: int, seed: int) -> Run:
    """Train ``net`` for ``steps`` optimizer steps with the logger and the alarm; its logs go to ``logdir/run_name``."""
    module = Classifier(net)
    logger = TensorBoardLogger(logdir, name=run_name, version="", default_hp_metric=False)
    alarm = VanishExplodeAlarm(patience=max(2, min(20, steps // 3)))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        log_every_n_steps=every,
        callbacks=[GradientNormLogger(flow_every_n_steps=steps), alarm],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    pl.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))
    run = Run(run_name, logger.log_dir, layer_names(module), alarm, time.perf_counter() - start)
    read_back(run)
    return run


def read_back(run: Run) -> None:
    """The per-layer gradient norms and the loss at the last logged step, from the run's event files."""
    files = glob.glob(os.path.join(run.log_dir, "events.out.tfevents.*"))
    if not files:
        raise RuntimeError(f"no TensorBoard event file in {run.log_dir}")
    acc = EventAccumulator(run.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for layer in run.layers:
        tag = f"grad_norm/{layer}"
        if tag in tags:
            last = acc.Scalars(tag)[-1]
            run.norms[layer], run.step = last.value, max(run.step, last.step)
    if "train/loss" in tags:
        run.loss = acc.Scalars("train/loss")[-1].value


# --------------------------------------------------------------------------------------
# the summary figures
# --------------------------------------------------------------------------------------


def _positive(values: Sequence[float]) -> list[float]:
    """Norms for a log axis: 0 (float32 underflow) and non-finite values become gaps."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def depth_figure(runs: Sequence[Run]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.0), dpi=100)
    ax = fig.add_subplot()
    colours = {"sigmoid": "tab:red", "tanh": "tab:orange", "relu": "tab:blue"}
    for run in runs:
        activation, kind = run.name.split("/")[-1].split("_")
        ys = _positive([run.norms.get(layer, math.nan) for layer in run.layers])
        ax.semilogy(
            range(1, len(ys) + 1),
            ys,
            color=colours[activation],
            linestyle="-" if kind == "plain" else "--",
            marker="o" if kind == "plain" else None,
            markersize=3,
            label=f"{activation}, {kind}",
        )
    ax.axhline(VANISH_HINT, color="grey", linewidth=0.8, linestyle=":")
    ax.text(1, VANISH_HINT, " 1e-5: suspect vanishing below", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("layer (1 = input side)")
    ax.set_ylabel("gradient L2 norm (log scale)")
    step = max(run.step for run in runs)
    ax.set_title(f"Gradient vs depth: {len(runs[0].layers)}-layer MLPs, per-layer norm at step {step}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    fig.tight_layout()
    return fig


def length_figure(runs: Sequence[Run], lengths: Sequence[int]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    ax = fig.add_subplot()
    early = _positive([run.norms.get("net.early", math.nan) for run in runs])
    recent = _positive([run.norms.get("net.recent", math.nan) for run in runs])
    ax.semilogy(lengths, early, "o-", color="tab:red", label=f"net.early (the first {EARLY_STEPS} steps)")
    ax.semilogy(lengths, recent, "s--", color="tab:blue", label="net.recent (the other steps)")
    ax.axhline(VANISH_HINT, color="grey", linewidth=0.8, linestyle=":")
    ax.text(lengths[0], VANISH_HINT, " 1e-5", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("gradient L2 norm (log scale)")
    ax.set_title("Gradient vs sequence length: plain tanh nn.RNN, input encoder's norm")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _ratio(numerator: float, denominator: float) -> str:
    if denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator):
        return f"{numerator / denominator:.1e}"
    return "inf" if numerator > 0 else "nan"


def tables(depth_runs: Sequence[Run], length_runs: Sequence[Run], lengths: Sequence[int]) -> tuple[str, str]:
    """The numbers as a plain text table (stdout) and as markdown (the summary run's Text tab)."""
    text = [
        f"gradient vs depth ({len(depth_runs[0].layers)}-layer MLPs, last logged step): "
        "|grad| of the first layer (net.stem) and of the last (net.head)",
        f"  {'run':15s} {'first':>9s} {'last':>9s} {'last/first':>10s} {'loss':>6s}  alarm",
    ]
    md = ["| run | first layer | last layer | last/first | loss | alarm |", "|---|---|---|---|---|---|"]
    for run in depth_runs:
        short = run.name.split("/")[-1]
        ratio = _ratio(run.last, run.first)
        text.append(f"  {short:15s} {run.first:9.2e} {run.last:9.2e} {ratio:>10s} {run.loss:6.3f}  {run.alarm_line()}")
        md.append(f"| {short} | {run.first:.2e} | {run.last:.2e} | {ratio} | {run.loss:.3f} | {run.alarm_line()} |")
    text += [
        "",
        f"gradient vs sequence length (tanh nn.RNN): |grad| of the encoder of the first {EARLY_STEPS} steps "
        "(net.early) and of the others (net.recent)",
        f"  {'T':>5s} {'early':>9s} {'recent':>9s} {'recent/early':>12s} {'loss':>6s}  alarm",
    ]
    md += ["", "| T | net.early | net.recent | recent/early | loss | alarm |", "|---|---|---|---|---|---|"]
    for length, run in zip(lengths, length_runs):
        early, recent = run.norms.get("net.early", math.nan), run.norms.get("net.recent", math.nan)
        ratio = _ratio(recent, early)
        text.append(f"  {length:5d} {early:9.2e} {recent:9.2e} {ratio:>12s} {run.loss:6.3f}  {run.alarm_line()}")
        md.append(f"| {length} | {early:.2e} | {recent:.2e} | {ratio} | {run.loss:.3f} | {run.alarm_line()} |")
    return "\n".join(text), "\n".join(md)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, list[Run]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default="runs/seeds", help="where TensorBoard logs go (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=30, help="linear layers per MLP (default: %(default)s)")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[10, 20, 50, 100],
        help="RNN sequence lengths (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.depth < 3 or min(args.lengths) <= EARLY_STEPS:
        parser.error(f"need --steps >= 1, --depth >= 3 and every length > {EARLY_STEPS}")
    lengths = sorted(set(args.lengths))
    every = max(1, args.steps // 10)  # about ten logged steps per run: the heatmaps' columns

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast and leaves the other cores alone
    start = time.perf_counter()
    try:
        with _quiet():
            depth_runs = []
            for activation in ACTIVATIONS:
                for residual in (False, True):
                    name = f"depth/{activation}_{'residual' if residual else 'plain'}"
                    pl.seed_everything(args.seed, verbose=False)
                    net = DeepMLP(activation, residual, args.depth)
                    depth_runs.append(
                        train(name, net, rings(seed=args.seed), args.logdir, args.steps, every, args.seed)
                    )
                    print(f"[{name}] {depth_runs[-1].seconds:.1f} s", flush=True)
            length_runs = []
            for length in lengths:
                name = f"length/T{length:03d}"
                pl.seed_everything(args.seed, verbose=False)
                data = early_signal(length, seed=args.seed)
                length_runs.append(train(name, ProbedRNN(), data, args.logdir, args.steps, every, args.seed))
                print(f"[{name}] {length_runs[-1].seconds:.1f} s", flush=True)
    finally:
        torch.set_num_threads(threads)

    text, markdown = tables(depth_runs, length_runs, lengths)
    summary_dir = os.path.join(args.logdir, "summary")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(summary_dir) as writer:
        step = max(run.step for run in depth_runs + length_runs)
        try:
            writer.add_figure("seeds/gradient_vs_depth", depth_figure(depth_runs), step)
            writer.add_figure("seeds/gradient_vs_length", length_figure(length_runs, lengths), step)
        except ImportError:
            print('(no summary figures: matplotlib is not installed; pip install "lightning-gradguard[plots]")')
        writer.add_text("seeds/numbers", markdown, step)

    print(f"\n{text}\n")
    print(
        f"Done in {time.perf_counter() - start:.0f} s. TensorBoard logs: {os.path.abspath(args.logdir)}\n"
        f"Open them with:  tensorboard --logdir {args.logdir}   (then http://localhost:6006)\n"
        "  Images: each run's grad_flow/heatmap and grad_flow/profile (input side first);\n"
        "          summary: seeds/gradient_vs_depth and seeds/gradient_vs_length\n"
        "  Text:   alarm/findings and alarm/summary per run, seeds/numbers (the tables above)"
    )
    return {"depth": depth_runs, "length": length_runs}


if __name__ == "__main__":
    main()
