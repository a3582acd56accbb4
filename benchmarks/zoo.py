"""A public zoo of failing and healthy trainings for ``VanishExplodeAlarm``, with a naive baseline.

Every case is a real ``Trainer.fit`` on CPU (small models, synthetic data), run for a
few seeds with the alarm at its defaults (``explode_action="warn"``, so that a diverging
run goes on to its first non-finite gradient and the lead time can be measured; the
non-finite step itself halts the run). Beside the alarm, a recorder keeps every step's
per-layer gradient norms on the host, and the seed documents' naive rules are evaluated
on them:

* naive vanishing: the first layer *in registration order* has a gradient norm < 1e-5;
* naive exploding: some layer has a gradient norm > 100.

Reported per case (over its seeds): caught (the expected kind flagged by the defaults),
the kinds flagged, the first layers the finding names, the lead time (steps between the
first ``exploding`` report and the first non-finite gradient, for runs that diverge), and
the false alarms (kinds flagged that the case should not raise; on a healthy case, every
flag is one). The same for the naive rules. It also records, per run, the largest share
of a layer's units with an exactly-zero gradient for ``dead_patience`` steps in a row
(the measurement behind ``dead_unit_share``) and the largest run of geometric growth of
the total norm (behind ``growth_total``).

Usage::

    python benchmarks/zoo.py                     # every case, 2 seeds (~6-9 min on 2 CPU cores)
    python benchmarks/zoo.py --seeds 3 --json zoo.json
    python benchmarks/zoo.py --cases dying_relu_mlp,gpt_preln_warmup --seeds 1
    python benchmarks/zoo.py --report zoo.json    # print a saved run's tables again
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import VanishExplodeAlarm
from lightning_gradguard.stats import Grouping, ParamSet, take_snapshot

NAIVE_VANISH = 1e-5
NAIVE_EXPLODE = 100.0


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def spirals(n: int = 1024, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    t = torch.sqrt(torch.rand(n // 2, generator=g)) * 3 * math.pi
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (3 * math.pi)
    x = torch.cat([arm, -arm]) + 0.05 * torch.randn(n, 2, generator=g)
    y = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    return TensorDataset(x, y)


def regression(n: int = 1024, d: int = 16, seed: int = 0, noise: float = 0.1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    return TensorDataset(x, torch.tanh(x @ w) + noise * torch.randn(n, 1, generator=g))


def images(n: int = 512, seed: int = 0) -> TensorDataset:
    """16x16 RGB images whose class (of 4) is the quadrant holding a bright blob."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, r * 8 + 2 : r * 8 + 6, c * 8 + 2 : c * 8 + 6] += 1.0
    return TensorDataset(x, y)


def sequences(n: int = 512, length: int = 20, d: int = 8, seed: int = 0) -> TensorDataset:
    """Sequences whose target is the sum of the first feature over time (a memory task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, d, generator=g)
    return TensorDataset(x, x[:, :, :1].sum(1) / math.sqrt(length))


def tokens(n: int = 256, length: int = 16, vocab: int = 64, seed: int = 0) -> TensorDataset:
    """Token sequences from a noisy +1 rule: next = current + 1 (mod vocab) most of the time."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % vocab
    noise = torch.rand(n, length + 1, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, vocab, (n, length + 1), generator=g), seq)
    return TensorDataset(seq[:, :-1], seq[:, 1:])


def bags(n: int = 1024, vocab: int = 5000, seed: int = 0) -> TensorDataset:
    """Bags of 8 token ids from a large vocabulary; the class is whether most ids are even."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, 8), generator=g)
    return TensorDataset(ids, ((ids % 2 == 0).sum(1) > 4).long())


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def mlp(widths: list[int], act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.fc(self.norm(x)))


class HeadFirst(nn.Module):
    """The head is registered before the body it follows (registration order != execution order)."""

    def __init__(self, body: nn.Module, width: int, out: int):
        super().__init__()
        self.head = nn.Linear(width, out)
        self.body = body

    def forward(self, x):
        return self.head(self.body(x))


class ResNetBN(nn.Module):
    def __init__(self, channels: int = 16, blocks: int = 3, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            for _ in range(blocks)
        )
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


class PlainCNN(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class TinyGPT(nn.Module):
    """Pre-LN decoder-only LM (causal mask), output projection tied to the embedding."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 4, length: int = 16):
        super().__init__()
        self.head = nn.Linear(d, vocab, bias=False)  # registered first, runs last
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(length, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head.weight = self.emb.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))


