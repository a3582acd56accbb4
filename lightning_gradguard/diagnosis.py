"""Findings and advice from gradient snapshots: vanishing, exploding, dead and non-finite.

Plain PyTorch, no Trainer. :class:`HealthDetector` keeps its running statistics on the
device and turns one :class:`~lightning_gradguard.stats.GroupedStats` per step into a
small device vector of flags and measurements (read to the host once per step by the
callback). When a flag is up, :func:`build_finding` turns the host copy of the statistics
into a :class:`Finding` that names the layers, the numbers and the remedies that fit the
model (:func:`advise`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_gradguard.stats import Grouping, ParamSet, take_snapshot
    >>> from lightning_gradguard.diagnosis import HealthDetector
    >>> net = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(8, 8), nn.Sigmoid())])
    >>> params = ParamSet.from_module(net)
    >>> layers = Grouping.build(params)
    >>> detector = HealthDetector(patience=3)
    >>> for _ in range(3):
    ...     net.zero_grad()
    ...     net(torch.randn(4, 8)).sum().backward()
    ...     reading = detector.update(take_snapshot(params).grouped(layers))
    >>> bool(reading[detector.index("vanishing")])
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.stats import GroupedStats, HostStats

__all__ = [
    "KINDS",
    "Finding",
    "GradientAnomalyError",
    "HealthDetector",
    "advise",
    "build_finding",
]

#: The kinds of finding, in the order of :attr:`HealthDetector.FIELDS`' flags.
KINDS = ("nonfinite", "exploding", "vanishing", "dead", "overflow")


class GradientAnomalyError(RuntimeError):
    """Raised by ``VanishExplodeAlarm`` with ``action="raise"``; ``.finding`` holds the diagnosis."""

    def __init__(self, finding: Finding) -> None:
        self.finding = finding
        super().__init__(finding.message())


@dataclass
class Finding:
    """One diagnosed gradient problem.

    Attributes:
        kind: one of :data:`KINDS`.
        step: the optimizer step (``trainer.global_step`` before the step).
        summary: one line saying what was seen.
        layers: the layers concerned, in depth order, with their gradient norms.
        total_norm: the total gradient norm at that step.
        ratio: deepest / shallowest layer gradient norm (vanishing), if known.
        zscore: z-score of log(total norm) against the run's history (exploding), if known.
        advice: remedies that fit this model.
        dump_path: where the crash dump was written, if one was.
        dump_batch: which batch the crash dump holds (e.g. ``"batch_idx 6, the first
            micro-batch of the step whose loss went non-finite (3 of 4 accumulated)"``).
    """

    kind: str
    step: int
    summary: str
    layers: list[tuple[str, float]] = field(default_factory=list)
    total_norm: float = math.nan
    ratio: float | None = None
    zscore: float | None = None
    advice: list[str] = field(default_factory=list)
    dump_path: str | None = None
    dump_batch: str | None = None

    def message(self) -> str:
        """A multi-line, human-readable report."""
        lines = [f"[gradguard] {self.kind} gradients at step {self.step}: {self.summary}"]
        if self.layers:
            shown = ", ".join(f"{name} ({norm:.3g})" for name, norm in self.layers[:6])
            more = f" and {len(self.layers) - 6} more" if len(self.layers) > 6 else ""
            lines.append(f"  layers: {shown}{more}")
        if self.advice:
            lines.append("  try:")
            lines.extend(f"   - {a}" for a in self.advice)
        if self.dump_path:
            held = f" (holds {self.dump_batch})" if self.dump_batch else ""
            lines.append(f"  crash dump: {self.dump_path}{held}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Device-side detection
# --------------------------------------------------------------------------------------


class HealthDetector:
    """Running gradient-health checks, all on the device.

    Per step, :meth:`update` returns a float32 device vector laid out as
    :attr:`FIELDS`: one 0/1 flag per kind (``nonfinite``, ``exploding``, ``vanishing``,
    ``dead``, ``overflow``), then ``zscore`` (NaN until the spike rule is armed), ``ratio``
    (NaN with fewer than two layers that have a gradient), ``total_norm``, ``loss_scale``.
    Reading it is the caller's single host copy for the step.

    Rules (every threshold is an argument):

    - **nonfinite**: a NaN/Inf in any gradient or a non-finite loss. Under an fp16
      ``GradScaler`` (``scaler_active=True``) such a step is an *overflow* that the scaler
      skips and answers by halving the scale; it becomes ``nonfinite`` only after
      ``max_consecutive_overflows`` overflow steps in a row, or when the scale falls below
      ``min_loss_scale``.
    - **exploding**: the total norm is above ``max_norm``, or, after ``warmup_steps``
      finite steps, a spike: log(total norm) is more than ``spike_zscore`` standard
      deviations above its exponential moving average (weight ``ema_alpha``; the standard
      deviation is floored at ``sqrt(0.1)`` in log units) *and* the norm is at least
      ``spike_min_ratio`` times the average's level. The average is fed the log-norm
      capped at mean + ``spike_zscore`` std, so one spike moves it by at most
      ``ema_alpha * spike_zscore`` std while a lasting change of level is still learned.
    - **vanishing**: over the last ``patience`` finite steps, the median of the deepest
      layer's norm over the shallowest's is above ``vanish_ratio`` (or, if
      ``vanish_floor`` is set, the shallowest's median norm is below it while the
      deepest's is not). Shallowest and deepest are the first and last groups that have a
      gradient, in registration order. A median over a window, rather than a run of
      consecutive steps, lets one odd step neither trigger nor reset it.
    - **dead**: a group that has gradients, all exactly zero, for ``dead_patience``
      consecutive finite steps (max |g| is exact, so float32 underflow of a norm cannot
      fake it).

    The defaults come from measurements on healthy and broken models (see the README's
    "How the defaults were chosen").

    Args:
        max_norm: absolute ceiling on the total norm (``None``: none).
        spike_zscore: z-score of log-norm that counts as a spike (``None``: no spike rule).
        spike_min_ratio: a spike must also be this many times the moving level (``None``:
            no such guard).
        ema_alpha: weight of the newest step in the moving mean/variance, in (0, 1).
        warmup_steps: finite steps before the spike rule is armed.
        vanish_ratio: median deepest/shallowest norm ratio that counts as vanishing
            (``None``: off).
        vanish_floor: absolute floor for the shallowest layer's median norm (``None``: off).
        patience: the window, in finite steps, of the vanishing medians.
        dead_patience: consecutive all-zero steps that make a layer dead.
        max_consecutive_overflows: fp16 overflow steps in a row that count as a failure.
        min_loss_scale: fp16 loss scale below which overflow counts as a failure.
    """

    FIELDS = (*KINDS, "zscore", "ratio", "total_norm", "loss_scale")

    def __init__(
        self,
        *,
        max_norm: float | None = 1e6,
        spike_zscore: float | None = 8.0,
        spike_min_ratio: float | None = 50.0,
        ema_alpha: float = 0.05,
        warmup_steps: int = 20,
        vanish_ratio: float | None = 1e3,
        vanish_floor: float | None = None,
        patience: int = 20,
        dead_patience: int = 10,
        max_consecutive_overflows: int = 20,
        min_loss_scale: float = 1.0,
    ) -> None:
        self.max_norm = max_norm
        self.spike_zscore = spike_zscore
        self.spike_min_ratio = spike_min_ratio
        self.ema_alpha = ema_alpha
        self.warmup_steps = warmup_steps
        self.vanish_ratio = vanish_ratio
        self.vanish_floor = vanish_floor
        self.patience = patience
        self.dead_patience = dead_patience
        self.max_consecutive_overflows = max_consecutive_overflows
        self.min_loss_scale = min_loss_scale
        self._state: dict[str, Tensor] = {}
        self._present_cache: dict[tuple[tuple[bool, ...], torch.device], Tensor] = {}

    def index(self, name: str) -> int:
        """Position of ``name`` in :attr:`FIELDS`."""
        return self.FIELDS.index(name)

    # -------------------------------------------------------------- state

    def _ensure_state(self, num_groups: int, device: torch.device) -> dict[str, Tensor]:
        st = self._state
        if not st or st["dead_run"].numel() != num_groups:
            zeros = torch.zeros((), dtype=torch.float32, device=device)
            fresh = {
                "count": zeros.clone(),
                "mean": zeros.clone(),
                "var": zeros.clone(),
                "vanish_seen": zeros.clone(),
                "shallow_ring": torch.full((self.patience,), math.nan, device=device),
                "deep_ring": torch.full((self.patience,), math.nan, device=device),
                "overflow_run": zeros.clone(),
                "dead_run": torch.zeros(num_groups, dtype=torch.float32, device=device),
            }
            # keep what a checkpoint restored, when its shape fits
            for key, value in st.items():
                if key in fresh and value.shape == fresh[key].shape:
                    fresh[key] = value.to(device)
            self._state = st = fresh
        elif st["count"].device != device:
            self._state = st = {k: v.to(device) for k, v in st.items()}
        return st

    def state_dict(self) -> dict[str, list[float] | float]:
        """Running statistics as plain Python numbers (one host copy; call at checkpoint time)."""
        return {k: (v.tolist()) for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = {k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}

    # -------------------------------------------------------------- the check

    def update(
        self,
        stats: GroupedStats,
        *,
        loss_finite: Tensor | None = None,
        scaler_active: bool = False,
        loss_scale: Tensor | None = None,
    ) -> Tensor:
        """Check one step's statistics and advance the running state; no host sync.

        Args:
            stats: the step's per-group statistics (unscaled).
            loss_finite: 0-dim device bool, whether every micro-batch loss was finite.
            scaler_active: an enabled fp16 ``GradScaler`` will skip non-finite steps.
            loss_scale: the scaler's current scale (device tensor), if any.

        Returns:
            A float32 device vector laid out as :attr:`FIELDS`.
        """
        norms, maxes = stats.norms, stats.max_abs
        device = norms.device
        st = self._ensure_state(len(norms), device)
        one = torch.ones((), device=device)
        zero = torch.zeros((), device=device)

        finite = torch.isfinite(maxes).all()
        if loss_finite is not None:
            finite = finite & loss_finite.to(device)
        total = stats.total_norm

        # --- non-finite / fp16 overflow
        if scaler_active:
            overflow_run = torch.where(finite, zero, st["overflow_run"] + 1)
            scale = loss_scale.to(device).float() if loss_scale is not None else one
            failing = (overflow_run >= self.max_consecutive_overflows) | (scale < self.min_loss_scale)
            nonfinite = ~finite & failing
            overflow = ~finite
            st["overflow_run"] = overflow_run
        else:
            nonfinite = ~finite
            overflow = torch.zeros((), dtype=torch.bool, device=device)
            scale = one

        # --- exploding: ceiling and spike of log-norm against a moving mean/variance
        log_total = torch.log(total.clamp_min(1e-38))
        std = st["var"].clamp_min(0.1).sqrt()
        z = (log_total - st["mean"]) / std
        armed = st["count"] >= self.warmup_steps
        exploding = torch.zeros((), dtype=torch.bool, device=device)
        if self.spike_zscore is not None:
            spike = armed & (z > self.spike_zscore)
            if self.spike_min_ratio is not None:
                spike = spike & (log_total - st["mean"] >= math.log(self.spike_min_ratio))
            exploding = exploding | spike
        if self.max_norm is not None:
            exploding = exploding | (total > self.max_norm)
        exploding = exploding & finite
        # update the moving statistics with finite steps only, spikes capped
        alpha = self.ema_alpha
        cap = st["mean"] + (self.spike_zscore or math.inf) * std
        x = torch.where(armed, torch.minimum(log_total, cap), log_total)
        first = st["count"] == 0
        delta = x - st["mean"]
        new_mean = torch.where(first, x, st["mean"] + alpha * delta)
        new_var = torch.where(first, zero, (1 - alpha) * (st["var"] + alpha * delta * delta))
        st["mean"] = torch.where(finite, new_mean, st["mean"])
        st["var"] = torch.where(finite, new_var, st["var"])
        st["count"] = st["count"] + finite.float()

        # --- vanishing: medians over a window of the deepest and shallowest layers that
        # have a gradient
        present = [i for i, p in enumerate(stats.present) if p]
        ratio = torch.full((), math.nan, device=device)
        vanishing = torch.zeros((), dtype=torch.bool, device=device)
        if len(present) >= 2:
            log_shallow = torch.log(norms[present[0]].clamp_min(1e-38))
            log_deep = torch.log(norms[present[-1]].clamp_min(1e-38))
            slot = (st["vanish_seen"] % self.patience).long().view(1)
            shallow_ring = st["shallow_ring"].index_copy(0, slot, log_shallow.view(1))
            deep_ring = st["deep_ring"].index_copy(0, slot, log_deep.view(1))
            st["shallow_ring"] = torch.where(finite, shallow_ring, st["shallow_ring"])
            st["deep_ring"] = torch.where(finite, deep_ring, st["deep_ring"])
            st["vanish_seen"] = st["vanish_seen"] + finite.float()
            full = st["vanish_seen"] >= self.patience
            log_ratio = (st["deep_ring"] - st["shallow_ring"]).nanmedian()
            ratio = torch.exp(log_ratio)
            if self.vanish_ratio is not None:
                vanishing = vanishing | (full & (log_ratio > math.log(self.vanish_ratio)))
            if self.vanish_floor is not None:
                floor = math.log(self.vanish_floor)
                low = (st["shallow_ring"].nanmedian() < floor) & (st["deep_ring"].nanmedian() >= floor)
                vanishing = vanishing | (full & low)

        # --- dead: all-zero gradient in a group that has gradients
        key = (stats.present, device)
        has = self._present_cache.get(key)
        if has is None:  # built once per layout: no host-to-device copy per step
            has = self._present_cache[key] = torch.tensor(stats.present, dtype=torch.bool, device=device)
        zero_now = (maxes == 0) & has
        dead_run = torch.where(zero_now, st["dead_run"] + 1, torch.zeros_like(st["dead_run"]))
        dead_run = torch.where(finite, dead_run, st["dead_run"])
        st["dead_run"] = dead_run
        dead = (dead_run >= self.dead_patience).any()

        return torch.stack(
            [
                nonfinite.float(),
                exploding.float(),
                vanishing.float(),
                dead.float(),
                overflow.float(),
                torch.where(armed, z, torch.full_like(z, math.nan)),  # no z-score before the rule is armed
                ratio,
                total,
                scale,
            ]
        )

    def dead_groups(self) -> Tensor:
        """Per group, whether it has been all-zero for ``dead_patience`` steps (device bool)."""
        return self._state["dead_run"] >= self.dead_patience if self._state else torch.zeros(0, dtype=torch.bool)


# --------------------------------------------------------------------------------------
# Findings and advice
# --------------------------------------------------------------------------------------

_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.LogSigmoid)
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_DEEP_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class ModelTraits:
    """What :func:`advise` looks at in a model."""

    saturating: tuple[str, ...]
    plain_rnn: bool
    gated_rnn: bool
    normalized: bool
    transformer: bool
    depth: int

    @classmethod
    def of(cls, model: nn.Module | None) -> ModelTraits:
        if model is None:
            return cls((), False, False, False, False, 0)
        saturating: list[str] = []
        plain_rnn = gated_rnn = normalized = transformer = False
        depth = 0
        for module in model.modules():
            if isinstance(module, _SATURATING) and type(module).__name__ not in saturating:
                saturating.append(type(module).__name__)
            elif isinstance(module, nn.RNN):
                plain_rnn = True
            elif isinstance(module, (nn.LSTM, nn.GRU)):
                gated_rnn = True
            elif isinstance(module, _NORMS):
                normalized = True
            elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                transformer = True
            if isinstance(module, _DEEP_LAYERS):
                depth += 1
        return cls(tuple(saturating), plain_rnn, gated_rnn, normalized, transformer, depth)


def advise(kind: str, model: nn.Module | None, *, scaler_active: bool = False) -> list[str]:
    """Remedies for a ``kind`` of finding that fit ``model``'s modules.

    Example:
        >>> from torch import nn
        >>> advise("vanishing", nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))[0]
        'replace the Sigmoid hidden activations with ReLU/GELU and use He (kaiming) initialisation'
    """
    t = ModelTraits.of(model)
    out: list[str] = []
    if kind in ("vanishing", "dead"):
        if t.saturating:
            acts = "/".join(t.saturating)
            out.append(f"replace the {acts} hidden activations with ReLU/GELU and use He (kaiming) initialisation")
        if t.plain_rnn:
            out.append("replace nn.RNN with nn.LSTM or nn.GRU, whose gates keep gradients alive over long sequences")
        if t.depth >= 8 and not t.normalized:
            out.append(
                f"{t.depth} stacked Linear/Conv layers without normalisation: add residual (skip) "
                "connections and LayerNorm/BatchNorm"
            )
        elif t.depth >= 8 and not t.saturating:
            out.append("add residual (skip) connections so gradients reach the first layers directly")
        if kind == "dead":
            out.append(
                "an all-zero gradient means no signal reaches the layer: dead ReLUs (try LeakyReLU/GELU, a lower "
                "learning rate), an output that is detached or unused, or an activation underflowing to exactly 0"
            )
        out.append("check the initialisation scale: Xavier for tanh/sigmoid, He for ReLU, orthogonal for RNNs")
    elif kind == "exploding":
        out.append(
            "clip gradients by norm: lightning_gradguard.AdaptiveClipper(mode='zscore') "
            "or Trainer(gradient_clip_val=1.0)"
        )
        out.append("lower the learning rate or add a warm-up")
        if t.plain_rnn or t.gated_rnn:
            out.append("recurrent nets explode through repeated weight_hh products: orthogonal init, norm clipping")
        if t.plain_rnn:
            out.append("nn.LSTM/nn.GRU are more stable than a plain nn.RNN")
        if not t.normalized and t.depth >= 8:
            out.append("add normalisation (LayerNorm/BatchNorm) to keep activations in range")
        out.append("check the initialisation scale (weights too large make every layer amplify)")
    elif kind in ("nonfinite", "overflow"):
        out.append("check the batch for NaN/Inf (the crash dump holds the first micro-batch that went non-finite)")
        out.append("check the loss for log(0), division by zero or sqrt of a negative; add an epsilon")
        out.append("lower the learning rate; a diverged step makes the next one non-finite")
        if scaler_active or kind == "overflow":
            out.append(
                "fp16 overflows above 65504: prefer bf16 ('bf16-mixed'), or a GradScaler with a lower "
                "init_scale; keep losses and softmax in float32"
            )
        out.append("clip gradients (AdaptiveClipper) so a spike cannot turn into Inf")
    return out


def _layers_below(host: HostStats, limit: float) -> list[tuple[str, float]]:
    return [(n, v) for n, v in host.group_norms.items() if v < limit]


def build_finding(
    kind: str,
    step: int,
    host: HostStats,
    reading: Sequence[float],
    *,
    detector: HealthDetector,
    present: Sequence[bool],
    model: nn.Module | None = None,
    scaler_active: bool = False,
    dead_groups: Sequence[bool] = (),
    overflow_run: int | None = None,
) -> Finding:
    """Turn a flagged step into a :class:`Finding` (host side; runs only when a flag is up)."""
    fields = dict(zip(HealthDetector.FIELDS, reading))
    z, ratio, total = fields["zscore"], fields["ratio"], fields["total_norm"]
    names = [n for n, p in zip(host.group_norms, present) if p]
    layers: list[tuple[str, float]] = []
    zscore: float | None = None
    ratio_out: float | None = None
    if kind == "nonfinite":
        layers = [(n, host.group_norms[n]) for n in host.nonfinite_groups]
        if layers:
            summary = f"NaN/Inf in {len(layers)} layer(s), first {layers[0][0]}"
        else:
            summary = "the training loss is NaN/Inf"
        if scaler_active:
            summary += (
                f" after {overflow_run} fp16 overflow steps in a row (loss scale {fields['loss_scale']:.3g})"
                if overflow_run
                else f" and the loss scale fell to {fields['loss_scale']:.3g}"
            )
        summary += "; the step was skipped, the weights are untouched"
    elif kind == "overflow":
        layers = [(n, host.group_norms[n]) for n in host.nonfinite_groups]
        summary = (
            f"fp16 overflow (loss scale {fields['loss_scale']:.3g}); the GradScaler skips this step and lowers "
            "the scale — normal now and then"
        )
    elif kind == "exploding":
        ranked = sorted(((n, host.group_norms[n]) for n in names), key=lambda kv: -kv[1])
        layers = ranked[:6]
        parts = [f"total norm {total:.3g}"]
        if detector.max_norm is not None and total > detector.max_norm:
            parts.append(f"above the ceiling max_norm={detector.max_norm:g}")
        if math.isfinite(z) and detector.spike_zscore is not None and z > detector.spike_zscore:
            parts.append(f"a spike {z:.1f} standard deviations above the run's recent log-norm")
            zscore = z
        summary = ", ".join(parts)
    elif kind == "vanishing":
        ratio_out = ratio
        deep = host.group_norms[names[-1]] if names else math.nan
        limit = deep / detector.vanish_ratio if detector.vanish_ratio else (detector.vanish_floor or 0.0)
        if detector.vanish_floor is not None:
            limit = max(limit, detector.vanish_floor)
        layers = [(n, v) for n, v in _layers_below(host, limit) if n in names] or [
            (names[0], host.group_norms[names[0]])
        ]
        shallow = host.group_norms[names[0]]
        now = deep / shallow if shallow > 0 else math.inf
        summary = (
            f"the shallowest layer's gradient is {now:.3g}x smaller than the deepest's "
            f"({names[0]}: {shallow:.3g} vs {names[-1]}: {deep:.3g}; median over the last "
            f"{detector.patience} steps: {ratio:.3g}x)"
        )
    elif kind == "dead":
        layers = [(n, host.group_norms[n]) for n, d in zip(host.group_norms, dead_groups) if d]
        summary = f"{len(layers)} layer(s) received an all-zero gradient for {detector.dead_patience} steps in a row"
    else:  # pragma: no cover - guarded by KINDS
        raise ValueError(f"unknown kind {kind!r}")
    return Finding(
        kind=kind,
        step=step,
        summary=summary,
        layers=layers,
        total_norm=total,
        ratio=ratio_out,
        zscore=zscore,
        advice=advise(kind, model, scaler_active=scaler_active),
    )
