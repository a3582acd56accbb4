"""The gradguard Lightning callbacks."""

from lightning_gradguard.callbacks.grad_norm_logger import GradientNormLogger
from lightning_gradguard.callbacks.vanish_explode_alarm import VanishExplodeAlarm

__all__ = ["GradientNormLogger", "VanishExplodeAlarm"]
