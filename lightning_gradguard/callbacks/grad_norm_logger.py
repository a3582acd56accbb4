"""GradientNormLogger: total and per-layer gradient norms to every attached logger."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.callbacks._base import GradGuardCallback, Layers
from lightning_gradguard.stats import (
    Grouping,
    ParamSet,
    iter_group_tensors,
    local_tensor,
    reduce_norms,
    tensor_stats,
    total_norm,
)

HOOKS = ("on_before_optimizer_step", "on_after_backward")


@dataclass
class _PendingUpdate:
    """Weights saved before a logged step, to measure the update once it is applied."""

    step: int
    prefix: str
    params: ParamSet
    grouping: Grouping
    before: list[Tensor | None]
    param_norms: Tensor  # per-group norm of the weights before the step


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
    ============================  ==========================================================

    With ``hook="on_after_backward"`` the ``grad_norm`` prefix becomes
    ``grad_norm_microbatch``: the norms are those of the first micro-batch of each logged
    step (the gradient of that micro-batch alone, before accumulation and, under DDP,
    before the all-reduce of a ``no_sync`` micro-batch).

    The step on the x-axis is ``trainer.global_step`` before the step is applied (the
    first optimizer step is step 0). With a :class:`~lightning.pytorch.loggers.TensorBoardLogger`
    a custom-scalars layout groups the charts under a "gradguard" tab.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` uses the
            Trainer's ``log_every_n_steps``.
        hook: ``"on_before_optimizer_step"`` (default) or ``"on_after_backward"``.
        group_by: how parameters form layers: ``"module"`` (owning module, default),
            ``"parameter"`` (one per tensor), ``"depth"`` (module path cut to
            ``group_depth`` components), ``"pattern"`` (``group_patterns``) or
            ``"total"`` (no per-layer keys).
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
        custom_scalars: write the TensorBoard custom-scalars layout at the start of ``fit``.

    Raises:
        ValueError: if an argument is outside what is allowed; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning_gradguard import GradientNormLogger

        trainer = Trainer(
            logger=TensorBoardLogger("runs"),
            callbacks=[GradientNormLogger(log_every_n_steps=10, log_update_ratio=True)],
        )
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        hook: str = "on_before_optimizer_step",
        group_by: str = "module",
        group_depth: int | None = None,
        group_patterns: Mapping[str, str] | None = None,
        per_layer: bool = True,
        log_max_abs: bool = False,
        log_param_norms: bool = False,
        log_update_ratio: bool = False,
        histogram_every_n_steps: int | None = None,
        custom_scalars: bool = True,
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
        self.hook = hook
        self.per_layer = per_layer
        self.log_max_abs = log_max_abs
        self.log_param_norms = log_param_norms
        self.log_update_ratio = log_update_ratio
        self.histogram_every_n_steps = histogram_every_n_steps
        self.custom_scalars = custom_scalars
        self._pending: list[_PendingUpdate] = []
        self._last_backward_step: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn(
                "GradientNormLogger has no logger to write to (the Trainer has `logger=False`); "
                "it will log nothing. Attach a TensorBoardLogger or CSVLogger."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending.clear()
        self._last_backward_step = None
        if self.custom_scalars and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(self._layout())

    # ------------------------------------------------------------------ hooks

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook != "on_after_backward" or not trainer.loggers:
            return
        step = trainer.global_step
        if not self.is_log_step(trainer, step) or self._last_backward_step == step:
            return
        self._last_backward_step = step
        snap = self._snapshot(trainer, pl_module, _session.PHASE_BACKWARD)
        self._log(trainer, pl_module, snap, None, "grad_norm_microbatch", step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.hook != "on_before_optimizer_step" or not trainer.loggers:
            return
        step = trainer.global_step
        if not self.is_log_step(trainer, step):
            return
        optimizer = _lightning.raw_optimizer(optimizer)
        snap = self._snapshot(trainer, pl_module, _session.PHASE_STEP, optimizer)
        self._log(trainer, pl_module, snap, optimizer, "grad_norm", step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        while self._pending:
            self._log_update(trainer, self._pending.pop(0))

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
        grouping = self._grouping(params)
        stats = snap.grouped(grouping)
        opt_seg = ""
        if optimizer is not None and len(trainer.optimizers) > 1:
            opt_seg = f"opt{_session.optimizer_index(trainer, optimizer)}/"
        extra: list[Tensor] = []
        param_norms: Tensor | None = None
        if self.log_param_norms or (self.log_update_ratio and optimizer is not None):
            weights = [p.detach() for p in params.params]
            pn, _ = tensor_stats(weights, params.reduce_keys, device=stats.norms.device, cache=params.cache)
            param_norms = reduce_norms(pn, grouping.index_tensor(pn.device), len(grouping))
            if self.log_param_norms:
                extra += [param_norms, total_norm(param_norms)]
        host = stats.to_host(extra)

        metrics: dict[str, float] = {f"{prefix}/{opt_seg}total": host.total_norm}
        per_layer = self.per_layer and self.group_by != "total"
        if per_layer:  # a layer without any gradient (frozen, unused this step) has no norm to log
            for (name, value), present in zip(host.group_norms.items(), stats.present):
                if present:
                    metrics[f"{prefix}/{opt_seg}{name}"] = value
        if self.log_max_abs:
            metrics[f"grad_max_abs/{opt_seg}total"] = host.max_abs
        if self.log_param_norms:
            pnorms = host.extras[0]
            metrics[f"param_norm/{opt_seg}total"] = host.extras[1][0]
            if per_layer:
                for name, value, present in zip(grouping.names, pnorms, stats.present):
                    if present:
                        metrics[f"param_norm/{opt_seg}{name}"] = value
        _session.log_metrics(trainer, metrics, step)

        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._log_histograms(trainer, snap, grouping, opt_seg, step)
        if self.log_update_ratio and optimizer is not None and param_norms is not None:
            before = [local_tensor(p).detach().clone() if p.grad is not None else None for p in params.params]
            self._pending.append(_PendingUpdate(step, opt_seg, params, grouping, before, param_norms))

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
        values = torch.cat([upd / pending.param_norms.clamp_min(1e-30), ratio_total.view(1)])
        values = values.tolist()
        ratios, total = values[:-1], values[-1]
        metrics = {f"update_ratio/{pending.prefix}total": total}
        if self.per_layer and self.group_by != "total":
            present = [False] * len(grouping)
            for gi, b in zip(grouping.index, pending.before):
                present[gi] = present[gi] or b is not None
            for name, value, has in zip(grouping.names, ratios, present):
                if has:
                    metrics[f"update_ratio/{pending.prefix}{name}"] = value
        _session.log_metrics(trainer, metrics, pending.step)

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

    def _layout(self) -> dict[str, Any]:
        """TensorBoard custom-scalars layout: one chart per family, layers overlaid."""
        opt = r"(opt\d+/)?"
        charts = {
            "gradient norm, total": ["Multiline", [rf"^grad_norm/{opt}total$"]],
            "gradient norm per layer": ["Multiline", [rf"^grad_norm/{opt}(?!total$)[^/]+$"]],
        }
        if self.hook == "on_after_backward":
            charts = {
                "micro-batch gradient norm, total": ["Multiline", [rf"^grad_norm_microbatch/{opt}total$"]],
                "micro-batch gradient norm per layer": [
                    "Multiline",
                    [rf"^grad_norm_microbatch/{opt}(?!total$)[^/]+$"],
                ],
            }
        if self.log_max_abs:
            charts["largest |gradient| element"] = ["Multiline", [rf"^grad_max_abs/{opt}total$"]]
        if self.log_param_norms:
            charts["weight norm per layer"] = ["Multiline", [r"^param_norm/"]]
        if self.log_update_ratio:
            charts["update / weight ratio per layer"] = ["Multiline", [r"^update_ratio/"]]
        return {"gradguard": charts}
