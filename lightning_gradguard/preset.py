"""The recommended gradguard callbacks as one callback, and zero-code enabling through ``GRADGUARD``.

:class:`GradGuard` is one Lightning callback that runs a preset set of gradguard callbacks
(by default :class:`~lightning_gradguard.GradientNormLogger`,
:class:`~lightning_gradguard.VanishExplodeAlarm` and
:class:`~lightning_gradguard.AmpUnscaleCheck`), for ``Trainer(callbacks=[GradGuard()])``
and for a LightningCLI YAML (``class_path: lightning_gradguard.GradGuard``).

:func:`callbacks_factory` is registered in the entry-point group
``lightning.pytorch.callbacks_factory``, which every Lightning ``Trainer`` reads: with the
environment variable ``GRADGUARD`` set, an unchanged training script gets gradguard::

    GRADGUARD=1 python train.py          # the recommended set
    GRADGUARD=full python train.py       # plus weight norms, update ratios, largest |g|
    GRADGUARD=log python train.py        # the logger only

A callback of the same class that the script attached itself is never added twice.

Example:
    >>> [type(cb).__name__ for cb in GradGuard(preset="recommended").callbacks]
    ['GradientNormLogger', 'VanishExplodeAlarm', 'AmpUnscaleCheck']
    >>> preset_from_env({"GRADGUARD": "1"}), preset_from_env({}), preset_from_env({"GRADGUARD": "off"})
    ('recommended', None, None)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_gradguard import _validation
from lightning_gradguard.callbacks import AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm

__all__ = ["ENV_VAR", "PRESETS", "GradGuard", "Preset", "callbacks_factory", "preset_from_env"]

#: The environment variable read by :func:`callbacks_factory`.
ENV_VAR = "GRADGUARD"

#: A preset's name.
Preset = Literal["recommended", "full", "log", "alarm"]


#: The logger's extra settings in the ``"full"`` preset.
_FULL_LOGGER = {"log_param_norms": True, "log_update_ratio": True, "log_max_abs": True}


def _build(preset: str, log_every_n_steps: int | None, flow_every_n_steps: int | None) -> list[Callback]:
    """The callbacks of ``preset``, all at one logging interval."""
    out: list[Callback] = []
    if preset != "alarm":
        extra = _FULL_LOGGER if preset == "full" else {}
        out.append(
            GradientNormLogger(log_every_n_steps=log_every_n_steps, flow_every_n_steps=flow_every_n_steps, **extra)
        )
    if preset != "log":
        out.append(VanishExplodeAlarm(log_every_n_steps=log_every_n_steps))
    if preset in ("recommended", "full"):
        out.append(AmpUnscaleCheck(log_every_n_steps=log_every_n_steps))
    return out


#: What each preset holds: name -> description (:func:`_build` makes the callbacks).
PRESETS: dict[str, str] = {
    "recommended": "GradientNormLogger, VanishExplodeAlarm and AmpUnscaleCheck with their defaults",
    "full": "the recommended set, the logger also with weight norms, update ratios and largest |g|",
    "log": "GradientNormLogger alone",
    "alarm": "VanishExplodeAlarm alone",
}

_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def preset_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The preset that ``GRADGUARD`` asks for, or ``None`` when it is unset or off.

    ``1``/``true``/``yes``/``on`` mean ``"recommended"``; ``0``/``false``/``no``/``off`` or
    empty mean nothing; otherwise a preset name (any case).

    Raises:
        ValueError: for any other value, naming the variable, the value and what is allowed.
    """
    raw = (os.environ if environ is None else environ).get(ENV_VAR)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _OFF:
        return None
    if value in _ON:
        return "recommended"
    if value in PRESETS:
        return value
    allowed = ", ".join(f"{name} ({what})" for name, what in PRESETS.items())
    raise ValueError(
        f"The environment variable {ENV_VAR}={raw!r} names no gradguard preset. Use 1 (the recommended set), "
        f"one of: {allowed}; or 0 / unset for none."
    )


