"""Per-step time overhead of gradient monitoring, measured inside one ``Trainer.fit``.

The reference model is the one of the performance issue: a 12-layer
``nn.TransformerEncoder`` (d_model 64, 4 heads, feed-forward 256) between a token
embedding and a linear head over a 1000-token vocabulary, trained with AdamW on a
fixed synthetic data set of random token ids (batch 16 x 64 tokens, next-token
cross-entropy). It has 147 parameter tensors.

This machine's speed drifts by +-20% from one run to the next, so comparing separate
runs is meaningless at the 1% level. Instead every condition runs inside the same
``Trainer.fit``, interleaved step by step: a switch callback picks the condition of each
optimizer step round-robin, and every measured component only does its work on the steps
of its own condition. Step times (``on_train_batch_start`` -> ``on_train_batch_end``,
``time.perf_counter``) are compared by their medians; the first rounds are dropped as
warm-up, and so are rounds in which any step stalled (see ``STALL_FACTOR``). Besides
the ratio of medians, a paired figure compares each step with the baseline steps of its
own round. Even so, a condition's position in the round is worth about +-1% (the quiet
steps of ``gradguard_default``, which do nothing, come out ~1% fast), so differences
below ~1.5% are not resolved.

What the window leaves out, for every condition alike: Lightning's logger-connector work
after ``on_train_batch_end`` (collecting everything ``self.log`` received and, every
``log_every_n_steps``, writing it), so ``lightning_grad_norm`` is, if anything, a slight
under-estimate. ZClip spends its first 25 active steps in its own warm-up (plain
``clip_grad_norm_`` besides its norm), which is part of what is measured.

Conditions:

* ``baseline``: nothing attached does anything on that step.
* ``gradguard_every_step``: ``GradientNormLogger(log_every_n_steps=1)``, per-layer norms to
  a real ``TensorBoardLogger`` on every one of its steps.
* ``gradguard_default``: ``GradientNormLogger()`` at the Trainer's ``log_every_n_steps=50``;
  its cost comes in bursts, so the ratio of MEANS is the figure that matters for it.
* ``lightning_grad_norm``: Lightning's documented recipe,
  ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``.
* ``clip_grad_norm``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)``, what
  ``gradient_clip_val`` runs.
* ``zclip``: ZClip's Lightning callback with its default settings (when importable).
* ``alarm_all_checks``: ``VanishExplodeAlarm()`` with every check on (it reads its flags
  to the host every step). The post-LN reference model is flagged as vanishing early on
  (a true positive, see the README), so this also covers an ongoing episode.
* ``clipper_zscore``: ``AdaptiveClipper(mode="zscore")``.
* ``amp_check`` (with ``--fp16``, which trains under real fp16 AMP with a CPU
  ``GradScaler``): ``AmpUnscaleCheck()``.

Usage::

    python benchmarks/bench_overhead.py                  # ~2-4 minutes on 2 CPU cores
    python benchmarks/bench_overhead.py --quick          # ~20 s smoke run
    python benchmarks/bench_overhead.py --threads 1 --json results.json
    python benchmarks/bench_overhead.py --profile gradguard_every_step   # cProfile of its hooks
    python benchmarks/bench_overhead.py --report results.json            # print a saved run again
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import math
import os
import platform
import pstats
import random
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm

try:
    from zclip import ZClipLightningCallback
except Exception:  # not installed, or broken against this torch/lightning
    ZClipLightningCallback = None

# --------------------------------------------------------------------------------------
# Reference model
# --------------------------------------------------------------------------------------

VOCAB = 1000
D_MODEL = 64
N_HEADS = 4
D_FF = 256
N_LAYERS = 12
BATCH = 16
SEQ = 64
EXPECTED_PARAM_TENSORS = 147  # embedding 1 + 12 layers x 12 + head 2

# Lightning's default ``Trainer(log_every_n_steps=...)``; ``gradguard_default`` follows it.
TRAINER_LOG_EVERY = 50

BASELINE = "baseline"
GG_EVERY = "gradguard_every_step"
GG_DEFAULT = "gradguard_default"
PL_GRAD_NORM = "lightning_grad_norm"
CLIP = "clip_grad_norm"
ZCLIP = "zclip"
ALARM = "alarm_all_checks"
CLIPPER = "clipper_zscore"
AMP_CHECK = "amp_check"


class Switch(Callback):
    """Decides the condition of every optimizer step and starts its stopwatch.

    Must be the FIRST callback so that the condition is set before any other hook of the
    step runs; :class:`Stopwatch` (the LAST callback) stops the clock.

    The condition of global step ``s`` is ``slots[s % len(slots)]``; one pass over
    ``slots`` is a "round".
    """

    def __init__(self, slots: Sequence[str], profile: str | None = None, total_rounds: int = 0) -> None:
        self.slots = tuple(slots)
        self.current: str | None = None
        self.step = -1
        self.t0 = 0.0
        self.records: list[dict[str, Any]] = []
        self.total_rounds = total_rounds
        self.started = time.perf_counter()
        self.profile_target = profile
        self.profiler = cProfile.Profile() if profile else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.step = trainer.global_step
        self.current = self.slots[self.step % len(self.slots)]
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        elapsed = time.perf_counter() - self.t0
        k = len(self.slots)
        self.records.append(
            {"step": self.step, "round": self.step // k, "condition": self.current, "ms": elapsed * 1e3}
        )
        self.current = None
        done = len(self.records)
        if self.total_rounds and done % k == 0 and (done // k) % max(1, self.total_rounds // 10) == 0:
            recent = statistics.median(r["ms"] for r in self.records[-k:])
            print(
                f"  round {done // k}/{self.total_rounds}: {time.perf_counter() - self.started:.0f} s, "
                f"last round's median step {recent:.0f} ms",
                file=sys.stderr,
                flush=True,
            )

    def active(self, condition: str) -> bool:
        return self.current == condition

    def run(self, condition: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` for ``condition``, under cProfile if that condition is being profiled."""
        if self.profiler is not None and condition == self.profile_target:
            return self.profiler.runcall(fn, *args, **kwargs)
        return fn(*args, **kwargs)