class Recurrent(nn.Module):
    def __init__(self, kind: str, d: int = 8, hidden: int = 32, layers: int = 1, **kw: Any):
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](d, hidden, layers, batch_first=True, **kw)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.out(y[:, -1])


class SparseBag(nn.Module):
    def __init__(self, vocab: int = 5000, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, sparse=True)
        self.fc = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


class TwoHeads(nn.Module):
    """A shared trunk; ``rare`` is used on one step in ``every`` only."""

    def __init__(self, every: int = 25):
        super().__init__()
        self.trunk = mlp([2, 64, 64])
        self.common = nn.Linear(64, 2)
        self.rare = nn.Linear(64, 2)
        self.every = every
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.trunk(x))
        out = self.common(h)
        return out + self.rare(h) if self.calls % self.every == 0 else out


def scaled_init(model: nn.Module, gain: float) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=gain / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------------------
# LightningModule and cases
# --------------------------------------------------------------------------------------


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: str, opt: Callable[[Any], torch.optim.Optimizer], **kw: Any):
        super().__init__()
        self.net = net
        self.loss_kind = loss
        self.make_opt = opt
        self.sched: Callable[[int], float] | None = kw.get("sched")
        self.loss_scale: float = kw.get("loss_scale", 1.0)
        self.on_step: Callable[[Task, int], None] | None = kw.get("on_step")

    def training_step(self, batch, batch_idx):
        if self.on_step is not None:
            self.on_step(self, self.trainer.global_step)
        x, y = batch
        out = self.net(x)
        if self.loss_kind == "ce":
            loss = nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())
        else:
            loss = nn.functional.mse_loss(out, y)
        return loss * self.loss_scale

    def configure_optimizers(self):
        opt = self.make_opt(self.net.parameters())
        if self.sched is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, self.sched), "interval": "step"},
        }


def adam(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.Adam(p, lr=lr)


def sgd(lr: float, momentum: float = 0.0) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum)


@dataclass
class Case:
    name: str
    expected: str | None  # the kind the case should raise; None: healthy
    build: Callable[[int], tuple[Task, TensorDataset]]
    steps: int
    batch: int = 64
    fp16: bool = False
    note: str = ""
    reg_ne_exec: bool = False


def _freeze_then_unfreeze(task: Task, step: int) -> None:
    backbone = task.net[0]
    backbone.requires_grad_(step >= 60)


def _prune(net: nn.Module) -> nn.Module:
    from torch.nn.utils import prune

    prune.ln_structured(net[2], "weight", amount=0.6, n=2, dim=0)  # 60% of the units of the middle layer masked
    return net


