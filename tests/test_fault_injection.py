"""Fault injection: a matrix of real ``Trainer.fit`` training patterns x the gradguard callbacks.

Every cell trains a small model on CPU for a few steps with one callback and checks the
README's promises against independent measurements:

- the LightningModule records, in its own ``on_before_optimizer_step`` (it runs after every
  callback's hook), the float64 norm, the largest |g| and the AGC ratio of the gradients the
  optimizer is about to apply; a first callback (``_PreClip``) records them before gradguard;
- ``_History`` keeps the weights and the optimizer state after every batch.

Rows (patterns) put a non-finite step into most runs. Outside the alarm's columns the
module itself drops a non-finite step's gradients after the callbacks (``guard``), standing
in for ``VanishExplodeAlarm`` so that the following steps stay checkable; in the alarm's
columns nothing but the alarm stands between a NaN and the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_close_rel, fp16_cpu_plugin, loader, make_trainer, poisoned_loader, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_gradguard import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm

STEPS = 10  # optimizer steps of an automatic-optimisation run (one epoch: the loaders hold 12+ batches)
UNFREEZE_STEP = 5
MAX_NORM = 0.05
CLIP_VALUE = 0.01
AGC_CLIPPING, AGC_EPS = 0.01, 1e-3  # AdaptiveClipper(mode="agc") defaults


# --------------------------------------------------------------------------------------
# independent measurements
# --------------------------------------------------------------------------------------


def _raw(optimizer):
    return getattr(optimizer, "_optimizer", optimizer)


def _grad_stats(optimizer) -> dict[str, Any] | None:
    """Float64 statistics of the gradients in ``optimizer``; ``None`` when a callback dropped them all.

    Sparse gradients are densified (duplicates summed), complex ones measured through their
    real view (same L2 norm; the max |component| is what value clipping would bound).
    ``agc`` is the largest ``||G_i|| / (clipping * max(||W_i||, eps))`` over AGC units: rows of
    a tensor with two or more dimensions, a whole vector otherwise.
    """
    params = [p for group in _raw(optimizer).param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return None
    flats, agc = [], 0.0
    for p in params:
        g = p.grad.detach()
        if g.is_sparse:
            g = g.coalesce().to_dense()
        w = p.detach()
        if g.is_complex():
            g, w = g.to(torch.complex128), w.to(torch.complex128)
            flats.append(torch.view_as_real(g).flatten())
        else:
            g, w = g.double(), w.double()
            flats.append(g.flatten())
        rows = 1 if g.ndim < 2 else g.shape[0]
        g_units = torch.linalg.vector_norm(g.reshape(rows, -1), dim=1)
        w_units = torch.linalg.vector_norm(w.reshape(rows, -1), dim=1).clamp_min(AGC_EPS)
        agc = max(agc, (g_units / (AGC_CLIPPING * w_units)).max().item())
    flat = torch.cat(flats)
    finite = bool(torch.isfinite(flat).all())
    return {
        "norm": torch.linalg.vector_norm(flat).item(),
        "max_abs": flat.abs().max().item(),
        "finite": finite,
        "agc": agc,
    }


def _opt_index(trainer, optimizer) -> int:
    raw = _raw(optimizer)
    return next(i for i, o in enumerate(trainer.optimizers) if _raw(o) is raw)


class Base(pl.LightningModule):
    """Records what each optimizer applies: ``applied[(optimizer index, global_step)]``.

    With ``guard=True`` a non-finite step's gradients are dropped here, after the callbacks.
    """

    def __init__(self, guard: bool) -> None:
        super().__init__()
        self.guard = guard
        self.applied: dict[tuple[int, int], dict[str, Any] | None] = {}

    def on_before_optimizer_step(self, optimizer):
        stats = _grad_stats(optimizer)
        self.applied[(_opt_index(self.trainer, optimizer), self.trainer.global_step)] = stats
        if self.guard and stats is not None and not stats["finite"]:
            _raw(optimizer).zero_grad(set_to_none=True)


class _PreClip(pl.Callback):
    """The same statistics before any gradguard callback (first in the callback list)."""

    def __init__(self) -> None:
        self.pre: dict[tuple[int, int], dict[str, Any] | None] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre[(_opt_index(trainer, optimizer), trainer.global_step)] = _grad_stats(optimizer)


def _tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_of(v)]
    return []


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class _History(pl.Callback):
    """Weights and optimizer state: ``history[k]`` once ``global_step == k`` (``0``: before training)."""

    def __init__(self) -> None:
        self.history: dict[int, dict[str, Any]] = {}

    def _take(self, trainer, pl_module) -> None:
        self.history[trainer.global_step] = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "opt": [_clone(_raw(o).state_dict()["state"]) for o in trainer.optimizers],
        }

    def on_train_start(self, trainer, pl_module):
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._take(trainer, pl_module)


def _assert_finite(state: dict[str, Any], what: str) -> None:
    for name, p in state["params"].items():
        assert torch.isfinite(p).all(), f"{what}: non-finite weight {name}"
    for i, opt in enumerate(state["opt"]):
        for t in _tensors_of(opt):
            assert torch.isfinite(t).all(), f"{what}: non-finite state in optimizer {i}"


def _assert_same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), f"{what}: weight {name} changed"
    for i, (sa, sb) in enumerate(zip(a["opt"], b["opt"])):
        ta, tb = _tensors_of(sa), _tensors_of(sb)
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), (
            f"{what}: state of optimizer {i} changed"
        )


# --------------------------------------------------------------------------------------
# the patterns
# --------------------------------------------------------------------------------------


class NanBackward(torch.autograd.Function):
    """Identity forward; the backward returns NaN when ``poison`` is set (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x, poison: bool):
        ctx.poison = poison
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * math.nan if ctx.poison else grad), None


