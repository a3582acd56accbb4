"""Which clipping defaults never lose to a fixed clip? Nine small tasks, several seeds, every setting.

Each task trains a small model on CPU for ``--steps`` optimizer steps (default 300) and
reports a *final loss* on clean held-out data. A run *diverged* when its training loss
became non-finite, its weights are not finite, or its final loss is above the task's
``baseline`` (the loss of the trivial answer: predicting 0 for the regressions, the
uniform distribution for the language model).

Tasks:

* ``healthy``: a tanh MLP regresses a random teacher with light Gaussian noise, SGD +
  momentum, lr 0.01; nothing to clip (ordinary norms 3-10). Clipping should stay out of the way.
* ``calm``: the same at 1/20 of the scale with lr 0.2: ordinary norms 0.03-0.4, below any
  ceiling of 1, where only a learned threshold can act.
* ``heavy_tail``: the same regression with Student-t target noise (2 degrees of freedom,
  infinite variance), so a few batches carry gradients 10-100x the usual ones.
* ``corrupt``: the same regression, clean, except two batches whose targets are
  multiplied by 1000: one at step 3 (inside any warm-up) and one at step 120.
* ``spikes``: ``examples/clipping.py``'s task: 2% of the batches corrupted (x1000).
* ``rnn``: ``examples/clipping.py``'s IRNN on 50-step sequences, lr 0.01: every step is
  explosive (without clipping the loss is NaN within three steps).
* ``lm``: a 2-layer post-LN transformer language model (d 64, 4 heads) on sequences from
  a fixed random sparse Markov chain (3 likely successors per token), Adam at lr 3e-2 (a
  high one: per-seed results scatter), no warm-up.
* ``lm_warmup``: the same with a 30-step linear learning-rate warm-up.
* ``fp16``: the ``healthy`` regression in real fp16 autocast with a ``GradScaler`` on CPU
  (initial scale 2**24, growth every 20 steps), so that some steps overflow: their
  gradients are inf/NaN and the scaler skips them. A clipper must ignore those steps.

Settings (``--settings``, comma-separated names of :data:`SETTINGS`): ``none``;
``clip1`` (``Trainer(gradient_clip_val=1.0)``); ``zclip`` (ZClip 1.0.0's
``ZClipLightningCallback()`` at its defaults, from the ``bench`` extra); ``autoclip``
(``AdaptiveClipper(mode="percentile", warmup_steps=0, max_norm=math.inf)``: AutoClip's
10th percentile of the history, no warm-up, no ceiling); ``old_default``
(``AdaptiveClipper()`` as it was before issue 13: zscore, 25 warm-up steps that clip
nothing, no ceiling); ``default`` (``AdaptiveClipper()`` today: zscore, ``max_norm=1.0``,
``warmup_factor=10``); ``zscore_free`` (today's zscore without the ceiling,
``max_norm=math.inf``); ``percentile`` (``AdaptiveClipper(mode="percentile")``, with the
same ceiling and warm-up); ``skip`` (``AdaptiveClipper(skip_factor=10)``, at most 3 skips
in a row); ``old_skip`` (the old default with ``skip_factor=10`` and unbounded skipping);
``agc`` (``AdaptiveClipper(mode="agc")``).

The last row of the table judges ``--focus`` (default ``default``) by the issue's bar:
no more diverged runs than the better of ``clip1``/``zclip``, and a median final loss
within 10% of the better of their medians (``ok``), or by how much it is worse.

Usage::

    python benchmarks/bench_clipping_tasks.py                       # all: ~7 min on one CPU core
    python benchmarks/bench_clipping_tasks.py --tasks rnn,lm --settings clip1,zclip,default
    python benchmarks/bench_clipping_tasks.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from clipping import BATCH, SequenceSum, SpikyRegression  # noqa: E402

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper  # noqa: E402

try:
    from zclip import ZClipLightningCallback
except Exception:  # the bench extra is not installed
    ZClipLightningCallback = None


# --------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------


class Task(pl.LightningModule):
    """A model, its data and its held-out loss; subclasses fill in the details."""

    lr = 0.01

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        value = loss.item()
        self.losses.append(value)
        if not math.isfinite(value):  # nothing recovers from NaN weights
            self.trainer.should_stop = True
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def data(self, steps: int, seed: int) -> tuple[TensorDataset, TensorDataset, float]:
        """Training set (``steps`` batches), clean held-out set, and the baseline loss."""
        raise NotImplementedError

    def precision(self) -> dict[str, Any]:
        return {}


class Regression(Task):
    """A 16-64-64-1 tanh MLP regressing a fixed random teacher (targets of variance ~10)."""

    lr = 0.01
    D = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(self.D, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def teacher(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(77)
        w1 = torch.randn(self.D, 32, generator=g) / math.sqrt(self.D)
        w2 = torch.randn(32, 1, generator=g) * 5 / math.sqrt(32)
        x = torch.randn(n, self.D, generator=torch.Generator().manual_seed(seed))
        return x, torch.tanh(x @ w1) @ w2

    def noise(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        return y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 7))

    def data(self, steps: int, seed: int) -> tuple[TensorDataset, TensorDataset, float]:
        x, y = self.teacher(BATCH * steps, seed)
        xv, yv = self.teacher(1024, 10_000 + seed)
        return TensorDataset(x, self.noise(y, seed)), TensorDataset(xv, yv), (yv**2).mean().item()


class Calm(Regression):
    """``healthy`` at 1/20 of the scale (targets and noise), lr x20: ordinary norms below 1."""

    lr = 0.2

    def teacher(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().teacher(n, seed)
        return x, y / 20.0

    def noise(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        return y + 0.015 * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 7))


class HeavyTail(Regression):
    def noise(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 7)
        return y + torch.distributions.StudentT(2.0).sample(y.shape)


class Corrupt(Regression):
    BAD_STEPS = (3, 120)

    def noise(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        y = super().noise(y, seed)
        for step in self.BAD_STEPS:
            if (step + 1) * BATCH <= y.shape[0]:
                y[step * BATCH : (step + 1) * BATCH] *= 1000.0
        return y


class Fp16(Regression):
    overflow_steps = 0

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # runs after the callbacks; a step with inf/NaN gradients is one the scaler will skip
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.overflow_steps += not all(torch.isfinite(g).all() for g in grads)

    def precision(self) -> dict[str, Any]:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=20)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}


class Spikes(Task):
    """``examples/clipping.py``'s ``spikes`` task (2% of the batches x1000, lr 0.003)."""

    lr = 0.003

    def __init__(self) -> None:
        super().__init__()
        self.model = SpikyRegression()

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def data(self, steps: int, seed: int) -> tuple[TensorDataset, TensorDataset, float]:
        x, y = SpikyRegression.data(BATCH * steps, seed)
        xv, yv = SpikyRegression.data(1024, 10_000 + seed)
        return TensorDataset(x, SpikyRegression.corrupt(y, seed)), TensorDataset(xv, yv), (yv**2).mean().item()