CASES: list[Case] = [
    # ---- failing
    Case(
        "deep_sigmoid_mlp",
        "vanishing",
        lambda s: (Task(mlp([2] + [32] * 19 + [2], nn.Sigmoid), "ce", adam(1e-3)), spirals(seed=s)),
        steps=80,
        note="20 sigmoid layers, default init",
    ),
    Case(
        "deep_tanh_small_init",
        "vanishing",
        lambda s: (Task(scaled_init(mlp([2] + [32] * 15 + [2], nn.Tanh), 0.5), "ce", adam(1e-3)), spirals(seed=s)),
        steps=80,
        note="16 tanh layers, weights std 0.5/sqrt(fan_in)",
    ),
    Case(
        "head_first_sigmoid",
        "vanishing",
        lambda s: (Task(HeadFirst(mlp([2] + [32] * 12, nn.Sigmoid), 32, 2), "ce", adam(1e-3)), spirals(seed=s)),
        steps=80,
        note="12 sigmoid layers, head registered first",
        reg_ne_exec=True,
    ),
    Case(
        "dying_relu_mlp",
        "dead",
        lambda s: (Task(mlp([16, 64, 64, 64, 1]), "mse", sgd(0.5)), regression(seed=s, noise=1.0)),
        steps=120,
        note="ReLU MLP, SGD lr 0.5",
    ),
    Case(
        "dying_relu_cnn",
        "dead",
        lambda s: (Task(PlainCNN(), "ce", adam(0.05)), images(seed=s)),
        steps=80,
        batch=32,
        note="3-conv ReLU CNN, Adam lr 0.05",
    ),
    Case(
        "relu_rnn_diverges",
        "exploding",
        lambda s: (Task(Recurrent("rnn", nonlinearity="relu"), "mse", sgd(0.1)), sequences(seed=s)),
        steps=250,
        note="ReLU nn.RNN, length 20, SGD lr 0.1",
    ),
    Case(
        "lr_ramp_mlp",
        "exploding",
        lambda s: (Task(mlp([16, 64, 64, 1]), "mse", sgd(0.01), sched=lambda i: 1.25**i), regression(seed=s)),
        steps=120,
        note="learning rate x1.25 per step",
    ),
    Case(
        "lstm_lr_ramp",
        "exploding",
        lambda s: (Task(Recurrent("lstm"), "mse", sgd(0.05), sched=lambda i: 1.3**i), sequences(seed=s)),
        steps=120,
        note="LSTM, learning rate x1.3 per step",
    ),
    Case(
        "deep_relu_large_init",
        "exploding",
        lambda s: (Task(scaled_init(mlp([16] + [64] * 12 + [1]), 2.6), "mse", sgd(1e-4)), regression(seed=s)),
        steps=40,
        note="13 ReLU layers, weights std 2.6/sqrt(fan_in): grows toward the input",
    ),
    Case(
        "fp16_lr_ramp",
        "exploding",
        lambda s: (Task(mlp([16, 64, 64, 1]), "mse", sgd(0.01), sched=lambda i: 1.25**i), regression(seed=s)),
        steps=120,
        fp16=True,
        note="fp16 AMP (GradScaler), learning rate x1.25 per step",
    ),
    # ---- healthy
    Case(
        "residual_relu_mlp",
        None,
        lambda s: (
            Task(
                nn.Sequential(nn.Linear(2, 32), *[Residual(32) for _ in range(8)], nn.Linear(32, 2)), "ce", adam(1e-3)
            ),
            spirals(seed=s),
        ),
        steps=200,
    ),
    Case("resnet_bn_cnn", None, lambda s: (Task(ResNetBN(), "ce", sgd(0.05, 0.9)), images(seed=s)), steps=80, batch=32),
    Case(
        "gpt_preln_warmup",
        None,
        lambda s: (
            Task(TinyGPT(), "ce", lambda p: torch.optim.AdamW(p, lr=3e-3), sched=lambda i: min(1.0, (i + 1) / 20)),
            tokens(seed=s),
        ),
        steps=100,
        batch=32,
        note="pre-LN, tied head registered first, 20 warm-up steps",
        reg_ne_exec=True,
    ),
    Case(
        "lstm_memory",
        None,
        lambda s: (Task(Recurrent("lstm", layers=2), "mse", adam(3e-3)), sequences(seed=s)),
        steps=150,
    ),
    Case("gru_memory", None, lambda s: (Task(Recurrent("gru"), "mse", adam(3e-3)), sequences(seed=s)), steps=150),
    Case(
        "sparse_embedding",
        None,
        lambda s: (Task(SparseBag(), "ce", sgd(0.5)), bags(seed=s)),
        steps=150,
        note="nn.Embedding(sparse=True), 5000 ids",
    ),
    Case(
        "finetune_frozen_then_unfrozen",
        None,
        lambda s: (
            Task(
                nn.Sequential(mlp([2, 64, 64]), nn.ReLU(), nn.Linear(64, 2)),
                "ce",
                adam(1e-3),
                on_step=_freeze_then_unfreeze,
            ),
            spirals(seed=s),
        ),
        steps=150,
        note="backbone frozen for 60 steps",
    ),
    Case(
        "rarely_used_head",
        None,
        lambda s: (Task(TwoHeads(), "ce", adam(1e-3)), spirals(seed=s)),
        steps=150,
        note="a head used 1 step in 25",
    ),
    Case(
        "head_first_residual",
        None,
        lambda s: (
            Task(
                HeadFirst(nn.Sequential(nn.Linear(2, 32), *[Residual(32) for _ in range(8)]), 32, 2), "ce", adam(1e-3)
            ),
            spirals(seed=s),
        ),
        steps=150,
        reg_ne_exec=True,
    ),
    Case(
        "fp16_mlp",
        None,
        lambda s: (Task(mlp([16, 64, 64, 1]), "mse", adam(1e-3)), regression(seed=s)),
        steps=100,
        fp16=True,
    ),
    Case(
        "converged_regression",
        None,
        lambda s: (Task(mlp([16, 32, 1]), "mse", adam(1e-2)), regression(seed=s, noise=0.0)),
        steps=600,
        batch=256,
        note="trained to ~0 loss",
    ),
    Case(
        "large_loss_adam",
        None,
        lambda s: (Task(mlp([16, 64, 64, 1]), "mse", adam(1e-3), loss_scale=1000.0), regression(seed=s)),
        steps=150,
        note="loss x1000 under Adam",
    ),
    Case(
        "pruned_units",
        None,
        lambda s: (Task(_prune(mlp([16, 64, 64, 1])), "mse", adam(1e-3)), regression(seed=s)),
        steps=150,
        note="60% of a layer's rows pruned (torch prune)",
    ),
    Case(
        "relu_mlp_he_adam",
        None,
        lambda s: (Task(mlp([16, 128, 128, 128, 1]), "mse", adam(1e-3)), regression(seed=s)),
        steps=200,
    ),
]


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