class GradGuard(Callback):
    """The recommended gradguard callbacks as one callback.

    Runs a preset list of gradguard callbacks (:attr:`callbacks`) and forwards every
    Lightning hook to each of them in order; its checkpoint state holds theirs.

    Args:
        preset: ``"recommended"`` (GradientNormLogger, VanishExplodeAlarm and AmpUnscaleCheck
            with their defaults), ``"full"`` (the logger also with weight norms, update
            ratios and largest \\|g\\|), ``"log"`` (the logger alone) or ``"alarm"`` (the
            alarm alone).
        log_every_n_steps: the one logging interval of every callback of the preset;
            ``None``: the Trainer's.
        flow_every_n_steps: the gradient-flow pictures' interval (``None``: none).

    Raises:
        ValueError: if an argument is outside what is allowed; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradguard import GradGuard

        trainer = Trainer(callbacks=[GradGuard()])

    or, in a LightningCLI YAML::

        trainer:
          callbacks:
            - class_path: lightning_gradguard.GradGuard
              init_args: {preset: full, log_every_n_steps: 20}
    """

    def __init__(
        self,
        *,
        preset: Preset = "recommended",
        log_every_n_steps: int | None = None,
        flow_every_n_steps: int | None = 500,
    ) -> None:
        self.preset = _validation.choice("preset", preset, tuple(PRESETS))
        self.log_every_n_steps = _validation.integer("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.flow_every_n_steps = _validation.integer("flow_every_n_steps", flow_every_n_steps, allow_none=True)
        self.callbacks: list[Callback] = _build(self.preset, self.log_every_n_steps, self.flow_every_n_steps)
        #: added by the ``GRADGUARD`` environment variable: gives way to callbacks the script attached itself
        self.from_env = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> GradGuard | None:
        """The preset ``GRADGUARD`` asks for (see :func:`preset_from_env`), or ``None``."""
        preset = preset_from_env(environ)
        if preset is None:
            return None
        guard = cls(preset=preset)
        guard.from_env = True
        return guard

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            preset=self.preset, log_every_n_steps=self.log_every_n_steps, flow_every_n_steps=self.flow_every_n_steps
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.from_env:
            self._give_way(trainer)
        for callback in self.callbacks:
            callback.setup(trainer, pl_module, stage)

    def _give_way(self, trainer: pl.Trainer) -> None:
        """Drop the callbacks of a class that the script attached itself (or through another GradGuard)."""
        others: list[Callback] = []
        for callback in trainer.callbacks:
            if callback is self:
                continue
            others += callback.callbacks if isinstance(callback, GradGuard) else [callback]
        kept = [cb for cb in self.callbacks if not any(isinstance(o, type(cb)) for o in others)]
        dropped = [type(cb).__name__ for cb in self.callbacks if cb not in kept]
        if dropped:
            rank_zero_info(
                f"[gradguard] {ENV_VAR}: {', '.join(dropped)} already attached by the script; not added twice."
            )
        self.callbacks = kept

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for callback in self.callbacks:
            saved = state_dict.get(callback.state_key)
            if saved is not None:
                callback.load_state_dict(saved)


def _forward(name: str) -> Callable[..., None]:
    def hook(self: GradGuard, *args: Any, **kwargs: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"Forward ``{name}`` to each callback of the preset."
    return hook


for _name, _value in vars(Callback).items():
    if callable(_value) and _name.startswith("on_") and _name not in vars(GradGuard):
        setattr(GradGuard, _name, _forward(_name))
GradGuard.teardown = _forward("teardown")  # type: ignore[method-assign]


def callbacks_factory() -> list[Callback]:
    """Lightning's ``callbacks_factory`` entry point: the preset ``GRADGUARD`` asks for, else nothing.

    Raises:
        ValueError: when ``GRADGUARD`` names no preset (see :func:`preset_from_env`).
    """
    guard = GradGuard.from_environment()
    return [] if guard is None else [guard]
