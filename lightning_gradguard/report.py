"""One self-contained HTML page from a run's TensorBoard event files, no server needed.

``python -m lightning_gradguard report LOGDIR [-o report.html]`` reads every run under
``LOGDIR`` (a folder holding ``events.out.tfevents.*`` files) and writes one page with,
per run: the newest gradient-flow pictures (embedded as base64 PNG), the findings and
notes written to the Text tab, and a per-layer table of gradient norms (first, last,
minimum and maximum logged value, in forward order). Attach it to a pull request or a
bug report.

Example::

    python -m lightning_gradguard report runs/demo -o report.html
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NoGradGuardData", "RunReport", "find_runs", "read_run", "render", "write_report"]

#: tag prefixes that gradguard writes
PREFIXES = ("grad_norm", "grad_flow", "grad_max_abs", "param_norm", "update_ratio", "alarm/", "clip/", "amp/")
_LAYERS_TAG = "gradguard/layers"


class NoGradGuardData(ValueError):
    """A folder holds no TensorBoard event file, or none with gradguard data."""


@dataclass
class LayerRow:
    """One layer's logged gradient norms."""

    name: str
    first: tuple[int, float]
    last: tuple[int, float]
    low: float
    high: float


@dataclass
class RunReport:
    """What the page shows of one run."""

    name: str
    steps: tuple[int, int] | None = None
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # tag -> (step, png)
    texts: list[tuple[int, str, str]] = field(default_factory=list)  # (step, tag, markdown)
    layers: list[LayerRow] = field(default_factory=list)
    totals: list[LayerRow] = field(default_factory=list)
    other: dict[str, tuple[int, float]] = field(default_factory=dict)  # last value of other scalars


def find_runs(logdir: str) -> list[str]:
    """The folders under ``logdir`` (itself included) that hold TensorBoard event files, sorted."""
    runs = []
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents.") for f in files):
            runs.append(root)
    return sorted(runs)


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _layer_order(texts: Iterable[tuple[int, str, str]]) -> dict[str, list[str]]:
    """Forward order of the layers per optimizer segment, from the logger's ``gradguard/layers`` notes."""
    order: dict[str, list[str]] = {}
    for _, tag, text in texts:
        if tag.startswith(_LAYERS_TAG):
            seg = tag[len(_LAYERS_TAG) :].strip("/")
            order[f"{seg}/" if seg else ""] = re.findall(r"`([^`]+)`", text.rsplit("\n\n", 1)[-1])
    return order


def read_run(path: str, name: str | None = None) -> RunReport:
    """Everything the page shows of the run whose event files are in ``path``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 1, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    report = RunReport(name or path)
    for tag in tags.get("images", []):
        if tag.startswith("grad_flow"):
            event = acc.Images(tag)[-1]
            report.images[tag] = (event.step, event.encoded_image_string)
    for tag in tags.get("tensors", []):
        if not tag.endswith("/text_summary"):
            continue
        for event in acc.Tensors(tag):
            values = event.tensor_proto.string_val
            text = "\n\n".join(v.decode("utf-8", "replace") for v in values)
            report.texts.append((event.step, tag[: -len("/text_summary")], text))
    report.texts.sort(key=lambda t: (t[0], t[1]))
    order = _layer_order(report.texts)
    steps: list[int] = []
    rows: dict[str, LayerRow] = {}
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        if not events:
            continue
        if not tag.startswith(PREFIXES):
            report.other[tag] = (events[-1].step, events[-1].value)
            continue
        steps += [events[0].step, events[-1].step]
        if not tag.startswith("grad_norm/"):
            continue
        values = [e.value for e in events]
        name = tag[len("grad_norm/") :]
        rows[name] = LayerRow(
            name, (events[0].step, values[0]), (events[-1].step, values[-1]), min(values), max(values)
        )
    if steps:
        report.steps = (min(steps), max(steps))
    report.totals = [row for name, row in rows.items() if name.rsplit("/", 1)[-1] == "total"]
    layers = {name: row for name, row in rows.items() if name.rsplit("/", 1)[-1] != "total"}
    ranked: dict[str, int] = {}
    for seg, names in order.items():
        for i, layer in enumerate(names):
            ranked[seg + layer] = i
    report.layers = sorted(
        layers.values(),
        key=lambda r: (r.name.split("/")[0] if "/" in r.name else "", ranked.get(r.name, 10**9), _natural(r.name)),
    )
    return report


def _has_data(report: RunReport) -> bool:
    return bool(report.steps or report.images or any(tag != _LAYERS_TAG for _, tag, _ in report.texts))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; font-family: monospace; }
tr.low td { background: #fde8e8; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
pre { background: #f6f6f6; padding: .8em; white-space: pre-wrap; font-size: .85em; }
.finding { background: #fafafa; border-left: 4px solid #e8a33d; padding: .2em 1em; margin-bottom: 1em; }
.finding table { font-size: .85em; } p.tag { margin-bottom: .2em; }
.note { color: #666; font-size: .9em; }
"""