class Stopwatch(Callback):
    """Stops the step's clock; must be the LAST callback."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    def on_train_batch_end(self, *args: Any) -> None:
        self.switch.stop()


# Hooks that run inside a training step: forwarded only on the steps of the wrapped
# callback's condition. Every other hook (setup, on_fit_start, teardown, state_dict, ...)
# is always forwarded, so the wrapped callback is set up and torn down as usual.
_STEP_HOOKS = frozenset(
    {
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "on_train_batch_end",
    }
)
_ALWAYS_HOOKS = tuple(
    name
    for name in vars(Callback)
    if (name.startswith("on_") or name in ("setup", "teardown", "state_dict", "load_state_dict"))
    and name not in _STEP_HOOKS
)


class Gated(Callback):
    """Delegates to ``inner`` but runs its per-step hooks only when ``condition`` is active."""

    def __init__(self, inner: Callback, condition: str, switch: Switch) -> None:
        self.inner = inner
        self.condition = condition
        self.switch = switch

    @property
    def state_key(self) -> str:
        return f"{self.inner.state_key}@{self.condition}"


def _gated_hook(name: str) -> Callable[..., Any]:
    def hook(self: Gated, *args: Any, **kwargs: Any) -> Any:
        if not self.switch.active(self.condition):
            return None
        return self.switch.run(self.condition, getattr(self.inner, name), *args, **kwargs)

    hook.__name__ = name
    return hook


def _forwarded_hook(name: str) -> Callable[..., Any]:
    def hook(self: Gated, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in _STEP_HOOKS:
    setattr(Gated, _name, _gated_hook(_name))
for _name in _ALWAYS_HOOKS:
    setattr(Gated, _name, _forwarded_hook(_name))


class ReferenceModel(pl.LightningModule):
    """The issue's small transformer; the Lightning-recipe and clip conditions live here."""

    def __init__(self, switch: Switch) -> None:
        super().__init__()
        self.switch = switch
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, N_HEADS, dim_feedforward=D_FF, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, N_LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens), mask=self.causal_mask, is_causal=True)
        return self.head(hidden)

    def loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        (ids,) = batch
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.switch.active(PL_GRAD_NORM):
            self.switch.run(PL_GRAD_NORM, self._lightning_recipe)
        elif self.switch.active(CLIP):
            self.switch.run(CLIP, torch.nn.utils.clip_grad_norm_, self.parameters(), 1.0)

    def _lightning_recipe(self) -> None:
        self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