class MLP(Base):
    """8-16-16-1 tanh MLP, Adam. Options inject each automatic-optimisation fault.

    ``events``: loss multiplier at a global step (NaN, inf, 1e30); ``backward_nan_at``: a NaN
    from :class:`NanBackward` after ``net.0``; ``freeze_first``: ``net.0`` starts frozen and
    is unfrozen at ``UNFREEZE_STEP`` (``new_group``: it is also left out of the optimizer and
    added as a param group then); ``grad_nan_at``: a NaN written into ``net.0``'s gradient;
    ``compiled``: ``net.0`` is ``torch.compile``'d.
    """

    def __init__(
        self,
        guard: bool,
        events: dict[int, float] | None = None,
        backward_nan_at: int | None = None,
        freeze_first: bool = False,
        new_group: bool = False,
        grad_nan_at: int | None = None,
        compiled: bool = False,
    ) -> None:
        super().__init__(guard)
        first: nn.Module = nn.Linear(8, 16)
        if compiled:
            first = torch.compile(first)
        self.net = nn.Sequential(first, nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.events = dict(events or {})
        self.backward_nan_at = backward_nan_at
        self.freeze_first = freeze_first
        self.new_group = new_group
        self.grad_nan_at = grad_nan_at
        if freeze_first:
            self.net[0].requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net[1](self.net[0](x))
        h = NanBackward.apply(h, self.global_step == self.backward_nan_at)
        out = self.net[4](self.net[3](self.net[2](h)))
        return nn.functional.mse_loss(out, y) * self.events.get(self.global_step, 1.0)

    def on_train_batch_start(self, batch, batch_idx):
        if self.freeze_first and self.global_step == UNFREEZE_STEP and not self.net[0].weight.requires_grad:
            self.net[0].requires_grad_(True)
            if self.new_group:
                self.trainer.optimizers[0].add_param_group({"params": list(self.net[0].parameters())})

    def on_after_backward(self):
        if self.global_step == self.grad_nan_at:
            self.net[0].weight.grad[0, 0] = math.nan

    def configure_optimizers(self):
        params = self.net[2:].parameters() if self.new_group else self.parameters()
        return torch.optim.Adam(params, lr=1e-2)


class TwoOptimizers(Base):
    """Manual optimisation: body (Adam) and head (SGD with momentum), one backward, two steps; NaN loss at one batch."""

    def __init__(self, guard: bool, nan_batch: int = 3) -> None:
        super().__init__(guard)
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        opt_body, opt_head = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x)), y)
        if batch_idx == self.nan_batch:
            loss = loss * math.nan
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_head.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.body.parameters(), lr=1e-2),
            torch.optim.SGD(self.head.parameters(), lr=1e-2, momentum=0.9),
        )


