"""GradientNormLogger: total and per-layer gradient norms to every attached logger."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation, flow
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import GradGuardCallback, GroupBy, Layers, is_due
from lightning_gradguard.callbacks._flow_pictures import FlowPictures
from lightning_gradguard.stats import (
    Grouping,
    ParamSet,
    iter_group_tensors,
    local_tensor,
    reduce_norms,
    tensor_stats,
    total_norm,
)

#: Where the logger reads the gradients.
Hook = Literal["on_before_optimizer_step", "on_after_backward"]
HOOKS: tuple[str, ...] = ("on_before_optimizer_step", "on_after_backward")


def _log10(value: float) -> float:
    """log10 of a positive finite value, else NaN (left out of the logs)."""
    return math.log10(value) if math.isfinite(value) and value > 0 else math.nan


def _first_middle_last(names: list[str]) -> dict[str, str]:
    """``{"first": name, "middle": name, "last": name}`` of the layers in forward order."""
    if not names:
        return {}
    return {"first": names[0], "middle": names[(len(names) - 1) // 2], "last": names[-1]}


@dataclass
class _PendingUpdate:
    """Weights saved before a logged step, to measure the update once it is applied."""

    step: int
    prefix: str
    params: ParamSet
    grouping: Grouping
    before: list[Tensor | None]
    param_norms: Tensor  # per-group norm of the weights before the step
    picture: Grouping | None = None  # the pictures' layers, where they are not the logged ones
    picture_param_norms: Tensor | None = None  # their weight norms before the step


def _layer_values(
    stats: Any, norms: Sequence[float], weights: Sequence[float] | None
) -> tuple[tuple[str, ...], list[float | None], dict[str, float] | None]:
    """Names, norms (``None`` without a gradient) and weight norms of ``stats``' layers, for the pictures."""
    names, present = stats.grouping.names, stats.present
    by_layer = [v if has else None for v, has in zip(norms, present)]
    if weights is None:
        return names, by_layer, None
    return names, by_layer, {n: v for n, v, has in zip(names, weights, present) if has}


def _weight_norms(
    params: Any, device: torch.device, grouping: Grouping, picture: Grouping | None
) -> tuple[Tensor, Tensor | None]:
    """Per-layer weight norms before the step, for the logged layers and for the pictures' own (if any)."""
    norms, _ = tensor_stats([p.detach() for p in params.params], params.reduce_keys, device=device, cache=params.cache)
    logged = reduce_norms(norms, grouping.index_tensor(norms.device), len(grouping))
    if picture is None:
        return logged, None
    return logged, reduce_norms(norms, picture.index_tensor(norms.device), len(picture))


def _saved(before: list[Tensor | None]) -> tuple[bool, ...]:
    """Per parameter, whether it had a gradient (a saved weight) at the logged step."""
    return tuple(b is not None for b in before)