def _markdown(text: str) -> str:
    """The Text tab's markdown as HTML (raw HTML in it is escaped first, so it shows as text)."""
    try:
        import markdown  # a dependency of tensorboard, which renders the Text tab with it
    except ImportError:  # pragma: no cover - tensorboard always brings it
        return f"<pre>{html.escape(text)}</pre>"
    return markdown.markdown(html.escape(text, quote=False), extensions=["tables"])


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _table(rows: list[LayerRow], ratio_floor: float | None) -> str:
    head = "<tr><th>layer</th><th>first (step)</th><th>last (step)</th><th>min</th><th>max</th></tr>"
    lines = [f"<table>{head}"]
    for row in rows:
        low = ratio_floor is not None and row.last[1] < ratio_floor
        lines.append(
            f"<tr{' class=low' if low else ''}><td>{html.escape(row.name)}</td>"
            f"<td>{_fmt(row.first[1])} ({row.first[0]})</td><td>{_fmt(row.last[1])} ({row.last[0]})</td>"
            f"<td>{_fmt(row.low)}</td><td>{_fmt(row.high)}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def render(reports: list[RunReport], *, title: str = "gradguard report") -> str:
    """The HTML page of ``reports``: self-contained (pictures embedded, no external file or script)."""
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=note>{len(reports)} run(s). Gradient L2 norms are those the optimizer applied "
        "(unscaled, before clipping); pictures are the newest of each run.</p>",
    ]
    for report in reports:
        span = f", steps {report.steps[0]}–{report.steps[1]}" if report.steps else ""
        parts.append(f"<h2>{html.escape(report.name)}{span}</h2>")
        for tag, (step, png) in sorted(report.images.items()):
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<h3>{html.escape(tag)} (step {step})</h3>")
            parts.append(f'<img alt="{html.escape(tag)}" src="data:image/png;base64,{data}">')
        findings = [t for t in report.texts if t[1] != _LAYERS_TAG and not t[1].startswith(_LAYERS_TAG + "/")]
        parts.append("<h3>Findings</h3>")
        if findings:
            for step, tag, text in findings:
                parts.append(f"<p class=tag><b>{html.escape(tag)}</b>, step {step}</p>")
                parts.append(f"<div class=finding>{_markdown(text)}</div>")
        else:
            parts.append("<p class=note>Nothing was written to the Text tab (no finding, or no alarm attached).</p>")
        if report.totals:
            parts.append("<h3>Total gradient norm</h3>")
            parts.append(_table(report.totals, None))
        if report.layers:
            deepest = max((r.last[1] for r in report.layers), default=0.0)
            floor = deepest / 1e3 if deepest > 0 else None
            parts.append("<h3>Per layer, input side first</h3>")
            parts.append(
                "<p class=note>Rows in red: the last norm is more than 1000x below the largest layer's "
                "(the alarm's vanishing ratio).</p>"
            )
            parts.append(_table(report.layers, floor))
        if report.other:
            parts.append("<h3>Other scalars (last value)</h3><table><tr><th>tag</th><th>value (step)</th></tr>")
            for tag, (step, value) in sorted(report.other.items())[:40]:
                parts.append(f"<tr><td>{html.escape(tag)}</td><td>{_fmt(value)} ({step})</td></tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(logdir: str, output: str | None = None) -> str:
    """Write the page for every run under ``logdir`` and return its path.

    Args:
        logdir: a TensorBoard log folder (a run, or a folder of runs).
        output: the HTML file to write; default ``<logdir>/gradguard_report.html``.

    Raises:
        NoGradGuardData: when ``logdir`` is not a folder, holds no event file, or no run has
            gradguard data.
    """
    if not os.path.isdir(logdir):
        raise NoGradGuardData(f"{logdir!r} is not a folder: give the TensorBoard log folder of a run.")
    runs = find_runs(logdir)
    if not runs:
        raise NoGradGuardData(
            f"No TensorBoard event file (events.out.tfevents.*) under {logdir!r}: give the folder a "
            "TensorBoardLogger wrote to (e.g. lightning_logs/ or runs/)."
        )
    reports = [
        read_run(path, os.path.relpath(path, logdir) if path != logdir else os.path.basename(path)) for path in runs
    ]
    reports = [r for r in reports if _has_data(r)]
    if not reports:
        raise NoGradGuardData(
            f"{len(runs)} run(s) under {logdir!r} but no gradguard data in them (no grad_norm/, grad_flow/, "
            "alarm/, clip/ or amp/ tags): attach lightning_gradguard.GradientNormLogger (or run with "
            "GRADGUARD=1) and a TensorBoardLogger."
        )
    output = output or os.path.join(logdir, "gradguard_report.html")
    with open(output, "w", encoding="utf-8") as f:
        f.write(render(reports, title=f"gradguard report: {os.path.basename(os.path.abspath(logdir))}"))
    return output