class Recorder(pl.Callback):
    """Before the alarm: per-step layer norms (host) and the naive rules; after it: unit shares and growth runs."""

    def __init__(self, alarm: VanishExplodeAlarm):
        self.alarm = alarm
        self.first_nonfinite: int | None = None
        self.naive: dict[str, int | None] = {"vanishing": None, "exploding": None}
        self.naive_first_layer: str | None = None
        self.max_unit_share = 0.0
        self.max_growth = 1.0
        self.max_ratio = 0.0
        self._params: ParamSet | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if self._params is None:
            self._params = ParamSet.from_module(pl_module, include_frozen=True)
            self._grouping = Grouping.build(self._params, order=None)  # registration order: the naive view
        snap = take_snapshot(self._params)
        host = snap.grouped(self._grouping).to_host()
        present = [n for n, p in zip(self._grouping.names, snap.grouped(self._grouping).present) if p]
        if not host.all_finite and self.first_nonfinite is None:
            self.first_nonfinite = step
        if present and host.all_finite:
            first = present[0]
            if host.group_norms[first] < NAIVE_VANISH and self.naive["vanishing"] is None:
                self.naive["vanishing"], self.naive_first_layer = step, first
            if max(host.group_norms[n] for n in present) > NAIVE_EXPLODE and self.naive["exploding"] is None:
                self.naive["exploding"] = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        detector = self.alarm.detectors.get(0)
        if detector is not None:
            shares = detector.dead_unit_shares()
            if shares.numel():
                self.max_unit_share = max(self.max_unit_share, float(shares.max()))
            self.max_growth = max(self.max_growth, math.exp(float(detector.growth())))
            ratio = float(detector.deep_shallow_ratio())
            if math.isfinite(ratio) and self.first_nonfinite is None:  # until the run breaks
                self.max_ratio = max(self.max_ratio, ratio)