def build_slots(conditions: Sequence[str]) -> list[str]:
    """The round-robin order of one round.

    ``gradguard_default`` keeps the real logger's schedule (it logs when
    ``(trainer.global_step + 1) % 50 == 0``, Lightning's own cadence), so that what is measured is the unmodified code
    path, including its "do nothing" test on the other steps. In a round of K slots it is
    active on the steps ``s = r*K + c``. If K and 50 share a factor, those steps hit a
    multiple of 50 either never or too often (K=6: 1 in 25 of its steps, or none). When
    gcd(K, 50) == 1, the Chinese remainder theorem gives exactly one logging step in every
    50 consecutive rounds, i.e. exactly 1 in 50 of its own steps, the fraction a real run
    has; so extra baseline slots are added until K is coprime with 50 (6 conditions ->
    K=7 with two baseline slots). With a number of measured rounds that is a multiple of
    50 the measured fraction is exactly 1/50; otherwise it is 1/50 rounded to a whole step.
    The extra baseline steps also make the reference of every ratio less noisy.
    """
    slots = list(conditions)
    n = len(slots)
    extra = 0
    while math.gcd(n + extra, TRAINER_LOG_EVERY) != 1:
        extra += 1
    # Spread the extra baselines over the round rather than bunching them up.
    for j in range(extra):
        slots.insert((j + 1) * n // (extra + 1) + j, BASELINE)
    return slots


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def _pct(ratio: float) -> float:
    return (ratio - 1.0) * 100.0


def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of ``values`` (ratios), as an overhead in %."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    return _pct(meds[int(0.025 * reps)]), _pct(meds[int(0.975 * reps) - 1])


# A step longer than STALL_FACTOR times the fastest steps (their 10th percentile) is a
# "stall": the process was descheduled (other jobs on a shared machine; with two OpenMP
# threads on two busy cores, one parallel region can wait a whole scheduler slice), not
# slowed by anything measured here (the dearest condition costs ~1.35x; the spread of
# undisturbed steps is about p90/p10 = 1.4). On a busy machine half of all steps can
# stall, by up to 8 s against 150 ms, which wrecks means and shifts even medians (hence a
# low percentile as the reference, not the median). The table therefore keeps only the
# "clean" rounds, those without a stall in any of their steps, so that every condition
# loses the same rounds; the all-steps figures are shown beside them.
STALL_FACTOR = 2.0


def _ratio_pct(times: list[float], base: list[float], stat: Callable[[list[float]], float]) -> float:
    return _pct(stat(times) / stat(base)) if times and base else math.nan


def summarize(records: list[dict[str, Any]], conditions: Sequence[str]) -> dict[str, Any]:
    """Per-condition figures over the clean rounds, plus the all-steps ones."""
    all_ms = [r["ms"] for r in records]
    stall_ms = STALL_FACTOR * (statistics.quantiles(all_ms, n=10)[0] if len(all_ms) > 1 else all_ms[0])
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        rounds.setdefault(r["round"], []).append(r)
    clean = [rs for rs in rounds.values() if all(r["ms"] < stall_ms for r in rs)]

    def by_condition(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {c: [] for c in conditions}
        for r in rows:
            out[r["condition"]].append(r["ms"])
        return out

    every = by_condition(records)
    kept = by_condition([r for rs in clean for r in rs])
    # Paired ratios: each step against the baseline steps of its own round (~1 s apart),
    # which cancels drift slower than a round.
    paired: dict[str, list[float]] = {c: [] for c in conditions}
    for rs in clean:
        base_ms = [r["ms"] for r in rs if r["condition"] == BASELINE]
        if base_ms:
            ref = statistics.fmean(base_ms)
            for r in rs:
                paired[r["condition"]].append(r["ms"] / ref)
    per_condition: dict[str, dict[str, Any]] = {}
    for c in conditions:
        times = kept[c]
        lo, hi = bootstrap_ci(paired[c]) if c != BASELINE else (0.0, 0.0)
        per_condition[c] = {
            "steps": len(times),
            "median_ms": statistics.median(times) if times else math.nan,
            "mean_ms": statistics.fmean(times) if times else math.nan,
            "median_overhead_pct": _ratio_pct(times, kept[BASELINE], statistics.median),
            "mean_overhead_pct": _ratio_pct(times, kept[BASELINE], statistics.fmean),
            "paired_overhead_pct": _pct(statistics.median(paired[c])) if paired[c] else math.nan,
            "paired_overhead_ci95_pct": [lo, hi],
            "all_steps": len(every[c]),
            "all_median_overhead_pct": _ratio_pct(every[c], every[BASELINE], statistics.median),
            "all_mean_overhead_pct": _ratio_pct(every[c], every[BASELINE], statistics.fmean),
            "stalls": sum(t >= stall_ms for t in every[c]),
        }
    return {
        "stall_threshold_ms": stall_ms,
        "rounds": len(rounds),
        "clean_rounds": len(clean),
        "clean_round_ids": sorted(rs[0]["round"] for rs in clean),
        "conditions": per_condition,
    }


# --------------------------------------------------------------------------------------
# Micro-benchmarks
# --------------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], Any], calls: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def micro_benchmarks(model: ReferenceModel, batch: Sequence[torch.Tensor], calls: int) -> dict[str, float]:
    """Median times of the norm computations alone, on real gradients of the model."""
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(batch).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    results = {"foreach_norm_ms": _median_ms(lambda: torch._foreach_norm(grads, 2.0), calls)}
    results["lightning_grad_norm_fn_ms"] = _median_ms(lambda: grad_norm(model, norm_type=2), calls)
    try:  # the stats API may move while the package is young; the benchmark should not die of it
        from lightning_gradguard.stats import Grouping, ParamSet, take_snapshot

        pset = ParamSet.from_module(model)
        grouping = Grouping.build(pset, group_by="module")
        results["gradguard_stats_to_host_ms"] = _median_ms(
            lambda: take_snapshot(pset).grouped(grouping).to_host(), calls
        )
        results["gradguard_groups"] = len(grouping)
        # What one logging step then writes: the total and one scalar per group, through
        # the same TensorBoardLogger the Trainer uses (its event queue holds 10 events, so a
        # burst of ~75 waits for the writer thread).
        host = take_snapshot(pset).grouped(grouping).to_host()
        metrics = {"grad_norm/total": host.total_norm}
        metrics.update({f"grad_norm/{name}": value for name, value in host.group_norms.items()})
        with tempfile.TemporaryDirectory(prefix="gradguard-micro-") as tmp:
            tb = TensorBoardLogger(tmp, name="micro", version=0)
            steps = iter(range(1 << 30))
            results["tensorboard_log_metrics_ms"] = _median_ms(lambda: tb.log_metrics(metrics, step=next(steps)), calls)
            results["tensorboard_scalars"] = len(metrics)
            tb.finalize("success")
    except Exception as err:  # pragma: no cover - depends on the package state
        print(f"(gradguard stats micro-benchmark skipped: {type(err).__name__}: {err})")
    return results


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def tensorboard_steps(log_dir: str, tag: str) -> set[int]:
    """Steps at which ``tag`` was written to the event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: set[int] = set()
    for run in {p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            steps.update(e.step for e in acc.Scalars(tag))
    return steps


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured rounds (one step per slot each); default 150 (~2-4 min), 20 with --quick. "
        "A multiple of 50 makes gradguard_default log on exactly 1 in 50 of its steps.",
    )
    parser.add_argument("--warmup-rounds", type=int, default=None, help="rounds dropped first (default 2, 1 quick)")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results (and raw steps) here")
    parser.add_argument(
        "--report", type=Path, default=None, metavar="PATH", help="print the report of a --json file again; run nothing"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="train with real fp16 AMP (GradScaler on CPU) and add the amp_check condition (AmpUnscaleCheck)",
    )
    parser.add_argument("--micro-calls", type=int, default=None, help="calls per micro-benchmark (default 300)")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="CONDITION",
        help="run that condition's work under cProfile and print where its time goes "
        "(its timings then include the profiler's own overhead)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 20 if args.quick else 150
    if args.warmup_rounds is None:
        args.warmup_rounds = 1 if args.quick else 2
    if args.micro_calls is None:
        args.micro_calls = 50 if args.quick else 300
    if args.rounds < 1 or args.warmup_rounds < 0:
        parser.error("--rounds must be >= 1 and --warmup-rounds >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print_report(json.loads(args.report.read_text()))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")

    conditions = [BASELINE, GG_EVERY, PL_GRAD_NORM, CLIP, GG_DEFAULT, ALARM, CLIPPER]
    if args.fp16:
        conditions.append(AMP_CHECK)
    if ZClipLightningCallback is not None:
        conditions.append(ZCLIP)
    else:
        print("zclip is not importable: the zclip condition is left out.")
    if args.profile is not None and args.profile not in conditions:
        print(f"--profile must be one of {conditions}, got {args.profile!r}", file=sys.stderr)
        return 2
    slots = build_slots(conditions)
    k = len(slots)
    total_rounds = args.warmup_rounds + args.rounds
    max_steps = total_rounds * k

    pl.seed_everything(args.seed, verbose=False)
    switch = Switch(slots, profile=args.profile, total_rounds=total_rounds)
    model = ReferenceModel(switch)
    n_tensors = sum(1 for _ in model.parameters())
    print(f"reference model: {n_tensors} parameter tensors, {sum(p.numel() for p in model.parameters()):,} weights")
    assert n_tensors == EXPECTED_PARAM_TENSORS, f"expected {EXPECTED_PARAM_TENSORS} parameter tensors, got {n_tensors}"

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB, (max_steps * BATCH, SEQ + 1), generator=gen)
    loader = DataLoader(TensorDataset(ids), batch_size=BATCH, shuffle=False)

    gated: list[Callback] = [
        Gated(GradientNormLogger(log_every_n_steps=1), GG_EVERY, switch),
        Gated(GradientNormLogger(), GG_DEFAULT, switch),
        # every check on, and a host read of its flags on every one of its steps
        Gated(VanishExplodeAlarm(), ALARM, switch),
        Gated(AdaptiveClipper(mode="zscore"), CLIPPER, switch),
    ]
    if args.fp16:
        gated.append(Gated(AmpUnscaleCheck(), AMP_CHECK, switch))
    if ZClipLightningCallback is not None:
        gated.append(Gated(ZClipLightningCallback(), ZCLIP, switch))

    print(f"{k} slots per round: {', '.join(slots)}; {total_rounds} rounds = {max_steps} steps", flush=True)
    with tempfile.TemporaryDirectory(prefix="gradguard-bench-") as tmp:
        tb = TensorBoardLogger(tmp, name="bench", version=0)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            max_epochs=1,
            logger=tb,
            log_every_n_steps=TRAINER_LOG_EVERY,
            callbacks=[switch, *gated, Stopwatch(switch)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if args.fp16 else None,
        )
        load_before = os.getloadavg()[0]
        t_start = time.perf_counter()
        trainer.fit(model, loader)
        fit_s = time.perf_counter() - t_start
        load_after = os.getloadavg()[0]
        tb_every = tensorboard_steps(tmp, "grad_norm/total")

    assert len(switch.records) == max_steps, f"timed {len(switch.records)} steps, expected {max_steps}"

    # Did the gradguard loggers log what they were expected to? (read back from TensorBoard)
    pos_every = [i for i, s in enumerate(slots) if s == GG_EVERY]
    pos_default = [i for i, s in enumerate(slots) if s == GG_DEFAULT]
    want_every = sorted(s for s in range(max_steps) if s % k in pos_every)
    want_default = sorted(s for s in range(max_steps) if s % k in pos_default and (s + 1) % TRAINER_LOG_EVERY == 0)
    got_every = sorted(s for s in tb_every if s % k in pos_every)
    got_default = sorted(s for s in tb_every if s % k in pos_default)

    micro = micro_benchmarks(model, next(iter(loader)), args.micro_calls)

    versions = {"python": platform.python_version(), "torch": torch.__version__, "lightning": pl.__version__}
    for dist in ("zclip", "lightning-gradguard"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cmd_args = sys.argv[1:] if argv is None else list(argv)
    payload: dict[str, Any] = {
        "command": shlex.join(["python", sys.argv[0], *cmd_args]),
        "versions": versions,
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "slots": slots,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "fit_seconds": fit_s,
        "load_average": [load_before, load_after],
        "n_param_tensors": n_tensors,
        "micro": micro,
        "micro_calls": args.micro_calls,
        "tensorboard_check": {
            "every_got": got_every,
            "every_want": want_every,
            "default_got": got_default,
            "default_want": want_default,
            "ok": got_every == want_every and got_default == want_default,
        },
        "steps": switch.records,
    }
    payload["summary"] = print_report(payload)

    if switch.profiler is not None:
        buf = io.StringIO()
        stats = pstats.Stats(switch.profiler, stream=buf).sort_stats("cumulative")
        n_prof = sum(1 for r in switch.records if r["condition"] == args.profile)
        buf.write(f"cProfile of the {args.profile} work over {n_prof} steps (incl. warm-up), by cumulative time:\n")
        stats.print_stats(25)
        print()
        print(buf.getvalue())

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"results written to {args.json}")
    return 0 if payload["tensorboard_check"]["ok"] else 1


def print_report(payload: dict[str, Any]) -> dict[str, Any]:
    """Print the results of a run (fresh, or loaded from ``--json``); return the summary."""
    slots = payload["slots"]
    conditions = list(dict.fromkeys(slots))
    records = [r for r in payload["steps"] if r["round"] >= payload["warmup_rounds"]]
    summary = summarize(records, conditions)
    table = summary["conditions"]
    cores = payload.get("cpu_count") or 1
    load_before, load_after = payload["load_average"]

    print()
    print(f"command:  {payload['command']}")
    print(f"versions: {', '.join(f'{name} {v}' for name, v in payload['versions'].items())}")
    print(
        f"threads:  torch intra-op {payload['threads']}, interop {payload.get('interop_threads', '?')}; "
        f"{cores} cores ({payload.get('machine', '?')}); 1-min load average {load_before:.1f} before fit, "
        f"{load_after:.1f} after"
    )
    print(
        f"schedule: {len(slots)} slots per round ({', '.join(slots)}); {payload['warmup_rounds']} warm-up + "
        f"{payload['rounds']} measured rounds; fit took {payload['fit_seconds']:.0f} s"
    )
    n_clean, n_rounds = summary["clean_rounds"], summary["rounds"]
    print(
        f"stalls:   {sum(c['stalls'] for c in table.values())} of {len(records)} measured steps took over "
        f"{STALL_FACTOR:g}x the 10th percentile step ({summary['stall_threshold_ms']:.0f} ms); "
        f"{n_clean} of {n_rounds} rounds are clean and make the table"
    )
    if n_clean < 0.8 * n_rounds:
        print("WARNING:  the machine was busy (many stalls); figures are less precise than usual, rerun when idle")
    print()
    header = (
        f"{'condition':<22} {'steps':>5} {'median ms':>9} {'median ovh':>10} {'mean ovh':>9} {'paired ovh':>10} "
        f"{'95% CI paired':>16} | {'all: med ovh':>12} {'mean ovh':>9} {'stalls':>6}"
    )
    print(header)
    print("-" * len(header))
    for c in conditions:
        row = table[c]
        lo, hi = row["paired_overhead_ci95_pct"]
        ci = "" if c == BASELINE else f"[{lo:+.1f}, {hi:+.1f}]%"
        print(
            f"{c:<22} {row['steps']:>5} {row['median_ms']:>9.1f} {row['median_overhead_pct']:>+9.1f}% "
            f"{row['mean_overhead_pct']:>+8.1f}% {row['paired_overhead_pct']:>+9.1f}% {ci:>16} | "
            f"{row['all_median_overhead_pct']:>+11.1f}% {row['all_mean_overhead_pct']:>+8.1f}% {row['stalls']:>6}"
        )
    print()
    print(
        "median ovh = median(condition) / median(baseline) - 1 and mean ovh = mean / mean - 1, over the clean "
        "rounds;\npaired ovh = median over clean rounds of (condition / mean baseline of the same round) - 1, with "
        "a bootstrap 95% interval;\nall: the same over every measured step, stalls included."
    )

    # gradguard_default: its cost comes once in 50 steps, so its figure is the MEAN.
    clean_ids = set(summary["clean_round_ids"])
    default_steps = [r for r in records if r["condition"] == GG_DEFAULT and r["round"] in clean_ids]
    default_logging = [r for r in default_steps if (r["step"] + 1) % TRAINER_LOG_EVERY == 0]
    if default_steps:
        base_median = table[BASELINE]["median_ms"]
        print()
        print(
            f"{GG_DEFAULT}: its cost comes in bursts, so its figure is the ratio of MEANS: "
            f"{table[GG_DEFAULT]['mean_overhead_pct']:+.2f}% (logged on {len(default_logging)} of its "
            f"{len(default_steps)} clean steps; 1 in {TRAINER_LOG_EVERY} in a real run)."
        )
        # That mean rests on a handful of logging steps and is easily swamped by noise, so
        # the amortised cost is also built from robust parts: the median of its quiet steps,
        # plus 1/50 of what one logging step costs, taken from gradguard_every_step (the
        # same code path, measured on every one of its steps) rather than from the few
        # logging steps of this condition.
        quiet = [r["ms"] for r in default_steps if (r["step"] + 1) % TRAINER_LOG_EVERY]
        if quiet and table[GG_EVERY]["steps"]:
            quiet_pct = _pct(statistics.median(quiet) / base_median)
            per_log_ms = table[GG_EVERY]["median_ms"] - base_median
            amortised = quiet_pct + per_log_ms / base_median * 100.0 / TRAINER_LOG_EVERY
            table[GG_DEFAULT]["amortised_overhead_pct"] = amortised
            own = ""
            if default_logging:
                log_ms = statistics.median(r["ms"] for r in default_logging)
                own = f"; its own logging steps: median {log_ms - base_median:+.1f} ms"
            print(
                f"  robust amortised estimate: quiet-step median {quiet_pct:+.2f}% + 1/{TRAINER_LOG_EVERY} x "
                f"{per_log_ms:+.1f} ms per logging step (from {GG_EVERY}{own}) = {amortised:+.2f}%"
            )

    micro = payload["micro"]
    print()
    print(
        f"one torch._foreach_norm over all {payload['n_param_tensors']} gradients: {micro['foreach_norm_ms']:.3f} ms "
        f"(median of {payload['micro_calls']} calls)"
    )
    print(
        f"lightning grad_norm() alone (a .norm() per tensor, then their total): "
        f"{micro['lightning_grad_norm_fn_ms']:.3f} ms"
    )
    if "gradguard_stats_to_host_ms" in micro:
        print(
            f"gradguard take_snapshot -> grouped ({micro['gradguard_groups']} module groups) -> to_host: "
            f"{micro['gradguard_stats_to_host_ms']:.3f} ms"
        )
    if "tensorboard_log_metrics_ms" in micro:
        print(
            f"TensorBoardLogger.log_metrics of those {micro['tensorboard_scalars']} scalars: "
            f"{micro['tensorboard_log_metrics_ms']:.3f} ms"
        )
    check = payload["tensorboard_check"]
    print(
        f"TensorBoard check: grad_norm/total written at {len(check['every_got'])}/{len(check['every_want'])} "
        f"{GG_EVERY} steps and at {check['default_got']} for {GG_DEFAULT} (expected {check['default_want']}): "
        f"{'OK' if check['ok'] else 'MISMATCH'}"
    )
    return summary


if __name__ == "__main__":
    sys.exit(main())
