"""Gradient-flow pictures: a layer x step heatmap and a per-layer profile, as PNG images.

Trainer-free. :class:`FlowHistory` keeps the per-layer gradient norms of the logged steps
in a bounded buffer (old steps are thinned, so memory does not grow with the run);
:func:`heatmap_png` and :func:`profile_png` draw them with matplotlib (Agg, no display,
no ``pyplot`` state) and return PNG bytes; :func:`image_summary` wraps PNG bytes for a
TensorBoard event file. :class:`~lightning_gradguard.GradientNormLogger` uses them for
its Images-tab pictures (``flow_every_n_steps``).

matplotlib is an optional dependency (``pip install "lightning-gradguard[plots]"``);
:func:`plotting_unavailable` says why pictures cannot be drawn, or ``None``.

Example:
    >>> history = FlowHistory(capacity=4)
    >>> for step in range(10):
    ...     history.add(step, ("first", "last"), (10.0 ** -step, 1.0))
    >>> history.steps  # thinned: every other, then every fourth logged step
    [0, 4, 8]
    >>> history.latest_step, history.latest["first"]
    (9, 1e-09)
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FlowHistory", "heatmap_png", "image_summary", "plotting_unavailable", "profile_png"]

#: columns a history keeps by default (after that, every other kept step is dropped)
DEFAULT_CAPACITY = 240
#: the heatmap's colour scale spans at least this many decades below the largest norm, so that a
#: healthy run (all layers within a few decades) looks uniform and a vanishing one does not
MIN_DECADES = 12
#: a picture of more layers than this labels only some of them
_MAX_LABELS = 48


def plotting_unavailable() -> str | None:
    """Why the pictures cannot be drawn here (matplotlib missing), or ``None`` when they can."""
    if importlib.util.find_spec("matplotlib") is None:
        return 'matplotlib is not installed (pip install "lightning-gradguard[plots]")'
    return None


def _log10(value: float | None) -> float:
    """log10 of a norm for the picture: NaN when absent, -inf for 0, +inf for a non-finite norm."""
    if value is None:
        return math.nan
    if not math.isfinite(value):
        return math.inf
    if value <= 0.0:
        return -math.inf
    return math.log10(value)


class FlowHistory:
    """Per-layer gradient norms of the logged steps, in memory that does not grow with the run.

    At most ``capacity`` steps are kept. When the buffer is full every other kept step is
    dropped and from then on only every second offered step is kept (the stride doubles),
    so the kept steps stay evenly spaced and always cover the whole run. The newest step
    is always available (:attr:`latest`) for the profile, kept or not.

    Layers are identified by name. A new layer (unfrozen, added to the optimizer) gets a
    row from its first step on; when the order of the names changes (the forward order
    became known), stored steps follow it.

    Args:
        capacity: steps kept, at least 2.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"`capacity` must be an integer >= 2, got {capacity!r}.")
        self.capacity = capacity
        self.names: list[str] = []
        self.stride = 1
        self._offered = 0
        self._steps: list[int] = []
        self._values = np.full((capacity, 0), np.nan, dtype=np.float32)  # log10 norms, rows = kept steps
        self.latest: dict[str, float] = {}
        self.latest_step: int | None = None
        self.extras: dict[str, dict[str, float]] = {}  # e.g. "param_norm", "update_ratio" of the newest step

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> list[int]:
        """The kept steps, oldest first."""
        return list(self._steps)

    def matrix(self) -> np.ndarray:
        """log10 norms, one row per layer (in :attr:`names` order) and one column per kept step."""
        return self._values[: len(self._steps)].T.copy()

    def add(self, step: int, names: Sequence[str], norms: Sequence[float | None]) -> None:
        """Offer one logged step: ``norms[i]`` is layer ``names[i]``'s norm (``None``: no gradient)."""
        self._align(names)
        column = np.full(len(self.names), np.nan, dtype=np.float32)
        index = {n: i for i, n in enumerate(self.names)}
        for name, norm in zip(names, norms):
            column[index[name]] = _log10(norm)
        self.latest = {n: float(v) for n, v in zip(names, norms) if v is not None}
        self.latest_step = step
        keep = self._offered % self.stride == 0
        self._offered += 1
        if not keep:
            return
        if len(self._steps) == self.capacity:
            half = self._values[0 : self.capacity : 2].copy()
            self._values[:] = np.nan
            self._values[: len(half)] = half
            self._steps = self._steps[0::2]
            self.stride *= 2
            if (self._offered - 1) % self.stride:
                return  # this step falls between the new, wider spacing
        self._values[len(self._steps)] = column
        self._steps.append(step)

    def _align(self, names: Sequence[str]) -> None:
        if list(names) == self.names:
            return
        incoming = set(names)
        merged = list(names) + [n for n in self.names if n not in incoming]
        old = {n: i for i, n in enumerate(self.names)}
        values = np.full((self.capacity, len(merged)), np.nan, dtype=np.float32)
        for j, name in enumerate(merged):
            if name in old:
                values[:, j] = self._values[:, old[name]]
        self.names = merged
        self._values = values

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, for a checkpoint."""
        return {
            "capacity": self.capacity,
            "names": list(self.names),
            "stride": self.stride,
            "offered": self._offered,
            "steps": list(self._steps),
            "values": self.matrix().T.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (a different capacity keeps the newest steps)."""
        names = list(state.get("names", []))
        steps = list(state.get("steps", []))
        values = np.asarray(state.get("values", []), dtype=np.float32).reshape(len(steps), len(names))
        keep = min(len(steps), self.capacity)
        self.names = names
        self._values = np.full((self.capacity, len(names)), np.nan, dtype=np.float32)
        self._values[:keep] = values[len(steps) - keep :]
        self._steps = steps[len(steps) - keep :]
        self.stride = int(state.get("stride", 1))
        self._offered = int(state.get("offered", len(steps)))


