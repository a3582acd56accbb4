"""The gradguard Lightning callbacks."""

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper
from lightning_gradguard.callbacks.amp_unscale_check import AmpUnscaleCheck
from lightning_gradguard.callbacks.grad_norm_logger import GradientNormLogger
from lightning_gradguard.callbacks.vanish_explode_alarm import VanishExplodeAlarm

__all__ = ["AdaptiveClipper", "AmpUnscaleCheck", "GradientNormLogger", "VanishExplodeAlarm"]
