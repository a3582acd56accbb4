"""Regressions for training patterns that broke README promises (issue 8).

Each test runs a real ``Trainer.fit`` on CPU (or the plain function for the strategy
guard) and checks a promise against an independent measurement: unfreezing and param
groups added mid-run, manual optimisation that guards its own step, ``min_steps``,
sparse and complex gradients, state keys, charts that TensorBoard can draw.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import WeightHistory, assert_close_rel, fp16_cpu_plugin, loader, make_trainer, read_scalars
from torch import nn

from lightning_gradguard import AdaptiveClipper, AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm
from lightning_gradguard.callbacks._session import check_strategy

UNFREEZE_STEP = 4


class Unfreezing(pl.LightningModule):
    """All layers in the optimizer; ``net.0`` starts frozen and is unfrozen by hand at ``UNFREEZE_STEP``.

    ``new_group=True`` keeps ``net.0`` out of the optimizer instead and adds it as a
    param group at that step (what ``BaseFinetuning.unfreeze_and_add_param_group`` does).
    ``nan_at`` writes a NaN into ``net.0``'s gradient at that step. ``applied[step]`` is the
    float64 norm of the gradients the optimizer applies, measured after the callbacks.
    """

    def __init__(self, new_group: bool = False, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.net[0].requires_grad_(False)
        self.new_group = new_group
        self.nan_at = nan_at
        self.applied: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * 50.0

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == UNFREEZE_STEP:
            self.net[0].requires_grad_(True)
            if self.new_group:
                self.trainer.optimizers[0].add_param_group({"params": list(self.net[0].parameters())})

    def on_after_backward(self):
        if self.trainer.global_step == self.nan_at:
            self.net[0].weight.grad[0, 0] = math.nan

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad.double().flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            self.applied[self.trainer.global_step] = torch.linalg.vector_norm(torch.cat(grads)).item()

    def configure_optimizers(self):
        params = self.net[2:].parameters() if self.new_group else self.parameters()
        return torch.optim.SGD(params, lr=0.01)


@pytest.mark.parametrize("new_group", [False, True], ids=["unfrozen_by_hand", "param_group_added"])
def test_unfrozen_layer_is_logged_and_clipped(tmp_path, new_group):
    model = Unfreezing(new_group=new_group)
    logger = GradientNormLogger(log_every_n_steps=1)
    clipper = AdaptiveClipper(mode="norm", max_norm=0.05)
    probe = _PreClipNorm()
    trainer = make_trainer(tmp_path, [probe, logger, clipper], max_steps=8)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for step in range(8):
        assert_close_rel(scalars["grad_norm/total"][step], probe.norms[step], 1e-4, f"grad_norm/total@{step}")
        assert model.applied[step] <= 0.05 * (1 + 1e-4), f"step {step}: {model.applied[step]} passed a 0.05 clip"
    assert "grad_norm/net.0" not in {k for k, v in scalars.items() if min(v) < UNFREEZE_STEP}
    assert sorted(scalars["grad_norm/net.0"]) == list(range(UNFREEZE_STEP, 8)), "the unfrozen layer appears at once"


class _PreClipNorm(pl.Callback):
    """The float64 norm of every gradient of the optimizer before gradguard touches it (runs first)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double().flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms[trainer.global_step] = torch.linalg.vector_norm(torch.cat(grads)).item()


@pytest.mark.parametrize("new_group", [False, True], ids=["unfrozen_by_hand", "param_group_added"])
def test_nan_in_an_unfrozen_layer_never_reaches_the_weights(tmp_path, new_group):
    bad = UNFREEZE_STEP + 1
    model = Unfreezing(new_group=new_group, nan_at=bad)
    history = WeightHistory()
    alarm = VanishExplodeAlarm()
    trainer = make_trainer(tmp_path, [alarm, history], max_steps=10)
    trainer.fit(model, loader())
    assert alarm.halted_at == bad and trainer.global_step == bad + 1
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, history.history[bad][name]), f"{name} changed at the halted step"