# ---------------------------------------------------------------------------- drawing


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _label_every(count: int) -> int:
    return max(1, math.ceil(count / _MAX_LABELS))


def heatmap_png(history: FlowHistory, *, title: str = "") -> bytes:
    """The layer x step heatmap of log10 gradient norm, as PNG bytes.

    Rows are layers in :attr:`FlowHistory.names` order (input side at the top), columns the
    kept steps (the newest step is added if it was not kept). Colour is log10 of the norm,
    with a colour bar in decades spanning at least :data:`MIN_DECADES` below the largest
    norm (so healthy layers share one colour and vanishing ones stand out dark); a layer
    whose gradient is exactly 0 is black, a non-finite one red, a step without a gradient
    for the layer grey.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    values = history.matrix()
    steps = history.steps
    if history.latest_step is not None and (not steps or steps[-1] != history.latest_step):
        column = np.array([_log10(history.latest.get(n)) for n in history.names], dtype=np.float32)
        values = np.concatenate([values, column[:, None]], axis=1) if values.size else column[:, None]
        steps = [*steps, history.latest_step]
    n_layers, n_steps = values.shape
    finite = values[np.isfinite(values)]
    if finite.size:
        high = max(math.ceil(float(finite.max())), -30)
        low = min(math.floor(float(finite.min())), high - MIN_DECADES)
    else:
        low, high = -MIN_DECADES, 0
    cmap = colormaps["viridis"].with_extremes(under="black", over="red", bad="#d9d9d9")
    drawn = np.where(np.isposinf(values), high + 1.0, np.where(np.isneginf(values), low - 1.0, values))

    height = min(16.0, max(4.0, 1.6 + 0.2 * n_layers))
    fig = _figure(12.0, height)
    ax = fig.add_axes((0.2, 0.1, 0.68, 0.82))
    cax = fig.add_axes((0.9, 0.1, 0.015, 0.82))
    ax.imshow(
        np.ma.masked_invalid(drawn),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=Normalize(vmin=low, vmax=high),
    )
    every = _label_every(n_layers)
    ax.set_yticks(range(0, n_layers, every))
    ax.set_yticklabels([_short(history.names[i]) for i in range(0, n_layers, every)], fontsize=8)
    ticks = np.unique(np.linspace(0, n_steps - 1, min(n_steps, 8)).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[i]) for i in ticks], fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input side at the top)")
    ax.set_title(title or "log10 gradient L2 norm per layer", fontsize=11)
    bar = fig.colorbar(
        ax.images[0], cax=cax, extend="both", ticks=range(low, high + 1, max(1, math.ceil((high - low) / 12)))
    )
    bar.ax.set_yticklabels([f"1e{t}" for t in bar.get_ticks().astype(int)], fontsize=8)
    bar.set_label("|grad| (black: exactly 0, red: NaN/Inf)", fontsize=8)
    return _png(fig)


def profile_png(history: FlowHistory, *, title: str = "") -> bytes:
    """The per-layer profile at the newest step (norm per layer on a log axis), as PNG bytes.

    The line is the newest step's gradient norm per layer, input side at the left; the
    band is its range over the kept history. With weight norms in ``history.extras["param_norm"]``
    they are drawn too; with update/weight ratios in ``history.extras["update_ratio"]`` a
    second panel shows them against the common 1e-3 rule of thumb.
    """
    names = history.names
    n = len(names)
    x = np.arange(n)
    latest = np.array([history.latest.get(name, np.nan) for name in names], dtype=np.float64)
    ratios = history.extras.get("update_ratio") or {}
    weights = history.extras.get("param_norm") or {}
    fig = _figure(12.0, 6.0 if ratios else 4.5)
    top = fig.add_axes((0.08, 0.47 if ratios else 0.3, 0.9, 0.46 if ratios else 0.62))
    with np.errstate(invalid="ignore"):
        past = history.matrix()
        if past.size:
            lo = np.where(np.isfinite(past), past, np.nan)
            if np.isfinite(lo).any(axis=1).any():
                lo_min = np.nanmin(np.where(np.isfinite(lo), lo, np.inf), axis=1)
                lo_max = np.nanmax(np.where(np.isfinite(lo), lo, -np.inf), axis=1)
                ok = np.isfinite(lo_min) & np.isfinite(lo_max)
                top.fill_between(
                    x[ok], 10.0 ** lo_min[ok], 10.0 ** lo_max[ok], color="tab:blue", alpha=0.15, label="range so far"
                )
    good = np.isfinite(latest) & (latest > 0)
    top.plot(x[good], latest[good], "o-", color="tab:blue", ms=4, label=f"|grad| at step {history.latest_step}")
    zero = latest == 0
    bad = ~np.isfinite(latest) & ~np.isnan(latest)
    trans = top.get_xaxis_transform()
    if zero.any():
        top.plot(x[zero], np.full(zero.sum(), 0.02), "v", color="black", transform=trans, label="exactly 0")
    if bad.any():
        top.plot(x[bad], np.full(bad.sum(), 0.98), "^", color="red", transform=trans, label="NaN/Inf")
    if weights:
        w = np.array([weights.get(name, np.nan) for name in names], dtype=np.float64)
        ok = np.isfinite(w) & (w > 0)
        top.plot(x[ok], w[ok], "s--", color="tab:orange", ms=3, label="|weight|")
    top.set_yscale("log")
    top.set_ylabel("L2 norm")
    top.grid(True, which="major", alpha=0.3)
    top.legend(fontsize=8, loc="best")
    top.set_title(title or "gradient norm per layer (input side at the left)", fontsize=11)
    every = _label_every(n)
    axes = [top]
    if ratios:
        bottom = fig.add_axes((0.08, 0.24, 0.9, 0.19), sharex=top)
        r = np.array([ratios.get(name, np.nan) for name in names], dtype=np.float64)
        ok = np.isfinite(r) & (r > 0)
        bottom.plot(x[ok], r[ok], "o-", color="tab:green", ms=3, label="update / weight")
        if (r == 0).any():
            bottom.plot(
                x[r == 0],
                np.full(int((r == 0).sum()), 0.05),
                "v",
                color="black",
                transform=bottom.get_xaxis_transform(),
                label="exactly 0 (update lost to rounding)",
            )
        bottom.axhline(1e-3, color="gray", ls=":", lw=1, label="1e-3 (rule of thumb)")
        bottom.set_yscale("log")
        bottom.set_ylabel("update/weight")
        bottom.grid(True, which="major", alpha=0.3)
        bottom.legend(fontsize=8, loc="best")
        top.tick_params(labelbottom=False)
        axes.append(bottom)
    last = axes[-1]
    last.set_xticks(range(0, n, every))
    last.set_xticklabels([_short(names[i], 28) for i in range(0, n, every)], rotation=60, ha="right", fontsize=7)
    last.set_xlim(-0.5, n - 0.5)
    return _png(fig)


def image_summary(tag: str, png: bytes) -> Any:
    """A TensorBoard ``Summary`` holding one PNG image under ``tag``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = _png_size(png)
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