@dataclass
class Run:
    case: str
    seed: int
    steps: int
    first: dict[str, int | None]
    layers: list[str]
    toward_input: bool | None
    first_nonfinite: int | None
    naive: dict[str, int | None]
    max_unit_share: float
    max_growth: float
    max_ratio: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_case(case: Case, seed: int, **alarm_args: Any) -> Run:
    pl.seed_everything(seed, verbose=False)
    task, data = case.build(seed)
    alarm = VanishExplodeAlarm(**alarm_args)
    rec = Recorder(alarm)
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if case.fp16 else []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=case.steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[rec, alarm],  # the recorder sees the gradients before the alarm may drop them
            plugins=plugins,
            default_root_dir=tmp,
            max_epochs=-1,
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(task, DataLoader(data, batch_size=case.batch, shuffle=True))
        seconds = time.perf_counter() - start
    expected = case.expected
    finding = next((f for f in alarm.findings if f.kind == expected), None)
    return Run(
        case=case.name,
        seed=seed,
        steps=alarm.steps_checked,
        first=dict(alarm.first_step),
        layers=[n for n, _ in finding.layers[:3]] if finding else [],
        # a depth problem: growth toward the input, or an explosion before any update
        toward_input=(finding.toward_input or "before any update" in finding.summary)
        if finding is not None and expected == "exploding"
        else None,
        # the alarm's own non-finite report: a NaN/Inf gradient or loss (the recorder sees gradients only); under
        # fp16 an overflow step is routine (the scaler skips it) and the failure is the persistent one
        first_nonfinite=alarm.first_step["nonfinite"],
        naive=rec.naive,
        max_unit_share=rec.max_unit_share,
        max_growth=rec.max_growth,
        max_ratio=rec.max_ratio,
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

_KINDS = ("vanishing", "exploding", "dead", "nonfinite")


def _flagged(first: dict[str, int | None]) -> list[str]:
    return [k for k in _KINDS if first.get(k) is not None]


def _lead(first_explode: int | None, nonfinite: int | None) -> str:
    if nonfinite is None:
        return "no NaN"
    if first_explode is None:
        return "none"
    return str(nonfinite - first_explode)


def table(runs: list[dict[str, Any]]) -> str:
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_case.setdefault(r["case"], []).append(r)
    cases = {c.name: c for c in CASES}
    head = (
        "| case | expected | seeds | defaults: caught | kinds flagged | first layers named | lead time "
        "(steps) | false alarms | naive: caught | naive lead time | naive false alarms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, rs in by_case.items():
        case = cases.get(name)
        expected = case.expected if case else None
        caught = sum(expected is not None and r["first"].get(expected) is not None for r in rs)
        kinds = sorted({k for r in rs for k in _flagged(r["first"])})
        names = next((r["layers"] for r in rs if r["layers"]), [])
        if any(r.get("toward_input") for r in rs):
            names = [*names, "(depth problem)"]
        lead = (
            ", ".join(_lead(r["first"].get("exploding"), r["first_nonfinite"]) for r in rs)
            if expected == "exploding"
            else "—"
        )
        if expected is None:
            false = sum(bool(_flagged(r["first"])) for r in rs)
        else:
            # a non-finite report is the end of a diverging run, not a false alarm
            # a dead layer's zero gradient also makes the deep/shallow ratio infinite: vanishing is no false alarm there
            allowed = {expected, "nonfinite"} if expected == "exploding" else {expected, "vanishing"}
            false = sum(bool(set(_flagged(r["first"])) - allowed) for r in rs)
        n_exp = "exploding" if expected == "exploding" else expected
        naive_caught = sum(n_exp in ("vanishing", "exploding") and r["naive"].get(n_exp) is not None for r in rs)
        naive_lead = (
            ", ".join(_lead(r["naive"].get("exploding"), r["first_nonfinite"]) for r in rs)
            if expected == "exploding"
            else "—"
        )
        naive_allowed = {expected, "vanishing"} if expected else set()
        naive_false = sum(bool({k for k, v in r["naive"].items() if v is not None} - naive_allowed) for r in rs)
        rows.append(
            f"| {name}{' *' if case and case.reg_ne_exec else ''} | {expected or 'healthy'} | {len(rs)} | "
            f"{caught}/{len(rs) if expected else 0} | {', '.join(kinds) or '—'} | "
            f"{', '.join(n if n.startswith('(') else '`' + n + '`' for n in names) or '—'} | {lead} | "
            f"{false}/{len(rs)} | "
            f"{(str(naive_caught) + '/' + str(len(rs))) if expected in ('vanishing', 'exploding') else 'n/a'} | "
            f"{naive_lead} | {naive_false}/{len(rs)} |"
        )
    return "\n".join(rows)


def measures(runs: list[dict[str, Any]]) -> str:
    rows = [
        "| case | expected | max dead-unit share (per run) | max geometric growth run (per run) "
        "| max deep/shallow ratio, median of `patience` steps (per run) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    cases = {c.name: c for c in CASES}
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_case.setdefault(r["case"], []).append(r)
    for name, rs in by_case.items():
        exp = cases[name].expected if name in cases else None
        rows.append(
            f"| {name} | {exp or 'healthy'} | {', '.join(format(r['max_unit_share'], '.2f') for r in rs)} | "
            f"{', '.join(format(r['max_growth'], '.3g') for r in rs)} | "
            f"{', '.join(format(r.get('max_ratio', math.nan), '.3g') for r in rs)} | "
            f"{sum(r['seconds'] for r in rs):.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a saved --json run")
    parser.add_argument("--dead-patience", type=int, default=None, help="the alarm's dead_patience (default: its own)")
    args = parser.parse_args(argv)
    if args.report is not None:
        runs = json.loads(args.report.read_text())["runs"]
    else:
        torch.set_num_threads(1)
        os.environ.setdefault("PL_DISABLE_FORK", "1")
        wanted = set(args.cases.split(",")) if args.cases else None
        runs = []
        for case in CASES:
            if wanted is not None and case.name not in wanted:
                continue
            for seed in range(args.seeds):
                extra = {} if args.dead_patience is None else {"dead_patience": args.dead_patience}
                r = run_case(case, seed, **extra)
                runs.append(r.__dict__)
                print(
                    f"{case.name:32s} seed {seed}: flagged {_flagged(r.first)} first {r.first} nonfinite "
                    f"{r.first_nonfinite} naive {r.naive} units {r.max_unit_share:.2f} growth {r.max_growth:.3g} "
                    f"layers {r.layers} ({r.seconds:.1f} s)",
                    flush=True,
                )
        if args.json is not None:
            args.json.write_text(json.dumps({"seeds": args.seeds, "runs": runs}, indent=1))
    print()
    print(table(runs))
    print()
    print(measures(runs))


if __name__ == "__main__":
    main()