class Rnn(Spikes):
    """``examples/clipping.py``'s ``rnn`` task (IRNN, 50-step sequences, lr 0.01)."""

    lr = 0.01

    def __init__(self) -> None:
        Task.__init__(self)
        self.model = SequenceSum()

    def data(self, steps: int, seed: int) -> tuple[TensorDataset, TensorDataset, float]:
        x, y = SequenceSum.data(BATCH * steps, seed)
        xv, yv = SequenceSum.data(1024, 10_000 + seed)
        return TensorDataset(x, y), TensorDataset(xv, yv), (yv**2).mean().item()


class LanguageModel(Task):
    """A 2-layer post-LN transformer LM on a sparse random Markov chain; Adam, lr 3e-3."""

    lr = 3e-2
    VOCAB, SEQ, D, HEADS, LAYERS, LM_BATCH = 32, 32, 64, 4, 2, 16
    WARMUP = 0

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, self.D)
        self.pos = nn.Parameter(0.02 * torch.randn(self.SEQ, self.D))
        layer = nn.TransformerEncoderLayer(self.D, self.HEADS, 2 * self.D, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, self.LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(self.D, self.VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(self.SEQ), persistent=False)

    def loss(self, batch: Any) -> torch.Tensor:
        (ids,) = batch
        h = self.embed(ids[:, :-1]) + self.pos
        logits = self.head(self.body(h, mask=self.mask, is_causal=True))
        return nn.functional.cross_entropy(logits.reshape(-1, self.VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.WARMUP:
            return opt
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.WARMUP))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}

    def chain(self, n: int, seed: int) -> torch.Tensor:
        """``n`` sequences of a fixed Markov chain: each token has 3 likely successors."""
        g = torch.Generator().manual_seed(5)
        logits = torch.full((self.VOCAB, self.VOCAB), -4.0)
        likely = torch.rand(self.VOCAB, self.VOCAB, generator=g).argsort(-1)[:, :3]
        logits.scatter_(1, likely, torch.tensor([4.0, 2.0, 1.0]).expand(self.VOCAB, 3))
        probs = logits.softmax(-1)
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, self.SEQ + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.VOCAB, (n,), generator=g)
        for t in range(self.SEQ):
            ids[:, t + 1] = torch.multinomial(probs[ids[:, t]], 1, generator=g).squeeze(1)
        return ids

    def data(self, steps: int, seed: int) -> tuple[TensorDataset, TensorDataset, float]:
        return (
            TensorDataset(self.chain(self.LM_BATCH * steps, seed)),
            TensorDataset(self.chain(256, 10_000 + seed)),
            math.log(self.VOCAB),
        )


