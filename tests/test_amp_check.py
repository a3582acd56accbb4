"""AmpUnscaleCheck with a real fp16 GradScaler on CPU."""

from __future__ import annotations

import math
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    CLIModel,
    RecordingMLP,
    SelfUnscalingSGD,
    assert_close_rel,
    fp16_cpu_plugin,
    loader,
    make_trainer,
    read_scalars,
)
from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import AmpUnscaleCheck, GradientNormLogger, VanishExplodeAlarm


def _gradguard_warnings(record):
    return [str(w.message) for w in record if "[gradguard]" in str(w.message)]


def _check_reference(scalars, reference, prefix="grad_norm"):
    checked = 0
    for step, norms in reference.items():
        for key, want in norms.items():
            if not math.isfinite(want):  # not drawable: not logged
                assert step not in scalars.get(f"{prefix}/{key}", {}), f"{prefix}/{key}@{step} logged"
                continue
            assert_close_rel(scalars[f"{prefix}/{key}"][step], want, 1e-3, f"{prefix}/{key}@{step}")
            checked += 1
    assert checked > 0


def test_standard_fp16_path_is_silent_and_norms_are_unscaled_in_both_hooks(tmp_path, recwarn):
    model = RecordingMLP()
    check = AmpUnscaleCheck(log_every_n_steps=1)
    callbacks = [check, GradientNormLogger(), GradientNormLogger(hook="on_after_backward")]
    trainer = make_trainer(tmp_path, callbacks, max_steps=8, plugins=[fp16_cpu_plugin()])
    trainer.fit(model, loader())
    assert check.active and check.warnings == [] and not _gradguard_warnings(recwarn)
    scalars = read_scalars(trainer.logger.log_dir)
    _check_reference(scalars, model.reference["step"])
    first = {}
    for step, norms in model.backward_records:
        first.setdefault(step, norms)
    _check_reference(scalars, first, prefix="grad_norm_microbatch")
    # the scale trajectory is logged every step and starts at the GradScaler's 65536
    assert sorted(scalars["amp/loss_scale"]) == list(range(8))
    assert scalars["amp/loss_scale"][0] == 65536.0


def test_optimizer_that_unscales_itself_is_reported_and_norms_stay_unscaled(tmp_path):
    model = RecordingMLP(optimizer_cls=SelfUnscalingSGD)
    check = AmpUnscaleCheck()
    trainer = make_trainer(tmp_path, [check, GradientNormLogger()], max_steps=8, plugins=[fp16_cpu_plugin()])
    with pytest.warns(UserWarning, match="SelfUnscalingSGD unscales its gradients inside step"):
        trainer.fit(model, loader())
    assert check.scaled_optimizers == ["SelfUnscalingSGD"]
    assert len(check.warnings) == 1  # once, not every step
    _check_reference(read_scalars(trainer.logger.log_dir), model.reference["step"])


