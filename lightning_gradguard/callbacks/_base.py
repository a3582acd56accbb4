"""The base class of the gradguard callbacks: the contract between them, written down.

Every gradguard callback

- shares one gradient snapshot per moment through the trainer's
  :class:`~lightning_gradguard.callbacks._session.Session`; the base class counts backward
  passes in ``on_before_backward`` for that. Subclasses do not override that hook
  (``__init_subclass__`` refuses it): they implement :meth:`GradGuardCallback.before_backward`;
- registers itself in the session at ``setup``, so callbacks learn about each other from
  the session (:meth:`GradGuardCallback.attached`), never by class name;
- groups parameters into layers from its :class:`Layers` settings, and logs on the steps
  :meth:`GradGuardCallback.is_log_step` names (one cadence, one expression: Lightning's own,
  so their points share the steps of the loss), at the x-axis step :meth:`GradGuardCallback.log_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_gradguard import _lightning, _validation
from lightning_gradguard.callbacks import _session
from lightning_gradguard.stats import GradSnapshot, Grouping, ParamSet

#: How parameters form layers (the ``group_by`` argument of every callback), for LightningCLI's ``--help``.
GroupBy = Literal["module", "parameter", "depth", "pattern", "total", "auto"]


@dataclass(frozen=True)
class Layers:
    """How a callback groups parameters into layers (``group_by``, ``group_depth``, ``group_patterns``).

    Built through :meth:`checked`, which validates the three together.
    """

    group_by: str = "module"
    group_depth: int | None = None
    group_patterns: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def checked(cls, group_by: Any = "module", group_depth: Any = None, group_patterns: Any = None) -> Layers:
        group_by, group_depth, patterns, _ = _validation.grouping(group_by, group_depth, group_patterns)
        return cls(group_by, group_depth, None if patterns is None else tuple(patterns.items()))

    def of(self, params: ParamSet) -> Grouping:
        """The grouping of ``params``, built once per parameter set and shared by equal settings."""
        key = ("grouping", self)
        grouping = params.cache.get(key)
        if grouping is None:
            patterns = None if self.group_patterns is None else dict(self.group_patterns)
            grouping = params.cache[key] = Grouping.build(
                params, group_by=self.group_by, group_depth=self.group_depth, group_patterns=patterns
            )
        return grouping


def is_due(step: int, interval: int) -> bool:
    """Whether ``step`` is one of every ``interval`` steps, counted the way Lightning counts them.

    Lightning writes ``self.log`` values when ``(step + 1) % log_every_n_steps == 0``, where
    ``step`` counts the batches that stepped before this one.

    Example:
        >>> [s for s in range(30) if is_due(s, 10)]
        [9, 19, 29]
    """
    return (step + 1) % interval == 0


class GradGuardCallback(Callback):
    """Base class of the gradguard callbacks (see the module docstring for the contract).

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None``: the Trainer's.
        layers: how parameters form layers; ``None`` for callbacks that do not group.
    """

    def __init__(self, *, log_every_n_steps: int | None = None, layers: Layers | None = None) -> None:
        self.log_every_n_steps = _validation.integer("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.layers = layers or Layers()

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):  # a public setting may be part of the state key: make it again when read
            self.__dict__.pop("_state_key", None)
        super().__setattr__(name, value)

    @property
    def state_key(self) -> str:
        """The class and every setting of :meth:`_key_settings`: two callbacks that differ fit in one checkpoint.

        Lightning reads it at every hook call (for its profiler's labels), so it is made once
        and again only after a public attribute was assigned.
        """
        key = self.__dict__.get("_state_key")
        if key is None:
            settings = self._key_settings()  # none: Lightning's key, the class name
            key = self._generate_state_key(**settings) if settings else type(self).__qualname__
            self.__dict__["_state_key"] = key
        return key

    def _key_settings(self) -> dict[str, Any]:
        """The settings that tell two callbacks of this class apart (see :attr:`state_key`)."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "on_before_backward" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides on_before_backward; gradguard callbacks implement before_backward() "
                "instead, so that the shared backward count cannot be skipped."
            )

    @property
    def group_by(self) -> str:
        return self.layers.group_by

    @property
    def group_depth(self) -> int | None:
        return self.layers.group_depth

    @property
    def group_patterns(self) -> dict[str, str] | None:
        return None if self.layers.group_patterns is None else dict(self.layers.group_patterns)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _session.check_strategy(trainer.strategy, type(self).__name__)
        state = _session.session(trainer)
        attached = state.attached.setdefault(type(self), [])
        if self not in attached:
            attached.append(self)
        if self.needs_max_abs:
            state.wants_max_abs = True

    @property
    def needs_max_abs(self) -> bool:
        """Whether this callback reads max |g| of the step snapshot (then every snapshot computes it up front).

        Snapshots otherwise compute max |g| only when read, from the gradients as they are
        then: a reader that comes after a clipper must say so here to see pre-clip values.
        """
        return False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        attached = _session.session(trainer).attached.get(type(self), [])
        if self in attached:
            attached.remove(self)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        _session.note_backward(trainer, loss)
        self.before_backward(trainer, pl_module, loss)

    def before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """What a subclass does in ``on_before_backward`` (after the shared count moved)."""

    # ------------------------------------------------------------------ shared helpers

    @staticmethod
    def attached(trainer: pl.Trainer, kind: type) -> bool:
        """Whether a gradguard callback of class ``kind`` is attached to ``trainer`` (known after ``setup``)."""
        return _session.session(trainer).has(kind)

    @staticmethod
    def log_step(trainer: pl.Trainer) -> int:
        """The x-axis step of this batch's points: the one Lightning's own ``self.log`` values carry.

        It counts the batches that stepped an optimizer before this one; with one optimizer it
        equals ``trainer.global_step`` before the step, under manual optimisation with several
        optimizers ``global_step`` runs ahead of it (one count per optimizer step).
        """
        return _session.log_step(trainer)

    def log_interval(self, trainer: pl.Trainer) -> int:
        """The logging interval in force: this callback's ``log_every_n_steps``, else the Trainer's (else 1)."""
        return self.log_every_n_steps or trainer.log_every_n_steps or 1

    def is_log_step(self, trainer: pl.Trainer, step: int | None = None) -> bool:
        """Whether this callback logs at step ``step`` (default: :meth:`log_step`).

        The one cadence of every gradguard callback, and Lightning's: a batch logs when
        ``(step + 1) % interval == 0`` (steps 9, 19, ... for an interval of 10), so gradguard's
        points share their steps with the loss and every other ``self.log`` value.
        """
        step = self.log_step(trainer) if step is None else step
        return is_due(step, self.log_interval(trainer))

    def custom_scalar_charts(self, trainer: pl.Trainer) -> dict[str, list[Any]]:
        """This callback's charts for the "gradguard" custom-scalars tab: ``{title: ["Multiline", [regex, ...]]}``.

        :func:`~lightning_gradguard.callbacks._session.write_layout` merges the charts of every
        attached gradguard callback into one layout (TensorBoard shows the last layout written,
        so there must be one writer). Default: none.
        """
        return {}

    def _snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str, optimizer: Any = None
    ) -> GradSnapshot:
        if optimizer is not None:
            optimizer = _lightning.raw_optimizer(optimizer)
        return _session.shared_snapshot(trainer, pl_module, phase, optimizer)

    def _grouping(self, params: ParamSet, trainer: pl.Trainer | None = None) -> Grouping:
        """This callback's layers of ``params``, input side first, in the order the layers run.

        With ``trainer``, the first call for a parameter set walks the autograd graph of the
        last loss once (:func:`~lightning_gradguard.stats.record_forward_order`; again only
        when a parameter it did not reach gets a gradient), so that ``Grouping.names``
        follows the forward pass; with several ranks rank zero's order is used everywhere.
        Without it, the order another callback recorded for the same set, else registration
        order (``Grouping.ordered_by`` says which).
        """
        if trainer is not None:
            from lightning_gradguard.stats import record_forward_order

            agree = None
            if trainer.world_size > 1:
                agree = lambda ranks: trainer.strategy.broadcast(ranks, src=0)  # noqa: E731
            # the last loss, which Lightning still holds (see _session.note_backward); its graph's structure
            # outlives backward()
            state = _session.session(trainer)
            record_forward_order(params, state.last_loss, agree=agree)
            state.want_order(params)
        return self.layers.of(params)
