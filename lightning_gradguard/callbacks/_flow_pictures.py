"""The gradient-flow pictures of ``GradientNormLogger``: bounded histories, when they are due, drawing.

One :class:`~lightning_gradguard.flow.FlowHistory` per optimizer segment (``""`` or
``"opt<i>/"``) collects the per-layer norms of the logging steps (the logged layers, or each
module where ``"auto"`` merged them); every ``every`` steps (and at the end
of ``fit``) the due segments are drawn to TensorBoard's Images tab as a heatmap and a
per-layer profile. The drawing itself is :mod:`lightning_gradguard.flow`'s.

With ``group_by="auto"`` a big model's logged groups merge consecutive modules; a picture
has a row to spare for every module, so it keeps them (:meth:`FlowPictures.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_gradguard import flow
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import Layers
from lightning_gradguard.stats import Grouping, ParamSet

#: one group per owning module: what ``group_by="auto"`` merges, and what the pictures then draw
_MODULES = Layers("module")


class FlowPictures:
    """The pictures of one logger.

    Args:
        every: draw every this many steps (``None``: never).
        capacity: logging steps a history keeps (older ones are thinned).
        hook: the logger's hook (``"on_after_backward"`` draws micro-batch gradients).
    """

    def __init__(self, every: int | None, capacity: int, hook: str) -> None:
        self.every = every
        self.capacity = capacity
        self.microbatch = hook == "on_after_backward"
        #: per optimizer segment, the logged norms so far
        self.histories: dict[str, flow.FlowHistory] = {}
        self.next_step: int | None = None  # the step (+1) from which the next pictures are due
        self.due: set[str] = set()
        self.drawn: dict[str, int] = {}
        self.on = False

    def setup(self, trainer: pl.Trainer, group_by: str) -> None:
        """Decide whether the pictures can be drawn in this fit, and say once why not."""
        self.on = False
        if not self.every:
            return
        has_tensorboard = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        why = flow.plotting_unavailable()
        if not has_tensorboard:
            why = "they go to TensorBoard's Images tab and the Trainer has no TensorBoardLogger"
        elif group_by == "total":
            has_tensorboard = False  # the user's choice: a note, not a warning
            why = 'group_by="total" leaves no layers to draw'
        if why is None:
            self.on = True
        elif has_tensorboard:
            rank_zero_warn(
                f"GradientNormLogger: the gradient-flow pictures are off: {why}. The scalars are logged as usual; "
                "pass flow_every_n_steps=None to silence this."
            )
        else:
            rank_zero_info(f"GradientNormLogger: the gradient-flow pictures are off: {why}.")

    def layers(self, params: ParamSet, logged: Grouping, group_by: str) -> Grouping | None:
        """The pictures' layers where they are not the logged ones: the module groups that ``"auto"`` merged.

        ``None``: the pictures draw the logged layers.
        """
        if group_by != "auto" or not self.on:
            return None
        modules = _MODULES.of(params)
        return modules if len(modules) > len(logged) else None

    def start(self) -> None:
        """A new fit: nothing due yet; the first pictures after ``every`` steps."""
        self.due.clear()
        if self.next_step is None and self.every:
            self.next_step = self.every

    def record(
        self,
        seg: str,
        step: int,
        names: Sequence[str],
        norms: Sequence[float | None],
        param_norms: Mapping[str, float] | None = None,
    ) -> None:
        """Add a logged step's per-layer norms (``None``: the layer had no gradient)."""
        if not self.on:
            return
        history = self.histories.get(seg)
        if history is None:
            history = self.histories[seg] = flow.FlowHistory(self.capacity)
        history.add(step, names, norms)
        if param_norms is not None:
            history.extras["param_norm"] = dict(param_norms)
        if self.next_step is not None and step + 1 >= self.next_step:
            self.due.add(seg)

    def note_update_ratio(self, seg: str, by_name: Mapping[str, float]) -> None:
        """The update/weight ratios of the newest step, for the profile."""
        history = self.histories.get(seg)
        if history is not None:
            history.extras["update_ratio"] = dict(by_name)

    def draw(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Draw the due pictures (every segment's with ``final``) to the Images tab, on rank zero."""
        due = set(self.histories) if final else self.due
        self.due = set()
        if not self.on or not trainer.is_global_zero:
            return
        tag = "grad_flow_microbatch" if self.microbatch else "grad_flow"
        what = "micro-batch gradient" if self.microbatch else "gradient"
        run = getattr(trainer.logger, "name", None) or ""
        latest = None
        for seg in sorted(due):
            history = self.histories[seg]
            step = history.latest_step
            if step is None or self.drawn.get(seg) == step:
                continue
            self.drawn[seg] = latest = step
            label = f"{run} {seg.rstrip('/')}".strip()
            heat_title = f"log10 {what} L2 norm per layer, steps {history.steps[0] if len(history) else step}-{step}"
            prof_title = f"{what} L2 norm per layer at step {step} (input side at the left)"
            if label:
                heat_title, prof_title = f"{label}: {heat_title}", f"{label}: {prof_title}"
            _session.log_image(trainer, f"{tag}/{seg}heatmap", flow.heatmap_png(history, title=heat_title), step)
            _session.log_image(trainer, f"{tag}/{seg}profile", flow.profile_png(history, title=prof_title), step)
        if latest is not None and self.every:
            self.next_step = ((latest + 1) // self.every + 1) * self.every

    def state_dict(self) -> dict[str, Any]:
        return {
            "flows": {seg: history.state_dict() for seg, history in self.histories.items()},
            "flow_next": self.next_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.histories = {}
        for seg, saved in state_dict.get("flows", {}).items():
            history = self.histories[seg] = flow.FlowHistory(self.capacity)
            history.load_state_dict(saved)
        self.next_step = state_dict.get("flow_next", self.next_step)
