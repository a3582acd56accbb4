"""Does adaptive clipping keep training alive? Diverged runs and final loss per clipping setting.

Two small tasks from ``examples/clipping.py`` whose training blows up without clipping
(see that file for the details):

* ``rnn``: an IRNN (ReLU RNN, identity recurrence) on 50-step sequences, SGD + momentum,
  lr 0.01; without clipping the loss is NaN within three steps.
* ``spikes``: a tanh MLP regression in which 2% of the batches have their targets
  multiplied by 1000, SGD + momentum, lr 0.003; without clipping the first corrupted
  batch wrecks the weights.

Each task runs ``--seeds`` seeds (default 5) for ``--steps`` optimizer steps (default 300)
under every setting:

* ``none``: no clipping;
* ``gradient_clip_val=1.0``: Lightning's own total-norm clipping;
* ``zclip``: ZClip's Lightning callback with its defaults (``ZClipLightningCallback()``,
  zclip 1.0.0: z-score rule, 25 warm-up steps clipped at ``max_grad_norm=1.0``, which also
  stays a ceiling afterwards), when ``zclip`` is importable;
* ``percentile``, ``zscore``, ``agc``: ``AdaptiveClipper`` with its defaults, the learned
  modes with ``warmup_max_norm=1.0`` and ``max_norm=math.inf`` (the same warm-up as
  ZClip's, no ceiling afterwards: the ``rnn`` task
  explodes at step 1, before any history exists);
* ``zscore, max_norm=1.0``: the same with ZClip's default ceiling (``max_grad_norm=1.0``)
  as an absolute ceiling;
* ``default``: ``AdaptiveClipper()`` (zscore under a 1.0 ceiling);
* ``zscore+skip``: the ``zscore`` setting with ``skip_factor=10`` (steps 10x above the
  threshold are skipped rather than clipped, at most ``skip_limit=3`` in a row).

A run *diverged* when its training loss became non-finite or its final loss, on clean
held-out data, is above that of always predicting 0. The table reports, per setting,
the diverged runs and the median and worst final loss of the runs that did not diverge.

A second check feeds the same sequence of gradient norms (steady, one NaN step, then a
1000x spike) to ZClip 1.0.0 (``max_grad_norm=None``, i.e. purely adaptive) and to the
``zscore`` and ``percentile`` rules, and reports whether the spike is clipped.

``--overhead`` instead measures the per-step cost of each mode on the reference model of
``benchmarks/bench_overhead.py`` (12-layer transformer, 147 parameter tensors), every
condition interleaved step by step inside one ``Trainer.fit`` (see that file), against
the ``clip_grad_norm_`` that ``gradient_clip_val`` runs.

Usage::

    python benchmarks/bench_clipping.py                      # ~3-4 minutes on 2 CPU cores
    python benchmarks/bench_clipping.py --quick              # ~30 s smoke run (2 seeds, 100 steps)
    python benchmarks/bench_clipping.py --json results.json
    python benchmarks/bench_clipping.py --overhead           # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clipping import DEFAULT_LR, TASKS, train  # noqa: E402

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper  # noqa: E402
from lightning_gradguard.clipping import PercentileThreshold, ZScoreThreshold, clip_by_norm_  # noqa: E402

try:
    from zclip import ZClip, ZClipLightningCallback
except Exception:  # not installed, or broken against this torch/lightning
    ZClip = ZClipLightningCallback = None


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


def _settings() -> dict[str, Callable[[], dict[str, Any]]]:
    """Setting name -> keyword arguments of ``examples/clipping.train`` (built fresh per run)."""
    out: dict[str, Callable[[], dict[str, Any]]] = {
        "none": lambda: {},
        "gradient_clip_val=1.0": lambda: {"gradient_clip_val": 1.0},
    }
    if ZClipLightningCallback is not None:
        out["zclip"] = lambda: {"callbacks": [ZClipLightningCallback()]}
    free = dict(warmup_max_norm=1.0, max_norm=math.inf)  # no ceiling after the warm-up
    out["percentile"] = lambda: {"callbacks": [AdaptiveClipper(mode="percentile", **free)]}
    out["zscore"] = lambda: {"callbacks": [AdaptiveClipper(mode="zscore", **free)]}
    out["zscore, max_norm=1.0"] = lambda: {
        "callbacks": [AdaptiveClipper(mode="zscore", warmup_max_norm=1.0, max_norm=1.0)]
    }
    out["zscore+skip"] = lambda: {"callbacks": [AdaptiveClipper(mode="zscore", skip_factor=10.0, **free)]}
    out["default"] = lambda: {"callbacks": [AdaptiveClipper()]}
    out["agc"] = lambda: {"callbacks": [AdaptiveClipper(mode="agc")]}
    return out


def _quiet() -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _one_run(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """Worker: one (task, setting, seed) run."""
    _quiet()
    task, setting, seed, steps = job
    t0 = time.perf_counter()
    outcome = train(task, seed=seed, steps=steps, **_settings()[setting]())
    return {
        "task": task,
        "setting": setting,
        "seed": seed,
        "final_loss": outcome.final_loss,
        "baseline": outcome.baseline,
        "nonfinite_step": outcome.nonfinite_step,
        "steps_run": outcome.steps,
        "diverged": outcome.diverged,
        "seconds": time.perf_counter() - t0,
    }


def summarize(runs: list[dict[str, Any]], task: str, settings: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        mine = [r for r in runs if r["task"] == task and r["setting"] == setting]
        alive = [r["final_loss"] for r in mine if not r["diverged"]]
        rows.append(
            {
                "setting": setting,
                "runs": len(mine),
                "diverged": sum(r["diverged"] for r in mine),
                "median_final_loss": statistics.median(alive) if alive else math.nan,
                "worst_final_loss": max(alive) if alive else math.nan,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | diverged runs | median final loss | worst final loss |",
        "|---|---|---|---|",
    ]
    for r in rows:
        med = "—" if math.isnan(r["median_final_loss"]) else f"{r['median_final_loss']:.3f}"
        worst = "—" if math.isnan(r["worst_final_loss"]) else f"{r['worst_final_loss']:.3f}"
        lines.append(f"| {r['setting']} | {r['diverged']}/{r['runs']} | {med} | {worst} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# NaN then spike: is the spike still clipped?
# --------------------------------------------------------------------------------------


def nan_then_spike(steps: int = 60, nan_at: int = 40, spike_at: int = 50) -> list[dict[str, Any]]:
    """Steady norms around 1, a NaN at ``nan_at``, a 1000x spike at ``spike_at``."""
    gen = torch.Generator().manual_seed(0)
    norms = (1.0 + 0.1 * torch.randn(steps, generator=gen)).tolist()
    norms[nan_at] = math.nan
    norms[spike_at] = 1000.0
    out = []

    if ZClip is not None:
        model = torch.nn.Linear(4, 1, bias=False)
        zclip = ZClip(max_grad_norm=None)  # purely adaptive; its default 1.0 ceiling would mask the rule
        post = math.nan
        for i, n in enumerate(norms):
            model.weight.grad = torch.full_like(model.weight, n / 2.0)  # 4 elements: norm n
            zclip.step(model)
            if i == spike_at:
                post = model.weight.grad.norm().item()
        out.append({"rule": "ZClip 1.0.0 (max_grad_norm=None)", "spike_post_norm": post, "state_mean": zclip.mean})

    for name, rule in (
        ("AdaptiveClipper zscore", ZScoreThreshold(warmup_steps=25)),
        ("AdaptiveClipper percentile", PercentileThreshold(warmup_steps=25)),
    ):
        post = math.nan
        for i, n in enumerate(norms):
            grads = [torch.full((4,), n / 2.0)]
            norm = torch.tensor(n)
            threshold = rule.threshold()
            clip_by_norm_(grads, norm, threshold)
            rule.observe(norm, torch.tensor(True))
            if i == spike_at:
                post = torch.linalg.vector_norm(grads[0]).item()
        state = float(rule.mean) if isinstance(rule, ZScoreThreshold) else float(rule.threshold())
        out.append({"rule": name, "spike_post_norm": post, "state_mean": state})
    return out


# --------------------------------------------------------------------------------------
# overhead on the reference model
# --------------------------------------------------------------------------------------


def overhead(rounds: int, warmup_rounds: int, seed: int, calls: int = 200) -> dict[str, Any]:
    """Per-step cost of each mode, interleaved with a baseline inside one fit, and per hook."""
    import bench_overhead as bo
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    modes = {
        "adaptive_norm": dict(mode="norm", max_norm=1.0),
        "adaptive_percentile": dict(mode="percentile"),
        "adaptive_zscore": dict(mode="zscore"),
        "adaptive_agc": dict(mode="agc"),
    }
    conditions = [bo.BASELINE, bo.CLIP, *modes]
    if bo.ZClipLightningCallback is not None:
        conditions.append(bo.ZCLIP)
    slots = bo.build_slots(conditions)
    k = len(slots)
    max_steps = (warmup_rounds + rounds) * k
    pl.seed_everything(seed, verbose=False)
    switch = bo.Switch(slots)
    model = bo.ReferenceModel(switch)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, bo.VOCAB, (max_steps * bo.BATCH, bo.SEQ + 1), generator=gen)
    gated: list[pl.Callback] = [bo.Gated(AdaptiveClipper(**kw), name, switch) for name, kw in modes.items()]
    if bo.ZClipLightningCallback is not None:
        gated.append(bo.Gated(bo.ZClipLightningCallback(), bo.ZCLIP, switch))
    print(f"slots per round ({k}): {', '.join(slots)}; {warmup_rounds} warm-up + {rounds} rounds = {max_steps} steps")
    with tempfile.TemporaryDirectory(prefix="gradguard-clip-bench-") as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            max_epochs=1,
            logger=TensorBoardLogger(tmp, name="bench", version=0),
            log_every_n_steps=bo.TRAINER_LOG_EVERY,
            callbacks=[switch, *gated, bo.Stopwatch(switch)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, DataLoader(TensorDataset(ids), batch_size=bo.BATCH, shuffle=False))
        records = [r for r in switch.records if r["round"] >= warmup_rounds]
        summary = bo.summarize(records, conditions)["conditions"] if rounds else {}
        hooks = hook_times(trainer, model, ids[: bo.BATCH], [g.inner for g in gated], calls)
    base = summary.get(bo.BASELINE, {}).get("median_ms")
    return {"slots": slots, "summary": summary, "hook_ms": hooks, "baseline_step_ms": base, "steps": switch.records}


def hook_times(trainer: Any, model: Any, batch: torch.Tensor, callbacks: list[Any], calls: int) -> dict[str, float]:
    """Median time of one clipping hook on the model's real gradients, each condition in turn.

    The shared snapshot is dropped before every call so that its cost (the norms) is
    included, as on a real step; ``clip_grad_norm_`` computes its norm too.
    """
    from lightning_gradguard.callbacks import _session

    model.zero_grad(set_to_none=True)
    model.loss((batch,)).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    optimizer = trainer.optimizers[0]
    state = _session.session(trainer)
    names = [
        c.state_key.split("{")[0] if not isinstance(c, AdaptiveClipper) else f"adaptive_{c.mode}" for c in callbacks
    ]
    jobs: dict[str, Callable[[], Any]] = {"clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)}
    for name, cb in zip(names, callbacks):
        jobs[name if isinstance(cb, AdaptiveClipper) else "zclip"] = lambda cb=cb: (
            state.clear_snapshots(),
            cb.on_before_optimizer_step(trainer, model, optimizer),
        )
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(calls + 10):  # round-robin, so that drift hits every condition alike
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if i >= 10:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {sorted(TASKS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 5; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; 100 quick)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all results here")
    parser.add_argument("--overhead", action="store_true", help="measure the per-step cost instead")
    parser.add_argument("--rounds", type=int, default=40, help="--overhead: measured rounds of the interleaved fit")
    parser.add_argument("--seed", type=int, default=0, help="--overhead: seed")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.steps = args.steps or (100 if args.quick else 300)
    args.tasks = [t for t in args.tasks.split(",") if t]
    for task in args.tasks:
        if task not in TASKS:
            parser.error(f"--tasks: unknown task {task!r}; choose from {sorted(TASKS)}")
    return args


def _versions() -> dict[str, str]:
    import lightning

    versions = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__}
    for dist in ("zclip", "lightning-gradguard"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = shlex.join(["python", "benchmarks/bench_clipping.py", *(sys.argv[1:] if argv is None else argv)])
    versions = _versions()
    print(f"command:  {cmd}")
    print(f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    payload: dict[str, Any] = {"command": cmd, "versions": versions}

    if args.overhead:
        _quiet()
        torch.set_num_threads(os.cpu_count() or 1)
        result = overhead(args.rounds, 2, args.seed)
        base = result["baseline_step_ms"]
        print("\nwhole steps, interleaved inside one fit (this machine drifts; see the 95% CI):\n")
        print("| condition | steps | median ms | median overhead | paired overhead | 95% CI |")
        print("|---|---|---|---|---|---|")
        for name, s in result["summary"].items():
            lo, hi = s["paired_overhead_ci95_pct"]
            ci = "" if name == "baseline" else f"[{lo:+.1f}, {hi:+.1f}]%"
            print(
                f"| {name} | {s['steps']} | {s['median_ms']:.1f} | {s['median_overhead_pct']:+.1f}% | "
                f"{s['paired_overhead_pct']:+.1f}% | {ci} |"
            )
        print("\nthe clipping hook alone, on the model's real gradients (median of 200 calls, round-robin):\n")
        print("| condition | ms per step | share of a baseline step |")
        print("|---|---|---|")
        for name, ms in result["hook_ms"].items():
            share = f"{100 * ms / base:.2f}%" if base else "—"
            print(f"| {name} | {ms:.3f} | {share} |")
        payload["overhead"] = result
    else:
        settings = list(_settings())
        jobs = [(task, s, seed, args.steps) for task in args.tasks for s in settings for seed in range(args.seeds)]
        print(
            f"{len(jobs)} runs ({len(args.tasks)} tasks x {len(settings)} settings x {args.seeds} seeds, "
            f"{args.steps} steps each) on {args.workers} processes"
        )
        t0 = time.perf_counter()
        if args.workers > 1:
            with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
                runs = list(pool.map(_one_run, jobs))
        else:
            runs = [_one_run(job) for job in jobs]
        elapsed = time.perf_counter() - t0
        payload.update({"seeds": args.seeds, "steps": args.steps, "runs": runs, "tables": {}})
        for task in args.tasks:
            rows = summarize(runs, task, settings)
            payload["tables"][task] = rows
            lr = DEFAULT_LR[task]
            print(f"\n### task `{task}` (SGD lr={lr}, {args.steps} steps, {args.seeds} seeds)\n")
            print(markdown(rows))
        print(f"\n{len(jobs)} runs in {elapsed:.0f} s")

        spike = nan_then_spike()
        payload["nan_then_spike"] = spike
        print("\n### one NaN step, then a 1000x spike (norms ~1 before)\n")
        print("| rule | norm after clipping the spike | mean kept by the rule |")
        print("|---|---|---|")
        for r in spike:
            print(f"| {r['rule']} | {r['spike_post_norm']:.4g} | {r['state_mean']:.4g} |")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
