"""lightning-gradguard: Lightning callbacks that keep gradients healthy.

Public API:

- :class:`GradientNormLogger` — total and per-layer gradient norms to any Lightning logger.
- :mod:`lightning_gradguard.stats` — the Trainer-free snapshot engine the callbacks share.
"""

from lightning_gradguard.callbacks import GradientNormLogger

__version__ = "0.1.0.dev0"

__all__ = ["GradientNormLogger", "__version__"]
