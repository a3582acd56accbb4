"""Shared plumbing of the gradguard callbacks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_gradguard import _lightning
from lightning_gradguard.callbacks import _session
from lightning_gradguard.stats import GradSnapshot, Grouping, ParamSet


class GradGuardCallback(Callback):
    """Base class: counts backward passes so that all gradguard callbacks share one snapshot."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _session.check_strategy(trainer.strategy, type(self).__name__)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        _session.note_backward(trainer, loss)

    def _snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str, optimizer: Any = None
    ) -> GradSnapshot:
        if optimizer is not None:
            optimizer = _lightning.raw_optimizer(optimizer)
        return _session.shared_snapshot(trainer, pl_module, phase, optimizer)

    def _grouping(self, params: ParamSet) -> Grouping:
        """This callback's layers of ``params`` (from its ``group_by`` arguments), built once per set.

        Kept in the parameter set's own cache, so a rebuilt set (parameters added, a param
        group appended) gets a fresh grouping and callbacks with the same arguments share one.
        """
        group_by = getattr(self, "group_by", "module")
        group_depth = getattr(self, "group_depth", None)
        group_patterns = getattr(self, "group_patterns", None)
        key = ("grouping", group_by, group_depth, tuple(sorted((group_patterns or {}).items())))
        grouping = params.cache.get(key)
        if grouping is None:
            grouping = params.cache[key] = Grouping.build(
                params, group_by=group_by, group_depth=group_depth, group_patterns=group_patterns
            )
        return grouping


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "an integer >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