class GradientNormLogger(GradGuardCallback):
    r"""Log total and per-layer gradient L2 norms to every logger of the ``Trainer``.

    Norms are exact L2 norms of the gradients the optimizer is about to use (in
    ``on_before_optimizer_step``: accumulated, unscaled under fp16 AMP, before any
    clipping), computed with one ``torch._foreach_norm`` pass shared with the other
    gradguard callbacks and copied to the host once per logging step. On steps that do
    not log, the callback does nothing at all.

    Logged keys (``<group>`` is a layer name chosen by ``group_by``; with several
    optimizers every key gets an ``opt<i>/`` segment after its prefix, e.g.
    ``grad_norm/opt1/total``):

    ============================  ==========================================================
    ``grad_norm/total``           L2 norm of all gradients of the optimizer
    ``grad_norm/<group>``         L2 norm of the group's gradients (``per_layer=True``)
    ``grad_max_abs/total``        largest \|g\| of any element (``log_max_abs=True``)
    ``param_norm/total``,         L2 norm of the weights before the step
    ``param_norm/<group>``        (``log_param_norms=True``)
    ``update_ratio/total``,       \|W_after - W_before\| / \|W_before\|, the relative size of
    ``update_ratio/<group>``      the update the optimizer applied (``log_update_ratio=True``)
    ``grad_hist/<group>``         histogram of the group's gradient values, TensorBoard only
                                  (``histogram_every_n_steps``)
    ``grad_norm_log10/<which>``   log10 of the norm of the ``total`` and of the ``first``,
                                  ``middle`` and ``last`` layer in forward order: values that
                                  span decades, readable on a linear axis
    ``update_ratio_log10/...``    the same for the update ratio (``log_update_ratio=True``)
    ``grad_flow/heatmap``,        Images tab (TensorBoard, needs matplotlib): log10 gradient
    ``grad_flow/profile``         norm per layer x step, and per layer at the newest step
                                  (``flow_every_n_steps``)
    ``gradguard/layers``          Text tab: the layers in forward order
    ============================  ==========================================================

    NaN and infinite values (a non-finite gradient) and log10 of a zero norm are not
    logged: TensorBoard cannot draw them. The heatmap shows them (red: non-finite, black:
    exactly zero), and :class:`~lightning_gradguard.VanishExplodeAlarm` reports them.

    With ``hook="on_after_backward"`` the ``grad_norm`` prefix becomes
    ``grad_norm_microbatch``: the norms are those of the first micro-batch of each logged
    step (the gradient of that micro-batch alone, before accumulation and, under DDP,
    before the all-reduce of a ``no_sync`` micro-batch).

    Points land on the steps of Lightning's own ``self.log`` values: a batch logs when
    ``(step + 1) % log_every_n_steps == 0`` (steps 9, 19, ... for 10), at the step Lightning
    gives it (batches that stepped before it; with one optimizer ``trainer.global_step``
    before the step). Every gradguard callback follows this one cadence. With a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` a custom-scalars layout (the
    "gradguard" tab) shows one chart per question: the total norm; the first, middle and
    last layer in log10; clipping threshold vs pre-clip norm (with an ``AdaptiveClipper``);
    the fp16 loss scale (with an ``AmpUnscaleCheck``).

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` uses the
            Trainer's ``log_every_n_steps``.
        hook: ``"on_before_optimizer_step"`` (default) or ``"on_after_backward"``.
        group_by: how parameters form layers: ``"auto"`` (default: the owning module, and
            for a model with more than :data:`~lightning_gradguard.stats.AUTO_MAX_GROUPS`
            module groups consecutive layers merged along the module tree into at most
            that many, named after what they cover; the gradient-flow pictures keep one
            row per module), ``"module"`` (owning module), ``"parameter"`` (one per
            tensor), ``"depth"`` (module path cut to ``group_depth`` components),
            ``"pattern"`` (``group_patterns``) or ``"total"`` (no per-layer keys).
        group_depth: depth for ``group_by="depth"``.
        group_patterns: group name -> regular expression searched in parameter names,
            for ``group_by="pattern"``; parameters that match none form ``"other"``.
        per_layer: log ``grad_norm/<group>`` besides the total.
        log_max_abs: log ``grad_max_abs/total``.
        log_param_norms: log ``param_norm/...``.
        log_update_ratio: log ``update_ratio/...``; keeps a copy of the optimizer's weights
            from before a logged step until it is applied (memory of one weight copy on
            logging steps only).
        histogram_every_n_steps: write gradient histograms every this many steps to
            TensorBoard loggers (``None``: never). Costs a host copy of the gradients.
            Non-finite values (an overflowed fp16 step) are left out of the histogram.
        custom_scalars: write the TensorBoard custom-scalars layout (at the first logging step,
            when the layers are known).
        flow_every_n_steps: draw the gradient-flow pictures (Images tab) every this many steps
            and at the end of ``fit``, from the norms of the logging steps so far (``None``:
            never). Needs matplotlib (extra ``plots``); without it the logger says so once
            and logs everything else. A picture costs a few hundred ms on the steps it is
            drawn; steps in between pay nothing for it.
        flow_history: logging steps the pictures' history keeps; beyond that older steps are
            thinned (memory does not grow with the run).

    Raises:
        ValueError: if an argument is outside what is allowed; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning_gradguard import GradientNormLogger

        trainer = Trainer(
            logger=TensorBoardLogger("runs"),
            callbacks=[GradientNormLogger(log_every_n_steps=10, log_update_ratio=True, flow_every_n_steps=200)],
        )
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        hook: Hook = "on_before_optimizer_step",
        group_by: GroupBy = "auto",
        group_depth: int | None = None,
        group_patterns: Mapping[str, str] | None = None,
        per_layer: bool = True,
        log_max_abs: bool = False,
        log_param_norms: bool = False,
        log_update_ratio: bool = False,
        histogram_every_n_steps: int | None = None,
        custom_scalars: bool = True,
        flow_every_n_steps: int | None = 500,
        flow_history: int = flow.DEFAULT_CAPACITY,
    ) -> None:
        super().__init__(
            log_every_n_steps=log_every_n_steps, layers=Layers.checked(group_by, group_depth, group_patterns)
        )
        _validation.choice("hook", hook, HOOKS)
        for name, value in (
            ("per_layer", per_layer),
            ("log_max_abs", log_max_abs),
            ("log_param_norms", log_param_norms),
            ("log_update_ratio", log_update_ratio),
            ("custom_scalars", custom_scalars),
        ):
            _validation.boolean(name, value)
        _validation.integer("histogram_every_n_steps", histogram_every_n_steps, allow_none=True)
        _validation.integer("flow_every_n_steps", flow_every_n_steps, allow_none=True)
        _validation.integer("flow_history", flow_history, low=2, high=_validation.MAX_WINDOW)
        self.hook = hook
        self.per_layer = per_layer
        self.log_max_abs = log_max_abs
        self.log_param_norms = log_param_norms
        self.log_update_ratio = log_update_ratio
        self.histogram_every_n_steps = histogram_every_n_steps
        self.custom_scalars = custom_scalars
        self.flow_every_n_steps = flow_every_n_steps
        self.flow_history = flow_history
        self._pending: list[_PendingUpdate] = []
        self._last_backward_step: int | None = None
        self._pictures = FlowPictures(flow_every_n_steps, flow_history, hook)
        self._names: dict[str, tuple[str, ...]] = {}  # layer names last written to the Text tab

    @property
    @override
    def needs_max_abs(self) -> bool:
        return self.log_max_abs

    def _key_settings(self) -> dict[str, Any]:
        """The settings that tell two loggers apart, so that several fit in one checkpoint."""
        return dict(
            hook=self.hook,
            log_every_n_steps=self.log_every_n_steps,
            group_by=self.group_by,
            group_depth=self.group_depth,
            group_patterns=self.group_patterns,
        )

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn(
                "GradientNormLogger has no logger to write to (the Trainer has `logger=False`); "
                "it will log nothing. Attach a TensorBoardLogger or CSVLogger."
            )
        self._pictures.on = False
        if stage == "fit":
            self._pictures.setup(trainer, self.group_by)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending.clear()
        self._last_backward_step = None
        self._names.clear()  # a new Trainer: its logs get the layer list and the layout again
        self._pictures.start()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pictures.draw(trainer, final=True)

    # ------------------------------------------------------------------ hooks

    @override
    @torch.no_grad()  # statistics only: no autograd bookkeeping on each small op
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook != "on_after_backward" or not trainer.loggers:
            return
        step = self.log_step(trainer)
        if not self.is_log_step(trainer, step) or self._last_backward_step == step:
            return
        self._last_backward_step = step
        snap = self._snapshot(trainer, pl_module, _session.PHASE_BACKWARD)
        self._log(trainer, pl_module, snap, None, "grad_norm_microbatch", step)

    @override
    @torch.no_grad()  # statistics only: no autograd bookkeeping on each small op
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.hook != "on_before_optimizer_step" or not trainer.loggers:
            return
        step = self.log_step(trainer)
        if not self.is_log_step(trainer, step):
            return
        optimizer = _lightning.raw_optimizer(optimizer)
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        self._log(trainer, pl_module, snap, optimizer, "grad_norm", step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        while self._pending:
            self._log_update(trainer, self._pending.pop(0))
        if self._pictures.due:
            self._pictures.draw(trainer)

    # ------------------------------------------------------------------ work

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        snap: Any,
        optimizer: torch.optim.Optimizer | None,
        prefix: str,
        step: int,
    ) -> None:
        params = snap.params
        grouping = self._grouping(params, trainer)
        stats = snap.grouped(grouping)
        picture = self._pictures.layers(params, grouping, self.group_by)
        opt_seg = ""
        if optimizer is not None and len(trainer.optimizers) > 1:
            opt_seg = f"opt{_session.optimizer_index(trainer, optimizer)}/"
        extra: list[Tensor] = []
        param_norms = picture_param_norms = None
        if self.log_param_norms or (self.log_update_ratio and optimizer is not None):
            param_norms, picture_param_norms = _weight_norms(params, stats.norms.device, grouping, picture)
            if self.log_param_norms:
                extra += [param_norms, total_norm(param_norms)]
        picture_stats = snap.grouped(picture) if picture is not None else None
        if picture_stats is not None:  # in the same host copy
            extra += [picture_stats.norms] + ([picture_param_norms] if self.log_param_norms else [])
        host = stats.to_host(extra)

        metrics: dict[str, float] = {f"{prefix}/{opt_seg}total": host.total_norm}
        per_layer = self.per_layer and self.group_by != "total"
        if per_layer:  # a layer without any gradient (frozen, unused this step) has no norm to log
            for (name, value), present in zip(host.group_norms.items(), stats.present):
                if present:
                    metrics[f"{prefix}/{opt_seg}{name}"] = value
        present_names = [n for n, has in zip(grouping.names, stats.present) if has]
        layer_norms = dict(zip(grouping.names, host.group_norms.values()))
        metrics[f"{prefix}_log10/{opt_seg}total"] = _log10(host.total_norm)
        if self.group_by != "total":
            for which, name in _first_middle_last(present_names).items():
                metrics[f"{prefix}_log10/{opt_seg}{which}"] = _log10(layer_norms[name])
        if self.log_max_abs:
            metrics[f"grad_max_abs/{opt_seg}total"] = host.max_abs
        if self.log_param_norms:
            pnorms = host.extras[0]
            metrics[f"param_norm/{opt_seg}total"] = host.extras[1][0]
            if per_layer:
                for name, value, present in zip(grouping.names, pnorms, stats.present):
                    if present:
                        metrics[f"param_norm/{opt_seg}{name}"] = value
        _session.log_metrics(trainer, metrics, step, finite_only=True)
        self._describe_layers(trainer, grouping, opt_seg, step)
        if self._pictures.on:
            # the logged layers, or the pictures' own after the logged extras (see above)
            with_weights = self.log_param_norms
            drawn, values, weights = stats, list(host.group_norms.values()), host.extras[0] if with_weights else None
            if picture_stats is not None:
                k = 2 if with_weights else 0
                drawn, values, weights = picture_stats, host.extras[k], host.extras[k + 1] if with_weights else None
            self._pictures.record(opt_seg, step, *_layer_values(drawn, values, weights))

        if self.histogram_every_n_steps and is_due(step, self.histogram_every_n_steps):
            self._log_histograms(trainer, snap, grouping, opt_seg, step)
        if self.log_update_ratio and optimizer is not None and param_norms is not None:
            before = [local_tensor(p).detach().clone() if p.grad is not None else None for p in params.params]
            pending = _PendingUpdate(step, opt_seg, params, grouping, before, param_norms)
            if picture is not None:
                pending.picture, pending.picture_param_norms = picture, picture_param_norms
            self._pending.append(pending)

    def _log_update(self, trainer: pl.Trainer, pending: _PendingUpdate) -> None:
        params = pending.params
        present = [(i, b) for i, b in enumerate(pending.before) if b is not None]
        diffs: list[Tensor | None] = [None] * len(params)
        if present:
            idx, olds = zip(*present)
            news = [local_tensor(params.params[i]).detach() for i in idx]
            for i, d in zip(idx, _lightning.foreach_sub(news, list(olds))):
                diffs[i] = d
        un, _ = tensor_stats(diffs, params.reduce_keys, device=pending.param_norms.device, cache=params.cache)
        grouping = pending.grouping
        index = grouping.index_tensor(un.device)
        upd = reduce_norms(un, index, len(grouping))
        ratio_total = total_norm(upd) / total_norm(pending.param_norms).clamp_min(1e-30)
        parts = [upd / pending.param_norms.clamp_min(1e-30), ratio_total.view(1)]
        picture = pending.picture
        if picture is not None and pending.picture_param_norms is not None:  # in the same host copy
            drawn = reduce_norms(un, picture.index_tensor(un.device), len(picture))
            parts.append(drawn / pending.picture_param_norms.clamp_min(1e-30))
        values = torch.cat(parts).tolist()
        ratios, total, picture_ratios = values[: len(grouping)], values[len(grouping)], values[len(grouping) + 1 :]
        metrics = {
            f"update_ratio/{pending.prefix}total": total,
            f"update_ratio_log10/{pending.prefix}total": _log10(total),
        }
        by_name = {
            name: value
            for name, value, has in zip(grouping.names, ratios, grouping.present(_saved(pending.before)))
            if has
        }
        if self.per_layer and self.group_by != "total":
            for name, value in by_name.items():
                metrics[f"update_ratio/{pending.prefix}{name}"] = value
        if self.group_by != "total":
            for which, name in _first_middle_last(list(by_name)).items():
                metrics[f"update_ratio_log10/{pending.prefix}{which}"] = _log10(by_name[name])
        _session.log_metrics(trainer, metrics, pending.step, finite_only=True)
        if picture is not None:
            by_name = {
                name: value
                for name, value, has in zip(picture.names, picture_ratios, picture.present(_saved(pending.before)))
                if has
            }
        self._pictures.note_update_ratio(pending.prefix, by_name)

    def _log_histograms(self, trainer: pl.Trainer, snap: Any, grouping: Grouping, opt_seg: str, step: int) -> None:
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers or not trainer.is_global_zero:
            return
        grads = [local_tensor(p.grad) if p.grad is not None else None for p in snap.params.params]
        inv = None if snap.scale is None else snap.scale.reciprocal()
        for name, tensors in zip(grouping.names, iter_group_tensors(snap.params, grouping, grads)):
            if not tensors:
                continue
            values = torch.cat([t.detach().reshape(-1).float() for t in tensors])
            if inv is not None:
                values = values * inv
            values = values.cpu()
            values = values[values.isfinite()]  # an overflowed fp16 step: the histogram shows the finite part
            if not values.numel():
                continue
            for writer in writers:
                writer.add_histogram(f"grad_hist/{opt_seg}{name}", values, step)

    def _describe_layers(self, trainer: pl.Trainer, grouping: Grouping, opt_seg: str, step: int) -> None:
        """The layers in forward order to the Text tab, and the custom-scalars layout, when they change."""
        names = tuple(grouping.names)
        if self._names.get(opt_seg) == names:
            return
        self._names[opt_seg] = names
        if self.custom_scalars:
            _session.write_layout(trainer, self._charts(trainer))
        if self.group_by == "total":
            return
        which = " / ".join(f"**{name}**" for name in _first_middle_last(list(names)).values())
        shown = " · ".join(f"`{name}`" for name in names[:500])
        more = f" ... and {len(names) - 500} more" if len(names) > 500 else ""
        text = (
            f"**{len(names)} layers** (group_by={self.group_by}), input side first; first / middle / last in the "
            f"log10 charts: {which}\n\n{shown}{more}"
        )
        _session.log_text(trainer, f"gradguard/layers{'/' + opt_seg.rstrip('/') if opt_seg else ''}", text, step)

    @override
    def custom_scalar_charts(self, trainer: pl.Trainer) -> dict[str, list[Any]]:
        """The logger's charts: total norm, first/middle/last layer in log10, and optional families."""
        opt = r"(opt\d+/)?"
        prefix = "grad_norm_microbatch" if self.hook == "on_after_backward" else "grad_norm"
        what = "micro-batch gradient" if self.hook == "on_after_backward" else "gradient"
        charts: dict[str, list[Any]] = {
            f"{what} norm, total": ["Multiline", [rf"^{prefix}/{opt}total$"]],
        }
        if self.group_by != "total":
            # the title names no layer: TensorBoard merges the layouts of all runs by title
            title = f"log10 {what} norm: first, middle, last layer (names in the Text tab)"
            charts[title] = ["Multiline", [rf"^{prefix}_log10/{opt}(first|middle|last)$"]]
        if self.log_max_abs:
            charts["largest |gradient| element"] = ["Multiline", [rf"^grad_max_abs/{opt}total$"]]
        if self.log_param_norms:
            charts["weight norm, total"] = ["Multiline", [rf"^param_norm/{opt}total$"]]
        if self.log_update_ratio:
            charts["log10 update/weight ratio: total, first, middle, last layer"] = [
                "Multiline",
                [rf"^update_ratio_log10/{opt}(total|first|middle|last)$"],
            ]
        return charts

    def _charts(self, trainer: pl.Trainer) -> dict[str, list[Any]]:
        """The whole "gradguard" tab: this logger's charts, then those of the other attached callbacks."""
        charts = self.custom_scalar_charts(trainer)
        for callbacks in _session.session(trainer).attached.values():
            for callback in callbacks:
                if callback is not self and not isinstance(callback, GradientNormLogger):
                    charts.update(callback.custom_scalar_charts(trainer))
        return charts

    # ------------------------------------------------------------------ checkpointing

    @property
    def _legacy_state_key(self) -> Any:
        """Where Lightning looks when :attr:`state_key` is not in a checkpoint: the default
        ``group_by`` was ``"module"`` before ``"auto"``, so a checkpoint written with it still
        resumes its pictures (for up to 64 modules the two group alike, and beyond the
        pictures keep one row per module either way)."""
        if self.group_by != "auto":
            return super()._legacy_state_key
        return self._generate_state_key(**{**self._key_settings(), "group_by": "module"})

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._pictures.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pictures.load_state_dict(state_dict)

    @property
    def flow_histories(self) -> dict[str, flow.FlowHistory]:
        """The gradient-flow history per optimizer (``""``, or ``"opt<i>/"`` with several), for your own plots."""
        return self._pictures.histories
