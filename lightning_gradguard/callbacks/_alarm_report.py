"""What ``VanishExplodeAlarm`` keeps and writes about a run: its record and summary, and the crash dump.

:class:`AlarmRecord` holds the counters, episodes, findings and halt of the run and writes
the health summary. :class:`MicroBatch` records a micro-batch behind the coming optimizer
step; a crash dump (:func:`write_crash_dump`) holds the first one that went non-finite
(:func:`first_nonfinite`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gradguard.diagnosis import KINDS, Evidence, Finding, Reading


@dataclass
class MicroBatch:
    """One micro-batch behind the coming optimizer step: what a crash dump may need."""

    batch_idx: int | None
    batch: Any
    loss_finite: Tensor | None = None  # device flags, read only when a dump is written
    grad_finite: Tensor | None = None  # accumulated gradients finite after this micro-batch


def first_nonfinite(window: Sequence[MicroBatch]) -> tuple[int, str]:
    """Position of the first micro-batch whose loss or accumulated gradient was non-finite, and which.

    ``(last, "")`` when no flag says so (no accumulation, or only a later rule fired).
    One host copy of the window's flags; runs only when a dump is written.
    """
    flags = [
        (i, name, t)
        for i, m in enumerate(window)
        for name, t in (("loss", m.loss_finite), ("gradient", m.grad_finite))
        if t is not None
    ]
    if flags:
        finite = torch.stack([t.reshape(()).to(flags[0][2].device) for _, _, t in flags]).tolist()
        for (i, name, _), ok in zip(flags, finite):
            if not ok:
                return i, name
    return max(len(window) - 1, 0), ""


def write_crash_dump(
    trainer: pl.Trainer,
    dump_dir: str | None,
    step: int,
    evidence: Evidence,
    findings: Sequence[Finding],
    window: Sequence[MicroBatch],
) -> tuple[str, str]:
    """Save the step's evidence next to the logs; returns the path and which micro-batch the dump holds.

    The file is ``gradguard_crash_step<step>[_rank<r>].pt`` in ``dump_dir`` (``None``: the
    Trainer's ``log_dir``, else its ``default_root_dir``).
    """
    folder = dump_dir or trainer.log_dir or trainer.default_root_dir
    os.makedirs(folder, exist_ok=True)
    suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
    path = os.path.join(folder, f"gradguard_crash_step{step}{suffix}.pt")
    culprit, cause = first_nonfinite(window)
    micro = window[culprit] if window else MicroBatch(None, None)
    if cause:
        what = f"batch_idx {micro.batch_idx}, the first micro-batch of the step whose {cause} went non-finite"
    else:
        what = f"batch_idx {micro.batch_idx}, the step's last micro-batch"
    if len(window) > 1:
        what += f" ({culprit + 1} of {len(window)} accumulated)"
    host = evidence.host
    payload = {
        "step": step,
        "batch_idx": micro.batch_idx,
        "batch": apply_to_collection(micro.batch, Tensor, lambda t: t.detach().cpu()),
        "batch_cause": cause or None,
        "window_batch_idx": [m.batch_idx for m in window],
        "group_norms": host.group_norms,
        "nonfinite_groups": list(host.nonfinite_groups),
        "total_norm": host.total_norm,
        "max_abs": host.max_abs,
        "reading": evidence.reading.as_dict(),
        "findings": [f.as_dict() for f in findings],
        "rank": trainer.global_rank,
    }
    torch.save(payload, path)
    return path, what


@dataclass
class AlarmRecord:
    """What a ``VanishExplodeAlarm`` has seen and done in this run, and its summary.

    Attributes:
        episode_gap: quiet steps that end a kind's episode.
        counts: per kind, the steps flagged so far.
        episodes: per kind, the episodes so far (a warning is issued once per episode).
        first_step: per kind, the first step flagged.
        skipped_steps: optimizer steps whose gradients the alarm dropped.
        steps_checked: optimizer steps checked.
        findings: every finding reported.
        halted_at: the step at which training was halted, if it was.
        dump_paths: the crash dumps written.
    """

    episode_gap: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    episodes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    first_step: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(KINDS, None))
    skipped_steps: int = 0
    steps_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    halted_at: int | None = None
    dump_paths: list[str] = field(default_factory=list)
    _quiet: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    _in_episode: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(KINDS, False))

    def tick(self, active: Sequence[str]) -> None:
        """Count one checked step whose flags ``active`` are up; ``episode_gap`` quiet steps end an episode."""
        self.steps_checked += 1
        for kind in KINDS:
            if kind in active:
                self.counts[kind] += 1
                self._quiet[kind] = 0
            else:
                self._quiet[kind] += 1
                if self._quiet[kind] >= self.episode_gap:
                    self._in_episode[kind] = False

    def begin(self, kind: str, step: int) -> bool:
        """Note ``kind`` active at ``step``; whether that opens a new episode."""
        if self.first_step[kind] is None:
            self.first_step[kind] = step
        if self._in_episode[kind]:
            return False
        self._in_episode[kind] = True
        self.episodes[kind] += 1
        return True

    def metrics(self, reading: Reading, seg: str = "") -> dict[str, float]:
        """The ``alarm/`` scalars of a step (``seg``: ``"opt<i>/"`` with several optimizers).

        A counter is logged from the step its kind first fires (a healthy run shows no
        counter chart at all, rather than a wall of flat zeros); ``skipped_steps`` likewise.
        The deep/shallow ratio spans decades (1 to 1e16 and beyond): it is logged as its
        log10, which a linear chart draws readably. TensorBoard cannot draw NaN/Inf: a
        z-score before the spike rule is armed, or a ratio without two layers that have a
        gradient (or an infinite one), is left out of that step.
        """
        metrics = {f"alarm/{seg}{k}": float(self.counts[k]) for k in KINDS if self.counts[k]}
        if self.skipped_steps:
            metrics[f"alarm/{seg}skipped_steps"] = float(self.skipped_steps)
        if math.isfinite(reading.zscore):
            metrics[f"alarm/{seg}zscore"] = reading.zscore
        if math.isfinite(reading.ratio) and reading.ratio > 0:
            metrics[f"alarm/{seg}deep_shallow_log10"] = math.log10(reading.ratio)
        return metrics

    def summary(self) -> str:
        """A short health report: what was flagged, how often, since when; skips, halt, dumps."""
        lines = [f"[gradguard] gradient health over {self.steps_checked} optimizer steps:"]
        for kind in KINDS:
            if self.counts[kind]:
                lines.append(
                    f"  {kind}: {self.counts[kind]} step(s) in {self.episodes[kind]} episode(s), "
                    f"first at step {self.first_step[kind]}"
                )
        if len(lines) == 1:
            lines.append("  no vanishing, exploding, dead or non-finite gradients seen.")
        if self.skipped_steps:
            lines.append(f"  optimizer steps skipped by gradguard: {self.skipped_steps}")
        if self.halted_at is not None:
            lines.append(f"  training halted at step {self.halted_at}")
        lines.extend(f"  crash dump: {path}" for path in self.dump_paths)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The health summary as markdown (a table of the kinds seen), for TensorBoard's Text tab."""
        seen = [k for k in KINDS if self.counts[k]]
        lines = [f"**Gradient health** over {self.steps_checked} optimizer steps", ""]
        if seen:
            lines += ["| kind | steps flagged | episodes | first at step |", "|---|---|---|---|"]
            lines += [f"| {k} | {self.counts[k]} | {self.episodes[k]} | {self.first_step[k]} |" for k in seen]
        else:
            lines.append("No vanishing, exploding, dead or non-finite gradients seen.")
        notes = []
        if self.skipped_steps:
            notes.append(f"- optimizer steps skipped by gradguard: {self.skipped_steps}")
        if self.halted_at is not None:
            notes.append(f"- training halted at step {self.halted_at}")
        notes.extend(f"- crash dump: `{path}`" for path in self.dump_paths)
        if notes:
            lines += ["", *notes]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """The counters a checkpoint keeps (not the findings, the halt or the dumps)."""
        return {
            "counts": dict(self.counts),
            "episodes": dict(self.episodes),
            "first_step": dict(self.first_step),
            "skipped_steps": self.skipped_steps,
            "steps_checked": self.steps_checked,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts.update(state.get("counts", {}))
        self.episodes.update(state.get("episodes", {}))
        self.first_step.update(state.get("first_step", {}))
        self.skipped_steps = state.get("skipped_steps", 0)
        self.steps_checked = state.get("steps_checked", 0)