class LanguageModelWarmup(LanguageModel):
    WARMUP = 30


TASKS: dict[str, type[Task]] = {
    "healthy": Regression,
    "calm": Calm,
    "heavy_tail": HeavyTail,
    "corrupt": Corrupt,
    "spikes": Spikes,
    "rnn": Rnn,
    "lm": LanguageModel,
    "lm_warmup": LanguageModelWarmup,
    "fp16": Fp16,
}


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


def _clipper(**kwargs: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {"callbacks": [AdaptiveClipper(**kwargs)]}


#: the old ``AdaptiveClipper()``: zscore, 25 warm-up steps that clip nothing, no ceiling
OLD_DEFAULT = dict(mode="zscore", warmup_steps=25, warmup_factor=math.inf, max_norm=math.inf)

SETTINGS: dict[str, Callable[[], dict[str, Any]]] = {
    "none": lambda: {},
    "clip1": lambda: {"gradient_clip_val": 1.0},
    "zclip": lambda: {"callbacks": [ZClipLightningCallback()]},
    "autoclip": _clipper(mode="percentile", warmup_steps=0, max_norm=math.inf),
    "old_default": _clipper(**OLD_DEFAULT),
    "default": _clipper(),
    "zscore_free": _clipper(max_norm=math.inf),
    "percentile": _clipper(mode="percentile"),
    "skip": _clipper(skip_factor=10.0),
    "old_skip": _clipper(**OLD_DEFAULT | {"skip_factor": 10.0, "skip_limit": 10**9}),
    "agc": _clipper(mode="agc"),
}


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------


def _quiet() -> None:
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@torch.no_grad()
def _held_out(model: Task, data: TensorDataset) -> float:
    model.eval()
    losses = [model.loss(batch).item() for batch in DataLoader(data, batch_size=256)]
    return sum(losses) / len(losses)


def run(task: str, setting: str, seed: int, steps: int) -> dict[str, Any]:
    """Train ``task`` under ``setting``; how it ended."""
    _quiet()
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = TASKS[task]()
    train, held_out, baseline = model.data(steps, seed)
    batch = getattr(model, "LM_BATCH", BATCH)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **model.precision(),
        **(SETTINGS[setting] if setting in SETTINGS else custom(setting))(),
    )
    trainer.fit(model, DataLoader(train, batch_size=batch, shuffle=False))
    bad = next((i for i, v in enumerate(model.losses) if not math.isfinite(v)), None)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    final = _held_out(model, held_out) if bad is None and finite else math.nan
    clippers = [c for c in trainer.callbacks if isinstance(c, AdaptiveClipper)]
    return {
        "task": task,
        "setting": setting,
        "seed": seed,
        "final_loss": final,
        "baseline": baseline,
        "max_train_loss": max(model.losses) if model.losses else math.nan,
        "nonfinite_step": bad,
        "diverged": not (final <= baseline),
        "skipped_steps": sum(c.skipped_steps for c in clippers),
        "overflow_steps": getattr(model, "overflow_steps", 0),
        "seconds": time.perf_counter() - t0,
    }


def _job(job: tuple[str, str, int, int]) -> dict[str, Any]:
    return run(*job)


