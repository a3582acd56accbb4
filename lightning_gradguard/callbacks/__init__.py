"""The gradguard Lightning callbacks."""

from lightning_gradguard.callbacks.grad_norm_logger import GradientNormLogger

__all__ = ["GradientNormLogger"]
