"""Gradient clipping without a Trainer: the math behind :class:`~lightning_gradguard.AdaptiveClipper`.

- :mod:`~lightning_gradguard.clipping.ops`: coefficients and in-place clipping of
  gradient lists (total norm, element-wise), on the device;
- :mod:`~lightning_gradguard.clipping.thresholds`: thresholds learned from the run's own
  norms (AutoClip's percentile, a ZClip-like z-score), with ``state_dict``;
- :mod:`~lightning_gradguard.clipping.agc`: adaptive gradient clipping (NFNets), unit-wise;
- :mod:`~lightning_gradguard.clipping.modes`: the callback's modes, one class each, and
  the registry :data:`MODES`.

Example:
    >>> import torch
    >>> from lightning_gradguard.clipping import PercentileThreshold, clip_by_norm_
    >>> grads = [torch.full((3,), 4.0), torch.full((2,), 3.0)]
    >>> rule = PercentileThreshold(percentile=50.0, window=8, warmup_steps=2)
    >>> for past in (1.0, 2.0, 3.0):
    ...     rule.observe(torch.tensor(past), accept=torch.tensor(True))
    >>> norm = torch.linalg.vector_norm(torch.cat(grads))
    >>> coef = clip_by_norm_(grads, norm, rule.threshold())
    >>> round(float(torch.linalg.vector_norm(torch.cat(grads))), 4)
    2.0
"""

from lightning_gradguard.clipping.agc import AGCResult, UnitwiseClip
from lightning_gradguard.clipping.modes import MODES, ClipMode, ClipResult, Step
from lightning_gradguard.clipping.ops import (
    clip_by_norm_,
    clip_by_value_,
    clip_coefficient,
    coalesce_sparse_grads_,
    scale_,
)
from lightning_gradguard.clipping.thresholds import (
    LearnedThreshold,
    PercentileThreshold,
    ZScoreThreshold,
    filled_percentile,
)

__all__ = [
    "MODES",
    "AGCResult",
    "ClipMode",
    "ClipResult",
    "LearnedThreshold",
    "PercentileThreshold",
    "Step",
    "UnitwiseClip",
    "ZScoreThreshold",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_coefficient",
    "coalesce_sparse_grads_",
    "filled_percentile",
    "scale_",
]
