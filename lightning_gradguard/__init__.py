"""lightning-gradguard: Lightning callbacks that keep gradients healthy.

Public API:

- :class:`GradientNormLogger` — total and per-layer gradient norms to any Lightning logger.
- :class:`VanishExplodeAlarm` — vanishing / exploding / dead / non-finite gradients: warn,
  skip the step, stop or raise :class:`GradientAnomalyError`.
- :class:`AdaptiveClipper` — clipping by a fixed or learned threshold (norm, value,
  percentile, zscore, AGC), robust to NaN steps and exact across resume.
- :class:`AmpUnscaleCheck` — fp16 AMP: scaled-gradient misuse, loss-scale health, underflow.
- :class:`GradGuard` — the recommended callbacks as one (also enabled with ``GRADGUARD=1``,
  no code change).
- :mod:`lightning_gradguard.stats` — the Trainer-free snapshot engine the callbacks share.
- :mod:`lightning_gradguard.flow` — the gradient-flow pictures; ``python -m lightning_gradguard
  report LOGDIR`` turns a run's logs into one HTML page.
"""

from lightning_gradguard.callbacks import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm
from lightning_gradguard.diagnosis import Finding, GradientAnomalyError
from lightning_gradguard.preset import GradGuard

__version__ = "0.1.0.dev0"

__all__ = [
    "AdaptiveClipper",
    "AmpUnscaleCheck",
    "Finding",
    "GradGuard",
    "GradientAnomalyError",
    "GradientNormLogger",
    "VanishExplodeAlarm",
    "__version__",
]