class ManualClipper(RecordingMLP):
    """Manual optimisation that clips right after manual_backward: the gradients are still scaled."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.seen_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = torch.nn.functional.mse_loss(self(x), y) * 10
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()

    def on_before_optimizer_step(self, optimizer):
        # Lightning has unscaled by now: this is the gradient the optimizer applies
        grads = [p.grad.flatten() for p in self.parameters() if p.grad is not None]
        self.seen_norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())


@pytest.mark.parametrize("fix", [True, False])
def test_manual_clipping_before_unscale_is_detected(tmp_path, fix):
    model = ManualClipper()
    check = AmpUnscaleCheck(fix_scaled_clipping=fix)
    trainer = make_trainer(tmp_path, [check], max_steps=10, plugins=[fp16_cpu_plugin()])
    with pytest.warns(UserWarning, match="ran on gradients still multiplied by the fp16 loss scale"):
        trainer.fit(model, loader())
    assert check.scaled_clip_calls == 10
    finite = [n for n in model.seen_norms if n == n and n != float("inf")]
    assert len(finite) >= 5
    if fix:
        # the clip now means what was written: the applied gradient has norm 0.5
        for n in finite:
            assert n == pytest.approx(0.5, rel=1e-3)
    else:
        # Lightning's behaviour: clipped to 0.5 / scale, i.e. thousands of times too hard
        assert max(finite) < 0.5 / 1000


def test_injected_overflow_is_counted_and_the_scale_halves(tmp_path):
    class OneHugeLoss(RecordingMLP):
        def __init__(self, poison):
            super().__init__()
            self.poison = poison

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (1e35 if self.poison and batch_idx == 5 else 1.0)

    results = {}
    for poison in (False, True):
        pl.seed_everything(0, verbose=False)  # same weights and data in both runs
        check = AmpUnscaleCheck(log_every_n_steps=1)
        trainer = make_trainer(tmp_path / str(poison), [check], max_steps=8, plugins=[fp16_cpu_plugin()])
        trainer.fit(OneHugeLoss(poison), loader())
        results[poison] = read_scalars(trainer.logger.log_dir)
    clean, poisoned = results[False], results[True]
    # overflow_steps at step s counts the overflows up to and including step s
    assert poisoned["amp/overflow_steps"][5] == clean["amp/overflow_steps"][5] + 1
    assert poisoned["amp/overflow_steps"][4] == clean["amp/overflow_steps"][4]
    # the scaler answered the skipped step by halving the scale (seen from step 6 on)
    assert poisoned["amp/loss_scale"][6] == clean["amp/loss_scale"][6] / 2
    assert poisoned["amp/skip_rate"][7] > clean["amp/skip_rate"][7]


@pytest.mark.parametrize("with_alarm", [False, True])
def test_persistent_overflow_is_reported(tmp_path, with_alarm):
    class AlwaysHuge(RecordingMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * (1e35 if self.trainer.global_step >= 2 else 1.0)

    check = AmpUnscaleCheck(log_every_n_steps=1, max_consecutive_overflows=4)
    callbacks = [check] + (
        [VanishExplodeAlarm(max_consecutive_overflows=50, min_loss_scale=1e-30)] if with_alarm else []
    )
    trainer = make_trainer(tmp_path, callbacks, max_steps=10, plugins=[fp16_cpu_plugin()])
    with pytest.warns(UserWarning, match="optimizer steps in a row overflowed"):
        trainer.fit(AlwaysHuge(), loader())
    message = next(w for w in check.warnings if "in a row" in w)
    assert ("VanishExplodeAlarm is attached" in message) == with_alarm


def test_underflow_is_reported_when_zeros_rise_as_the_scale_falls(tmp_path):
    class TinyGradients(RecordingMLP):
        """Gradients ~1e-9: fine at scale 65536, rounded to 0 in fp16 once the scale is small."""

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            force_down = 2 <= self.trainer.global_step < 20  # overflow steps drive the scale to ~1
            return loss * (1e35 if force_down else 1e-8)

    check = AmpUnscaleCheck(log_every_n_steps=1, max_consecutive_overflows=100, max_skip_rate=1.0)
    trainer = make_trainer(tmp_path, [check], max_steps=24, plugins=[fp16_cpu_plugin()])
    with pytest.warns(UserWarning, match="Gradients underflow in fp16"):
        trainer.fit(TinyGradients(), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["amp/loss_scale"][23] < 1.0
    assert scalars["amp/zero_grad_fraction/total"][1] < 0.5
    assert scalars["amp/zero_grad_fraction/total"][23] > 0.5
    assert "amp/zero_grad_fraction/net.0" in scalars


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nothing_to_check_without_an_fp16_scaler(tmp_path, precision, caplog):
    check = AmpUnscaleCheck()
    trainer = make_trainer(tmp_path, [check], max_steps=3, precision=precision)
    with caplog.at_level("INFO"):
        trainer.fit(RecordingMLP(), loader())
    assert not check.active
    assert "nothing to check" in caplog.text
    assert "amp/loss_scale" not in read_scalars(trainer.logger.log_dir)
    assert "clip_gradients" not in trainer.precision_plugin.__dict__  # nothing was wrapped


def test_wrap_is_removed_after_fit(tmp_path):
    check = AmpUnscaleCheck()
    trainer = make_trainer(tmp_path, [check], max_steps=2, plugins=[fp16_cpu_plugin()])
    trainer.fit(RecordingMLP(), loader())
    assert "clip_gradients" not in trainer.precision_plugin.__dict__


def test_yaml_config(tmp_path):
    cfg = tmp_path / "amp.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              max_steps: 2
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: lightning_gradguard.AmpUnscaleCheck
                  init_args:
                    max_skip_rate: 0.2
                    skip_rate_window: 50
                    track_underflow: false
            """
        )
    )
    cli = LightningCLI(CLIModel, run=False, args=["--config", str(cfg)])
    (check,) = [c for c in cli.trainer.callbacks if isinstance(c, AmpUnscaleCheck)]
    assert (check.max_skip_rate, check.skip_rate_window, check.track_underflow) == (0.2, 50, False)
    cli.trainer.fit(cli.model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"min_loss_scale": 0}, "min_loss_scale"),
        ({"max_skip_rate": 1.5}, "max_skip_rate"),
        ({"skip_rate_window": 0}, "skip_rate_window"),
        ({"max_consecutive_overflows": -2}, "max_consecutive_overflows"),
        ({"track_underflow": 1}, "track_underflow"),
        ({"underflow_rise": 0.0}, "underflow_rise"),
        ({"fix_scaled_clipping": "no"}, "fix_scaled_clipping"),
        ({"group_by": "x"}, "group_by"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AmpUnscaleCheck(**kwargs)


def test_state_dict_round_trip(tmp_path):
    check = AmpUnscaleCheck(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [check], max_steps=4, plugins=[fp16_cpu_plugin()])
    trainer.fit(RecordingMLP(), loader())
    fresh = AmpUnscaleCheck()
    fresh.load_state_dict(check.state_dict())
    saved = check.state_dict()
    assert saved["device_state"]["steps"] == 4.0 and len(saved["device_state"]["ring"]) == 200
    assert fresh.state_dict() == saved