class SparseBag(TwoOptimizers):
    """``nn.Embedding(sparse=True)`` with SparseAdam, a dense head with SGD; manual optimisation."""

    def __init__(self, guard: bool, nan_batch: int = 3) -> None:
        super().__init__(guard, nan_batch)
        self.body = nn.Embedding(50, 16, sparse=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        ids = (x.abs() * 7).long() % 50  # repeated ids: an uncoalesced sparse gradient
        return super().training_step((ids, y), batch_idx)

    def configure_optimizers(self):
        return (
            torch.optim.SparseAdam(list(self.body.parameters()), lr=1e-2),
            torch.optim.SGD(self.head.parameters(), lr=1e-2, momentum=0.9),
        )


class ComplexNet(Base):
    """A complex weight ``mix`` and bias ``phase``; the loss is real. Adam."""

    def __init__(self, guard: bool) -> None:
        super().__init__(guard)
        self.mix = nn.Parameter(torch.randn(8, 8, dtype=torch.cfloat) * 0.3)
        self.phase = nn.Parameter(torch.randn(8, dtype=torch.cfloat) * 0.1)
        self.out = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = x.to(torch.cfloat) @ self.mix + self.phase
        return nn.functional.mse_loss(self.out(z.abs()), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@dataclass
class Pattern:
    make: Callable[[bool], Base]  # guard -> module
    data: Callable[[], Any] = lambda: loader(n=8 * 12)
    trainer: Callable[[], dict[str, Any]] = dict  # extra Trainer arguments, built afresh for each run
    max_steps: int = STEPS
    bad: tuple[int, ...] = ()  # global steps with non-finite gradients and no GradScaler: the alarm's business
    overflow: tuple[int, ...] = ()  # global steps an fp16 GradScaler skips by itself (0, 1: its initial scale)
    nan_batch_idx: int | None = None  # the batch whose data holds the NaN (the crash dump must hold it)
    n_opt: int = 1
    rel: float = 1e-4
    complex_param: str | None = None  # value clipping may refuse the run, naming this parameter


NAN = math.nan
PATTERNS: dict[str, Pattern] = {
    "nan_data_first_step": Pattern(MLP, data=lambda: poisoned_loader(0, n=8 * 12), bad=(0,), nan_batch_idx=0),
    "nan_data_mid_run": Pattern(MLP, data=lambda: poisoned_loader(5, n=8 * 12), bad=(5,), nan_batch_idx=5),
    "inf_loss": Pattern(lambda g: MLP(g, events={3: math.inf}), bad=(3,)),
    "accum4_nan_microbatch6": Pattern(
        MLP,
        data=lambda: poisoned_loader(6, n=8 * 4 * 6),
        trainer=lambda: {"accumulate_grad_batches": 4},
        max_steps=5,
        bad=(1,),
        nan_batch_idx=6,
    ),
    "nan_in_custom_backward": Pattern(lambda g: MLP(g, backward_nan_at=4), bad=(4,)),
    "unfreeze_mid_run": Pattern(lambda g: MLP(g, freeze_first=True, grad_nan_at=7), bad=(7,)),
    "param_group_added": Pattern(lambda g: MLP(g, freeze_first=True, new_group=True, grad_nan_at=7), bad=(7,)),
    "sparse_embedding_2opt": Pattern(SparseBag, max_steps=12, bad=(6, 7), n_opt=2),
    "complex_params": Pattern(ComplexNet, complex_param="mix"),
    "float64": Pattern(lambda g: MLP(g, events={4: NAN}), trainer=lambda: {"precision": "64-true"}, bad=(4,)),
    "bf16_mixed": Pattern(lambda g: MLP(g, events={4: NAN}), trainer=lambda: {"precision": "bf16-mixed"}, bad=(4,)),
    "fp16_scaler_overflow": Pattern(
        lambda g: MLP(g, events={3: 1e30}),  # finite loss, fp16 gradients overflow
        trainer=lambda: {"plugins": [fp16_cpu_plugin()]},
        overflow=(0, 1, 3),
        rel=1e-3,
    ),
    "manual_2opt_nan": Pattern(TwoOptimizers, max_steps=12, bad=(6, 7), n_opt=2),
    "compiled_submodule": Pattern(lambda g: MLP(g, events={4: NAN}, compiled=True), bad=(4,)),
}

COLUMNS: dict[str, Callable[[], pl.Callback]] = {
    "logger": lambda: GradientNormLogger(log_every_n_steps=1),
    "alarm": lambda: VanishExplodeAlarm(),
    "alarm_nohalt": lambda: VanishExplodeAlarm(halt_on_nan=False),
    "clip_norm": lambda: AdaptiveClipper(mode="norm", max_norm=MAX_NORM),
    "clip_zscore": lambda: AdaptiveClipper(),
    "clip_agc": lambda: AdaptiveClipper(mode="agc"),
    "clip_value": lambda: AdaptiveClipper(mode="value", clip_value=CLIP_VALUE),
    "amp_check": lambda: AmpUnscaleCheck(),
}


# --------------------------------------------------------------------------------------
# the promises, one checker per column
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    spec: Pattern
    trainer: pl.Trainer
    model: Base
    callback: pl.Callback
    pre: dict[tuple[int, int], dict[str, Any] | None]
    history: dict[int, dict[str, Any]]
    ckpt_dir: Any = None

    def finite_steps(self):
        """(key, applied stats) of every step whose gradients were finite before gradguard."""
        for key, pre in sorted(self.pre.items()):
            if pre is not None and pre["finite"]:
                yield key, self.model.applied.get(key)

    def finite_pre(self):
        """(key, pre-clip stats) of every step whose gradients were finite before gradguard."""
        for key, pre in sorted(self.pre.items()):
            if pre is not None and pre["finite"]:
                yield key, pre


def _check_logger(run: Run) -> None:
    """a: the logged ``grad_norm/total`` is the norm of what the optimizer applies."""
    scalars = read_scalars(run.trainer.logger.log_dir)
    assert run.model.applied, "no optimizer step was recorded"
    for (i, step), applied in sorted(run.model.applied.items()):
        key = f"grad_norm/opt{i}/total" if run.spec.n_opt > 1 else "grad_norm/total"
        got = scalars.get(key, {}).get(step // run.spec.n_opt)  # logged at the batch's step, as self.log is
        if applied["finite"]:
            assert got is not None, f"{key} missing at step {step} (logged: {sorted(scalars.get(key, {}))})"
            assert_close_rel(got, applied["norm"], run.spec.rel, f"{key}@{step}")
        else:
            assert got is None or not math.isfinite(got), f"{key}@{step}: {got} logged for a non-finite step"


def _check_alarm(run: Run, halt: bool) -> None:
    """b: no NaN/Inf reaches the weights or the optimizer state; a halted run's checkpoint is usable."""
    alarm: VanishExplodeAlarm = run.callback  # type: ignore[assignment]
    spec, history = run.spec, run.history
    for step, state in sorted(history.items()):
        _assert_finite(state, f"after step {step - 1}")
    bad, last = spec.bad or spec.overflow, max(history)
    if not bad:
        assert alarm.counts["nonfinite"] == 0 and alarm.halted_at is None, alarm.summary()
        assert run.trainer.global_step == spec.max_steps
        return
    for a, b in _runs(bad):  # each run of consecutive non-finite steps left weights and state untouched
        assert b + 1 in history, f"no batch ended with global_step {b + 1} (steps recorded: {sorted(history)})"
        _assert_same(history[b + 1], history[a], f"the non-finite step(s) {a}..{b}")
    s0, s1 = min(bad), max(bad) + 1
    if spec.overflow:  # the GradScaler skipped it: counted, not acted on
        assert alarm.halted_at is None and alarm.counts["overflow"] == len(spec.overflow), alarm.counts
        assert run.trainer.global_step == spec.max_steps
        return
    if not halt:
        assert alarm.halted_at is None and alarm.skipped_steps == len(bad), (alarm.halted_at, alarm.skipped_steps)
        assert run.trainer.global_step == spec.max_steps, "halt_on_nan=False must carry on"
        return
    assert alarm.halted_at == s0, f"halted at {alarm.halted_at}, the first non-finite step is {s0}"
    assert last == s1 and run.trainer.global_step == s1, f"went on after the halt: global_step {last}"
    # the last checkpoint loads and holds the last good weights
    ckpt = torch.load(run.ckpt_dir / "last.ckpt", weights_only=False)
    spec.make(False).load_state_dict(ckpt["state_dict"])  # it loads
    for name, good in history[s0]["params"].items():
        saved = ckpt["state_dict"][name]
        assert torch.isfinite(saved).all(), f"checkpoint: non-finite {name}"
        assert torch.equal(saved, good), f"checkpoint: {name} is not the last good weight"
    for t in _tensors_of(ckpt["optimizer_states"]):
        assert torch.isfinite(t).all(), "checkpoint: non-finite optimizer state"
    # e: the crash dump holds the micro-batch with the NaN
    assert alarm.dump_paths, "no crash dump written"
    if spec.nan_batch_idx is not None:
        dump = torch.load(alarm.dump_paths[-1], weights_only=False)
        assert dump["batch_idx"] == spec.nan_batch_idx, f"dump holds batch_idx {dump['batch_idx']}"
        assert torch.isnan(dump["batch"][0]).any(), "the dumped batch holds no NaN"


def _runs(steps: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive steps, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for k in sorted(steps):
        if runs and runs[-1][1] == k - 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def _check_clip_norm(run: Run) -> None:
    """c: the applied norm is <= max_norm at every finite step."""
    assert any(pre["norm"] > MAX_NORM for _, pre in run.finite_pre()), "the gradients never exceeded max_norm"
    for (i, step), applied in run.finite_steps():
        assert applied is not None and applied["finite"], f"opt{i} step {step}: {applied}"
        assert applied["norm"] <= MAX_NORM * (1 + 1e-4), f"opt{i} step {step}: applied norm {applied['norm']:.6g}"


def _check_clip_value(run: Run) -> None:
    """c: every applied |g| <= clip_value at every finite step."""
    for (i, step), applied in run.finite_steps():
        assert applied is not None and applied["finite"], f"opt{i} step {step}: {applied}"
        assert applied["max_abs"] <= CLIP_VALUE * (1 + 1e-6), f"opt{i} step {step}: max |g| {applied['max_abs']:.6g}"


def _check_clip_agc(run: Run) -> None:
    """Every unit's ||G_i|| <= 0.01 * max(||W_i||, 1e-3) at every finite step."""
    for (i, step), applied in run.finite_steps():
        assert applied is not None and applied["finite"], f"opt{i} step {step}: {applied}"
        assert applied["agc"] <= 1 + 1e-4, f"opt{i} step {step}: a unit at {applied['agc']:.4g}x the AGC bound"
        assert applied["norm"] <= run.pre[(i, step)]["norm"] * (1 + 1e-6)


def _check_clip_zscore(run: Run) -> None:
    """Never enlarges a gradient; non-finite steps are not recorded in the statistics."""
    clipper: AdaptiveClipper = run.callback  # type: ignore[assignment]
    for (i, step), applied in run.finite_steps():
        assert applied is not None and applied["finite"], f"opt{i} step {step}: {applied}"
        assert applied["norm"] <= run.pre[(i, step)]["norm"] * (1 + 1e-6)
    for i in range(run.spec.n_opt):
        rule = clipper.threshold_rule(i)
        finite = sum(1 for (j, _), _ in run.finite_steps() if j == i)
        assert rule is not None and int(rule.seen) == finite, f"opt{i}: {rule and int(rule.seen)} norms recorded"


def _check_amp(run: Run) -> None:
    check: AmpUnscaleCheck = run.callback  # type: ignore[assignment]
    assert check.active == bool(run.spec.overflow)
    if run.spec.overflow:
        scalars = read_scalars(run.trainer.logger.log_dir)
        assert scalars["amp/overflow_steps"][run.spec.max_steps - 1] == len(run.spec.overflow)
        assert "amp/loss_scale" in scalars


CHECKS: dict[str, Callable[[Run], None]] = {
    "logger": _check_logger,
    "alarm": lambda run: _check_alarm(run, halt=True),
    "alarm_nohalt": lambda run: _check_alarm(run, halt=False),
    "clip_norm": _check_clip_norm,
    "clip_zscore": _check_clip_zscore,
    "clip_agc": _check_clip_agc,
    "clip_value": _check_clip_value,
    "amp_check": _check_amp,
}


# --------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "column"),
    [pytest.param(p, c, id=f"{p}-{c}") for p in PATTERNS for c in COLUMNS],
)
def test_fault_matrix(tmp_path, pattern, column):
    spec = PATTERNS[pattern]
    pl.seed_everything(0, verbose=False)
    callback = COLUMNS[column]()
    alarmed = isinstance(callback, VanishExplodeAlarm)
    model = spec.make(not alarmed)  # outside the alarm's columns the module guards against NaN itself
    probe, history = _PreClip(), _History()
    callbacks: list[pl.Callback] = [probe, callback, history]
    ckpt_dir = None
    if column == "alarm" and spec.bad:
        ckpt_dir = tmp_path / "ckpt"
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True))
    trainer = make_trainer(
        tmp_path, callbacks, max_steps=spec.max_steps, enable_checkpointing=ckpt_dir is not None, **spec.trainer()
    )
    try:
        trainer.fit(model, spec.data())
    except (ValueError, RuntimeError) as err:
        if column == "clip_value" and spec.complex_param:
            # d: element-wise clipping has no meaning for complex numbers: a refusal naming the parameter is fine
            assert repr(spec.complex_param) in str(err), f"the refusal does not name the parameter: {err}"
            return
        raise
    run = Run(spec, trainer, model, callback, probe.pre, history.history, ckpt_dir)
    steps = {step for (_, step) in probe.pre}
    assert steps == set(range(spec.max_steps)) or (alarmed and spec.bad), f"optimizer steps seen: {sorted(steps)}"
    if not alarmed:  # the guard kept every run finite; no callback may have put a NaN in
        for step, state in history.history.items():
            _assert_finite(state, f"after step {step - 1}")
    CHECKS[column](run)