def custom(spec: str) -> Callable[[], dict[str, Any]]:
    """A setting written ``ac:mode=zscore;max_norm=2`` (``none`` for ``None``), for exploring."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, spec.removeprefix("ac:").split(";")):
        key, _, value = item.partition("=")
        if value == "none":
            kwargs[key] = None
        elif value == "inf" or (value[:1].isdigit() and "." in value):
            kwargs[key] = float(value)
        else:
            kwargs[key] = int(value) if value.isdigit() else value
    return _clipper(**kwargs)


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], task: str, settings: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for setting in settings:
        mine = [r for r in runs if r["task"] == task and r["setting"] == setting]
        alive = [r["final_loss"] for r in mine if not r["diverged"]]
        out[setting] = {
            "runs": len(mine),
            "diverged": sum(r["diverged"] for r in mine),
            "median": statistics.median(alive) if alive else math.nan,
            "worst": max(alive) if alive else math.nan,
        }
    return out


def verdict(rows: dict[str, dict[str, Any]], setting: str, tolerance: float = 0.10) -> str:
    """``ok`` when ``setting`` diverges no more than the better of clip1/zclip and ends within ``tolerance``."""
    refs = [rows[s] for s in ("clip1", "zclip") if s in rows]
    mine = rows.get(setting)
    if not refs or mine is None:
        return ""
    if mine["diverged"] > min(r["diverged"] for r in refs):
        return "MORE DIVERGED"
    best = min((r["median"] for r in refs if not math.isnan(r["median"])), default=math.nan)
    if math.isnan(best) or math.isnan(mine["median"]):
        return "ok"
    ratio = mine["median"] / best
    return "ok" if ratio <= 1 + tolerance else f"{100 * (ratio - 1):+.0f}%"


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3g}"


def markdown(runs: list[dict[str, Any]], tasks: Sequence[str], settings: Sequence[str], focus: str) -> str:
    """One row per setting, one column per task: 'median (diverged/runs)'; a verdict row for ``focus``."""
    tables = {task: summarize(runs, task, settings) for task in tasks}
    lines = ["| setting | " + " | ".join(f"`{t}`" for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for setting in settings:
        cells = []
        for task in tasks:
            r = tables[task][setting]
            div = f" ({r['diverged']}/{r['runs']} div.)" if r["diverged"] else ""
            cells.append(f"{_fmt(r['median'])}{div}")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    if focus in settings:
        verdicts = " | ".join(verdict(tables[t], focus) for t in tasks)
        lines.append(f"| *{focus} vs best of clip1/zclip* | {verdicts} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {list(TASKS)}")
    parser.add_argument("--settings", default=None, help=f"comma-separated, of {list(SETTINGS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--focus", default="default", help="the setting judged against clip1/zclip")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    names = [s for s in SETTINGS if s != "zclip" or ZClipLightningCallback is not None]
    args.settings = [s for s in args.settings.split(",") if s] if args.settings else names
    for kind, given, known in (("task", args.tasks, TASKS), ("setting", args.settings, SETTINGS)):
        for name in given:
            if name not in known and not name.startswith("ac:"):
                parser.error(f"unknown {kind} {name!r}; choose from {list(known)}")
    if "zclip" in args.settings and ZClipLightningCallback is None:
        parser.error("zclip is not installed: pip install -e '.[bench]'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = shlex.join(["python", "benchmarks/bench_clipping_tasks.py", *(sys.argv[1:] if argv is None else argv)])
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("lightning", "zclip"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    print(f"command:  {cmd}\nversions: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    jobs = [(t, s, seed, args.steps) for t in args.tasks for s in args.settings for seed in range(args.seeds)]
    print(f"{len(jobs)} runs, {args.steps} steps each, {args.workers} process(es)", flush=True)
    t0 = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            runs = list(pool.map(_job, jobs))
    else:
        runs = [_job(job) for job in jobs]
    elapsed = time.perf_counter() - t0
    print(f"\nfinal held-out loss, median over {args.seeds} seeds (diverged runs left out and counted):\n")
    print(markdown(runs, args.tasks, args.settings, args.focus))
    print(f"\n{len(jobs)} runs in {elapsed:.0f} s")
    if args.json is not None:
        payload = {"command": cmd, "versions": versions, "seconds": elapsed, "runs": runs}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