def test_a_layer_frozen_mid_run_leaves_the_logs(tmp_path):
    class Freezing(Unfreezing):
        def on_train_batch_start(self, batch, batch_idx):
            if self.trainer.global_step == UNFREEZE_STEP:
                self.net[2].requires_grad_(False)

    model = Freezing()
    model.net[0].requires_grad_(True)
    trainer = make_trainer(tmp_path, [GradientNormLogger(log_every_n_steps=1)], max_steps=8)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/net.2"]) == list(range(UNFREEZE_STEP))
    for step in range(8):
        assert_close_rel(scalars["grad_norm/total"][step], model.applied[step], 1e-4, f"total@{step}")


# --------------------------------------------------------------------------------------
# manual optimisation that guards its own step
# --------------------------------------------------------------------------------------


class GuardedManual(pl.LightningModule):
    """Manual optimisation: backward always, ``step()`` only when the loss is finite."""

    def __init__(self, nan_batch: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_batch = nan_batch
        self.steps_taken = 0

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if batch_idx == self.nan_batch:
            loss = loss * math.nan
        opt.zero_grad()
        self.manual_backward(loss)
        if torch.isfinite(loss):
            opt.step()
            self.steps_taken += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("halt_on_nan", [True, False])
def test_a_guarded_nan_loss_does_not_halt_the_next_clean_step(tmp_path, halt_on_nan):
    model = GuardedManual(nan_batch=2)
    alarm = VanishExplodeAlarm(halt_on_nan=halt_on_nan)
    trainer = make_trainer(tmp_path, [alarm], max_steps=6, logger=False)
    trainer.fit(model, loader())
    assert alarm.halted_at is None and alarm.skipped_steps == 0 and alarm.counts["nonfinite"] == 0
    assert model.steps_taken == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------
# stopping when min_steps / min_epochs are not reached
# --------------------------------------------------------------------------------------


class NanAt(pl.LightningModule):
    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * math.nan if self.global_step == self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("limit", [{"min_steps": 40}, {"min_epochs": 5}])
def test_a_halt_stops_even_before_min_steps(tmp_path, limit):
    alarm = VanishExplodeAlarm()
    trainer = make_trainer(tmp_path, [alarm], max_steps=60, logger=False, **limit)
    with pytest.warns(UserWarning, match=f"Trainer\\(.*{next(iter(limit))}=.*lifted"):
        trainer.fit(NanAt(bad_step=3), loader())
    assert alarm.halted_at == 3 and trainer.global_step == 4, "training went on after the halt"
    assert trainer.fit_loop.min_epochs == limit.get("min_epochs", trainer.fit_loop.min_epochs)
    assert trainer.fit_loop.epoch_loop.min_steps == limit.get("min_steps", trainer.fit_loop.epoch_loop.min_steps)


# --------------------------------------------------------------------------------------
# sparse and complex gradients
# --------------------------------------------------------------------------------------


class Bag(pl.LightningModule):
    """A sparse embedding (SparseAdam) and a dense head (SGD), manual optimisation."""

    def __init__(self, nan_step: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 1)
        self.nan_step = nan_step
        self.reference: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        sparse_opt, dense_opt = self.optimizers()
        x, y = batch
        ids = (x.abs() * 7).long() % 50  # repeated ids: an uncoalesced sparse gradient
        loss = nn.functional.mse_loss(self.head(self.emb(ids).mean(1)), y) * 100.0
        if self.global_step // 2 == self.nan_step:
            loss = loss * math.nan
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        self.manual_backward(loss)
        self.reference[self.global_step] = self.emb.weight.grad.coalesce().values().double().norm().item()
        sparse_opt.step()
        dense_opt.step()

    def configure_optimizers(self):
        return torch.optim.SparseAdam(list(self.emb.parameters()), lr=0.01), torch.optim.SGD(self.head.parameters())


@pytest.mark.parametrize(
    "clipper",
    [
        AdaptiveClipper(mode="norm", max_norm=0.01),
        AdaptiveClipper(mode="value", clip_value=1e-3),
        AdaptiveClipper(mode="agc", agc_clipping=0.01),
        AdaptiveClipper(),
    ],
    ids=["norm", "value", "agc", "zscore"],
)
def test_sparse_gradients_are_measured_and_clipped(tmp_path, clipper):
    model = Bag()
    record = _AppliedSparse()
    trainer = make_trainer(
        tmp_path, [GradientNormLogger(log_every_n_steps=1), clipper, record, VanishExplodeAlarm()], max_steps=8
    )
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for step in range(0, 8, 2):  # optimizer 0 (sparse) runs at the even global steps
        assert_close_rel(scalars["grad_norm/opt0/total"][step // 2], model.reference[step], 1e-4, f"step {step}")
        if clipper.mode == "norm":
            assert record.norms[step] <= 0.01 * (1 + 1e-4)
        if clipper.mode == "value":
            assert record.max_abs[step] <= 1e-3 * (1 + 1e-6)
        if clipper.mode == "agc":
            assert record.norms[step] <= model.reference[step] * (1 + 1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _AppliedSparse(pl.Callback):
    """Norm and max |g| of the sparse gradient as the optimizer receives it (runs after the clipper)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.max_abs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.emb.weight.grad
        if any(p is pl_module.emb.weight for g in optimizer.param_groups for p in g["params"]) and grad is not None:
            values = grad.coalesce().values().double()
            self.norms[trainer.global_step] = values.norm().item()
            self.max_abs[trainer.global_step] = values.abs().max().item()


def test_nan_in_a_sparse_gradient_halts(tmp_path):
    model = Bag(nan_step=2)
    alarm = VanishExplodeAlarm()
    trainer = make_trainer(tmp_path, [alarm], max_steps=12, logger=False)
    trainer.fit(model, loader())
    assert alarm.halted_at == 4 and alarm.counts["nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ComplexNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(8, 8, dtype=torch.cfloat) * 0.3)
        self.phase = nn.Parameter(torch.zeros(8, dtype=torch.cfloat))
        self.out = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = x.to(torch.cfloat) @ self.mix + self.phase
        return nn.functional.mse_loss(self.out(z.abs()), y) * 100.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.001)


def test_agc_and_norm_clipping_handle_complex_parameters(tmp_path):
    for kwargs in ({"mode": "agc", "agc_clipping": 0.01}, {"mode": "norm", "max_norm": 0.1}):
        clipper = AdaptiveClipper(**kwargs)
        trainer = make_trainer(tmp_path, [GradientNormLogger(log_every_n_steps=1), clipper], max_steps=4)
        model = ComplexNet()
        trainer.fit(model, loader())
        decision = clipper.last_decision()
        assert decision["coef"] < 1, kwargs  # it really clipped
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_value_clipping_refuses_complex_parameters_by_name(tmp_path):
    trainer = make_trainer(tmp_path, [AdaptiveClipper(mode="value", clip_value=0.1)], max_steps=2, logger=False)
    with pytest.raises(ValueError, match=r"complex parameter\(s\) \['mix', 'phase'\]"):
        trainer.fit(ComplexNet(), loader())


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


def test_two_clippers_differing_only_in_options_fit_one_trainer_and_resume(tmp_path):
    a = AdaptiveClipper(mode="zscore", warmup_steps=2, max_norm=5.0)
    b = AdaptiveClipper(mode="zscore", warmup_steps=2, max_norm=3.0, skip_factor=50.0)
    assert a.state_key != b.state_key
    trainer = make_trainer(tmp_path, [a, b], max_steps=5, logger=False)
    trainer.fit(NanAt(bad_step=-1), loader())
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    # two saved clippers match a clipper with yet another max_norm: ambiguous, it starts afresh
    c = AdaptiveClipper(mode="zscore", warmup_steps=2, max_norm=4.0)
    trainer = make_trainer(tmp_path, [c], max_steps=7, logger=False)
    trainer.fit(NanAt(bad_step=-1), loader(), ckpt_path=path)
    assert c.threshold_rule(0).seen.item() == 2
    # exactly one saved clipper with the same statistics: its state is taken over
    single = tmp_path / "one.ckpt"
    trainer = make_trainer(tmp_path, [AdaptiveClipper(mode="zscore", warmup_steps=2, max_norm=5.0)], max_steps=5)
    trainer.fit(NanAt(bad_step=-1), loader())
    trainer.save_checkpoint(single)
    d = AdaptiveClipper(mode="zscore", warmup_steps=2, max_norm=4.0)
    trainer = make_trainer(tmp_path, [d], max_steps=7, logger=False)
    trainer.fit(NanAt(bad_step=-1), loader(), ckpt_path=single)
    assert d.threshold_rule(0).seen.item() == 7, "the saved statistics were not resumed"


def test_deepspeed_is_refused_with_a_clear_message():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # no deepspeed install needed to test the guard
    with pytest.raises(ValueError, match=r"GradientNormLogger does not support DeepSpeedStrategy.*strategy='ddp'"):
        check_strategy(strategy, "GradientNormLogger")


# --------------------------------------------------------------------------------------
# what the charts and messages say
# --------------------------------------------------------------------------------------


def test_charts_hold_no_points_tensorboard_cannot_draw(tmp_path):
    class OneLayer(NanAt):
        def __init__(self) -> None:
            super().__init__(bad_step=-1)
            self.net = nn.Linear(8, 1)

    unbounded = AdaptiveClipper(mode="zscore", warmup_steps=3, max_norm=math.inf, warmup_factor=math.inf)
    callbacks = [VanishExplodeAlarm(), unbounded]
    trainer = make_trainer(tmp_path, callbacks, max_steps=6)
    trainer.fit(OneLayer(), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for tag, points in scalars.items():
        assert all(math.isfinite(v) for v in points.values()), f"{tag} has a point TensorBoard cannot draw"
    assert sorted(scalars["clip/threshold"]) == [3, 4, 5]  # unbounded during the warm-up: not logged


def test_an_early_ceiling_finding_quotes_no_zscore(tmp_path):
    """Step 1 jumps 1000x above step 0 and over the ceiling: the finding names the ceiling and
    quotes no z-score, since the spike rule only arms after ``warmup_steps``."""

    class JumpAtOne(NanAt):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * (1000.0 if self.global_step == 1 else 1.0)

    alarm = VanishExplodeAlarm(max_norm=100.0)
    trainer = make_trainer(tmp_path, [alarm], max_steps=3, logger=False)
    with pytest.warns(UserWarning, match="exploding"):
        trainer.fit(JumpAtOne(bad_step=-1), loader())
    finding = alarm.findings[0]
    assert finding.kind == "exploding" and finding.step == 1 and finding.zscore is None
    assert "standard deviations" not in finding.summary and "max_norm=100" in finding.summary


def test_amp_skip_rate_is_over_the_steps_seen(tmp_path):
    class AlwaysOverflows(NanAt):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e30

    check = AmpUnscaleCheck(track_underflow=False)
    trainer = make_trainer(tmp_path, [check], max_steps=11, plugins=[fp16_cpu_plugin()])
    trainer.fit(AlwaysOverflows(bad_step=-1), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["amp/skip_rate"][10] == 1.0 and scalars["amp/overflow_steps"][10] == 11
    assert not any("optimizer steps were skipped" in w for w in check.warnings), "11 steps are no full window"
    assert any("optimizer steps in a row overflowed" in w for w in check.warnings), check.warnings


def test_agc_exclude_pattern_matching_nothing_is_reported(tmp_path):
    clipper = AdaptiveClipper(mode="agc", agc_exclude=[r"^classifier\.", r"^net\.2\."])
    trainer = make_trainer(tmp_path, [clipper], max_steps=2, logger=False)
    with pytest.warns(UserWarning, match=r"'\^classifier\\\\\.' matches no parameter name"):
        trainer.fit(NanAt(bad_step=-1), loader())
