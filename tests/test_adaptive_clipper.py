"""AdaptiveClipper under real Trainer.fit runs on CPU, read back from TensorBoard."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import (
    CLIModel,
    RecordingMLP,
    SelfUnscalingSGD,
    fp16_cpu_plugin,
    loader,
    make_trainer,
    read_scalars,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from test_clipping import HostSyncCounter, ZScoreReference

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper

REL = 1e-5
SCRIPTS = Path(__file__).parent / "scripts"


class EventMLP(RecordingMLP):
    """RecordingMLP whose loss is multiplied by ``events[global_step]`` (NaN, 1e30, 1000, ...).

    ``guard=True`` drops non-finite gradients in the module's own ``on_before_optimizer_step``
    (it runs after the callbacks'), standing in for VanishExplodeAlarm: without a scaler
    nothing else would keep a NaN step out of the weights.
    """

    def __init__(self, events=None, guard: bool = False, **kw):
        super().__init__(**kw)
        self.events = dict(events or {})
        self.guard = guard
        self.post_max_abs: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.events.get(self.trainer.global_step, 1.0)

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            scaled = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
            div = scaler.get_scale() if scaled else 1.0
            self.post_max_abs[self.trainer.global_step] = max(g.abs().max().item() for g in grads) / div
        if self.guard and not all(torch.isfinite(g).all() for g in grads):
            optimizer.zero_grad(set_to_none=True)


def clip_scalars(trainer) -> dict[str, dict[int, float]]:
    return {k: v for k, v in read_scalars(trainer.logger.log_dir).items() if k.startswith("clip/")}


# --------------------------------------------------------------------------------------
# every mode, end to end
# --------------------------------------------------------------------------------------

MODES = {
    "norm": dict(mode="norm", max_norm=0.5),
    "value": dict(mode="value", clip_value=0.05),
    "percentile": dict(mode="percentile", percentile=30.0, window=5, warmup_steps=3),
    "zscore": dict(mode="zscore", z_threshold=0.5, warmup_steps=3),
    "agc": dict(mode="agc", agc_clipping=0.05),
    "agc_ceiling": dict(mode="agc", agc_clipping=0.2, max_norm=0.3, agc_exclude=[r"^net\.6\."]),
    "zscore_warm_ceiling": dict(mode="zscore", warmup_steps=4, warmup_max_norm=0.5, max_norm=3.0),
}


@pytest.mark.parametrize("name", list(MODES))
def test_each_mode_clips_and_logs_the_true_post_clip_norm(tmp_path, name):
    model = EventMLP()
    clipper = AdaptiveClipper(**MODES[name])
    trainer = make_trainer(tmp_path, [clipper], max_steps=10)
    trainer.fit(model, loader())
    scalars = clip_scalars(trainer)
    expected = {"clip/pre_norm", "clip/post_norm", "clip/coef", "clip/clipped_fraction"}
    if name != "agc":
        expected.add("clip/threshold")
    if name.startswith(("percentile", "zscore")):
        expected.add("clip/skipped_steps")
    if name.startswith("agc"):
        expected.add("clip/clipped_units")
    assert set(scalars) == expected
    clipped_steps = 0
    for step in range(10):
        true_post = model.reference["step"][step]["total"]  # measured by the module after the callbacks
        post = scalars["clip/post_norm"][step]
        pre = scalars["clip/pre_norm"][step]
        assert post == pytest.approx(true_post, rel=REL), f"step {step}"
        assert scalars["clip/coef"][step] == pytest.approx(post / pre, rel=REL)
        if name == "value":
            assert model.post_max_abs[step] <= 0.05 * (1 + 1e-6)
        elif name == "agc":
            assert post <= pre
        else:
            threshold = scalars["clip/threshold"].get(step, math.inf)  # not logged while unbounded (inf)
            assert true_post <= threshold * (1 + 1e-6), f"step {step}: {true_post} > {threshold}"
            if pre > threshold:
                assert post == pytest.approx(threshold, rel=REL)
        clipped_steps += scalars["clip/clipped_fraction"][step]
    assert clipped_steps >= 1, "the settings were chosen so that clipping happens"
    if name == "zscore_warm_ceiling":
        assert [scalars["clip/threshold"][i] for i in range(4)] == [0.5] * 4
        assert all(0.5 < scalars["clip/threshold"][i] <= 3.0 for i in range(4, 10))


def test_agc_warmup_clips_to_the_warmup_ceiling_then_runs_agc(tmp_path):
    model = EventMLP()
    clipper = AdaptiveClipper(mode="agc", agc_clipping=0.05, warmup_steps=3, warmup_max_norm=0.5)
    trainer = make_trainer(tmp_path, [clipper], max_steps=6)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    assert sorted(s["clip/threshold"]) == [0, 1, 2] and set(s["clip/threshold"].values()) == {0.5}
    assert sorted(s["clip/clipped_units"]) == [3, 4, 5]
    for step in range(6):
        true_post = model.reference["step"][step]["total"]
        assert s["clip/post_norm"][step] == pytest.approx(true_post, rel=REL)
        if step < 3:
            assert true_post <= 0.5 * (1 + 1e-6)


def test_percentile_and_zscore_thresholds_follow_the_logged_history(tmp_path):
    """The logged thresholds equal an independent float64 reference computed from the
    logged pre-clip norms (the rules documented in lightning_gradguard.clipping), warm-up
    included: 10x the median of the norms so far (none before the first), no ceiling."""
    p_clip = AdaptiveClipper(
        mode="percentile", percentile=30.0, window=6, warmup_steps=4, max_norm=math.inf, log_every_n_steps=1
    )
    trainer = make_trainer(tmp_path / "p", [p_clip], max_steps=14)
    trainer.fit(EventMLP(), loader())
    s = clip_scalars(trainer)
    pre = [s["clip/pre_norm"][i] for i in range(14)]
    for step in range(14):
        hist = pre[:step][-6:]
        if step >= 4:
            want = float(np.percentile(hist, 30.0))
        else:
            want = 10.0 * float(np.median(hist)) if hist else math.inf
        got = s["clip/threshold"].get(step, math.inf)  # an unbounded threshold is not logged
        assert got == pytest.approx(want, rel=REL) if math.isfinite(want) else math.isinf(got), f"step {step}"

    z_clip = AdaptiveClipper(
        mode="zscore", z_threshold=0.5, ema_decay=0.8, warmup_steps=3, max_norm=math.inf, log_every_n_steps=1
    )
    trainer = make_trainer(tmp_path / "z", [z_clip], max_steps=14)
    trainer.fit(EventMLP(), loader())
    s = clip_scalars(trainer)
    reference = ZScoreReference(0.5, 0.8, warmup=3, warmup_factor=10.0)
    for step in range(14):
        want = reference.threshold()
        got = s["clip/threshold"].get(step, math.inf)
        assert got == pytest.approx(want, rel=1e-4) if math.isfinite(want) else math.isinf(got), f"step {step}"
        reference.observe(s["clip/pre_norm"][step])
    assert 0 < sum(s["clip/clipped_fraction"].values()) < 11


# --------------------------------------------------------------------------------------
# robustness: NaN / overflow steps, spikes, skipping
# --------------------------------------------------------------------------------------

NAN_STEP, SPIKE_STEP = 6, 9


@pytest.mark.parametrize("mode", ["percentile", "zscore"])
@pytest.mark.parametrize("precision", ["fp32-nan", "fp16-overflow"])
def test_after_a_nonfinite_step_a_1000x_spike_is_still_clipped(tmp_path, mode, precision):
    fp16 = precision == "fp16-overflow"
    bad = 1e30 if fp16 else math.nan  # fp16: a genuine overflow the GradScaler skips
    # a small initial loss scale, so that only the 1e30 step overflows (not the first step, nor the spike)
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=8.0))] if fp16 else None
    model = EventMLP(events={NAN_STEP: bad, SPIKE_STEP: 1000.0}, guard=not fp16)
    kwargs = dict(percentile=50.0) if mode == "percentile" else {}
    clipper = AdaptiveClipper(mode=mode, warmup_steps=4, **kwargs)
    trainer = make_trainer(tmp_path, [clipper], max_steps=12, plugins=plugins)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)

    pre_bad = s["clip/pre_norm"][NAN_STEP]
    assert not math.isfinite(pre_bad), "the bad step must really be non-finite"
    assert s["clip/coef"][NAN_STEP] == 1.0, "a non-finite step is not clipped"
    if fp16:
        assert trainer.precision_plugin.scaler.get_scale() == 4.0, "the scaler must have skipped one step"
    # the bad step did not enter the statistics, which stayed finite
    rule = clipper.threshold_rule(0)
    assert rule.seen.item() == 11
    assert all(torch.isfinite(t).all() for name, t in rule.state_dict().items() if name != "buffer")
    for step in range(NAN_STEP, 12):
        assert math.isfinite(s["clip/threshold"][step]), f"threshold lost at step {step}"
    # the spike is clipped down to the learned threshold
    threshold = s["clip/threshold"][SPIKE_STEP]
    pre = s["clip/pre_norm"][SPIKE_STEP]
    assert pre > 100 * threshold
    assert model.reference["step"][SPIKE_STEP]["total"] == pytest.approx(threshold, rel=1e-4)
    assert s["clip/coef"][SPIKE_STEP] == pytest.approx(threshold / pre, rel=1e-4)
    # and the threshold after the spike is in line with the one before it
    assert s["clip/threshold"][SPIKE_STEP + 1] < 3 * threshold


def test_skip_factor_skips_the_spike_on_every_count(tmp_path):
    class Weights(pl.Callback):
        def __init__(self):
            self.before, self.after = {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]

    model = EventMLP(events={SPIKE_STEP: 1000.0})
    clipper = AdaptiveClipper(mode="zscore", warmup_steps=4, skip_factor=5.0)
    weights = Weights()
    trainer = make_trainer(tmp_path, [clipper, weights], max_steps=12)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    assert clipper.skipped_steps == 1
    assert s["clip/skipped_steps"][SPIKE_STEP - 1] == 0 and s["clip/skipped_steps"][SPIKE_STEP] == 1
    assert s["clip/coef"][SPIKE_STEP] == 0.0 and s["clip/post_norm"][SPIKE_STEP] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(weights.before[SPIKE_STEP], weights.after[SPIKE_STEP]))
    assert not all(torch.equal(a, b) for a, b in zip(weights.before[SPIKE_STEP - 1], weights.after[SPIKE_STEP - 1]))
    assert clipper.threshold_rule(0).seen.item() == 11, "a skipped step must not enter the statistics"


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="percentile", percentile=40.0, window=5, warmup_steps=3, skip_factor=100.0),
        dict(mode="zscore", z_threshold=1.0, ema_decay=0.8, warmup_steps=3, skip_factor=100.0),
    ],
    ids=["percentile", "zscore"],
)
def test_resume_from_a_mid_run_checkpoint_follows_the_uninterrupted_run(tmp_path, kwargs):
    events = {3: math.nan, 11: 1000.0, 13: 10.0}  # a NaN, a skipped spike, a clipped one
    total, cut = 20, 8  # 8 batches per epoch; the checkpoint is taken after step 8
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=cut, save_top_k=-1)
    pl.seed_everything(0)
    trainer = make_trainer(
        tmp_path / "a", [AdaptiveClipper(**kwargs), ckpt], max_steps=total, enable_checkpointing=True
    )
    trainer.fit(EventMLP(events=events, guard=True), loader())
    full = clip_scalars(trainer)
    path = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={cut}" in p.name)
    state = torch.load(path, weights_only=False)["callbacks"]
    assert any(k.startswith("AdaptiveClipper") for k in state), sorted(state)

    pl.seed_everything(0)
    resumed_clipper = AdaptiveClipper(**kwargs)
    trainer = make_trainer(tmp_path / "b", [resumed_clipper], max_steps=total)
    trainer.fit(EventMLP(events=events, guard=True), loader(), ckpt_path=str(path))
    resumed = clip_scalars(trainer)
    assert sorted(resumed["clip/threshold"]) == list(range(cut, total))
    assert math.isfinite(full["clip/threshold"][cut]), "the checkpoint must come after warm-up"
    for tag in ("clip/threshold", "clip/pre_norm", "clip/post_norm", "clip/coef", "clip/skipped_steps"):
        for step in range(cut, total):
            assert resumed[tag][step] == full[tag][step] or (
                math.isnan(resumed[tag][step]) and math.isnan(full[tag][step])
            ), f"{tag}@{step}: resumed {resumed[tag][step]} vs uninterrupted {full[tag][step]}"
    assert full["clip/skipped_steps"][total - 1] == 1 and full["clip/coef"][13] < 1


def test_two_clippers_coexist_in_one_checkpoint(tmp_path):
    a = AdaptiveClipper(mode="zscore", warmup_steps=2)
    b = AdaptiveClipper(mode="percentile", warmup_steps=2, percentile=90.0)
    c = AdaptiveClipper(mode="zscore", z_threshold=3.0, warmup_steps=2)
    assert len({a.state_key, b.state_key, c.state_key}) == 3
    trainer = make_trainer(tmp_path, [a, b, c], max_steps=6, logger=False, enable_checkpointing=False)
    trainer.fit(EventMLP(), loader())
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    for cb in (a, b, c):
        assert states[cb.state_key]["rules"][0]["seen"].item() == 6
    fresh = AdaptiveClipper(mode="percentile", warmup_steps=2, percentile=90.0)
    fresh.load_state_dict(states[b.state_key])
    fresh._rule(0, torch.device("cpu"))
    assert torch.equal(fresh.threshold_rule(0).threshold(), b.threshold_rule(0).threshold())


# --------------------------------------------------------------------------------------
# precision, optimizers, configuration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_fp16_optimizer_that_unscales_itself(tmp_path, mode):
    """The gradients are still scaled when the clipper runs; it must clip the unscaled values."""
    kwargs = {"norm": dict(max_norm=0.5), "value": dict(clip_value=0.05), "agc": dict(agc_clipping=0.05)}[mode]
    model = EventMLP(optimizer_cls=SelfUnscalingSGD)
    trainer = make_trainer(tmp_path, [AdaptiveClipper(mode=mode, **kwargs)], max_steps=8, plugins=[fp16_cpu_plugin()])
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    finite = [step for step, v in s["clip/pre_norm"].items() if math.isfinite(v)]
    assert len(finite) >= 5
    for step in finite:
        true_post = model.reference["step"][step]["total"]  # unscaled by the recorder
        assert s["clip/post_norm"][step] == pytest.approx(true_post, rel=1e-3)
        if mode == "norm":
            assert true_post <= 0.5 * (1 + 1e-3)
        elif mode == "value":
            assert model.post_max_abs[step] <= 0.05 * (1 + 1e-3)
        assert s["clip/coef"][step] < 1


class TwoOptimizerModel(RecordingMLP):
    """Manual optimisation with two optimizers over disjoint parameters (GAN-like)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.norms: dict[tuple[int, int], float] = {}

    def configure_optimizers(self):
        first = list(self.net[0].parameters()) + list(self.net[2].parameters())
        second = list(self.net[4].parameters()) + list(self.net[6].parameters())
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(second, lr=0.05)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for i, opt in enumerate(self.optimizers()):
            loss = torch.nn.functional.mse_loss(self(x), y) * (1000.0 if i == 1 and batch_idx == 7 else 1.0)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def on_before_optimizer_step(self, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        i = [o.optimizer for o in self.optimizers()].index(optimizer)
        self.norms[(self.trainer.global_step, i)] = torch.linalg.vector_norm(
            torch.cat([p.grad.flatten() for p in params])
        ).item()


def test_several_optimizers_keep_separate_state_and_keys(tmp_path):
    model = TwoOptimizerModel()
    clipper = AdaptiveClipper(mode="zscore", warmup_steps=3, max_norm=math.inf, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [clipper], max_steps=20)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    assert set(s["clip/opt0/pre_norm"]) == set(range(0, 20, 2))
    # the first step of each optimizer has no history and no ceiling: unbounded, not logged
    assert set(s["clip/opt0/threshold"]) == set(range(2, 20, 2))
    assert set(s["clip/opt1/threshold"]) == set(range(3, 20, 2))
    # each optimizer's warm-up is bounded by 10x the median of its own norms so far
    assert s["clip/opt1/threshold"][3] == pytest.approx(10 * model.norms[(1, 1)], rel=1e-5)
    assert "clip/threshold" not in s
    assert clipper.threshold_rule(0).seen.item() == 10 and clipper.threshold_rule(1).seen.item() == 10
    # the spike of optimizer 1 (batch 7 = global step 15) is clipped by optimizer 1's own threshold
    assert s["clip/opt1/coef"][15] < 0.01
    assert model.norms[(15, 1)] == pytest.approx(s["clip/opt1/threshold"][15], rel=1e-4)
    # the two thresholds were learned from different norms
    assert s["clip/opt0/threshold"][14] != s["clip/opt1/threshold"][15]


def test_trainer_gradient_clip_val_is_refused_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, [AdaptiveClipper(mode="zscore")], max_steps=2, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"gradient_clip_val=1\.0.*AdaptiveClipper\(mode='zscore'") as info:
        trainer.fit(EventMLP(), loader())
    assert "max_norm=1.0" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(mode="autoclip"), "mode"),
        (dict(mode="percentile", percentile=0.0), "percentile"),
        (dict(mode="percentile", percentile=101.0), "percentile"),
        (dict(mode="percentile", window=0), "window"),
        (dict(mode="norm", max_norm=-1.0), "max_norm"),
        (dict(mode="norm"), "max_norm"),
        (dict(mode="value", clip_value=0.0), "clip_value"),
        (dict(mode="value"), "clip_value"),
        (dict(mode="zscore", min_norm=-0.1), "min_norm"),
        (dict(mode="zscore", max_norm=1.0, min_norm=2.0), "min_norm"),
        (dict(mode="zscore", skip_factor=1.0), "skip_factor"),
        (dict(mode="zscore", ema_decay=1.0), "ema_decay"),
        (dict(mode="zscore", warmup_steps=-1), "warmup_steps"),
        (dict(mode="percentile", warmup_max_norm=-1.0), "warmup_max_norm"),
        (dict(mode="norm", max_norm=1.0, warmup_max_norm=1.0), "warmup_max_norm"),
        (dict(mode="zscore", window=10), "window"),  # an argument of another mode
        (dict(mode="norm", max_norm=1.0, skip_factor=3.0), "skip_factor"),
        (dict(mode="agc", agc_clipping=-0.01), "agc_clipping"),
        (dict(mode="agc", agc_exclude=["("]), "agc_exclude"),
        (dict(mode="agc", min_norm=1.0), "min_norm"),
        (dict(mode="zscore", log_every_n_steps=0), "log_every_n_steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AdaptiveClipper(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        AdaptiveClipper("zscore")  # type: ignore[misc]


def _write_config(tmp_path, init_args: str) -> str:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            seed_everything: 0
            trainer:
              accelerator: cpu
              devices: 1
              max_steps: 6
              log_every_n_steps: 1
              enable_progress_bar: false
              enable_model_summary: false
              enable_checkpointing: false
              logger:
                class_path: lightning.pytorch.loggers.TensorBoardLogger
                init_args:
                  save_dir: {tmp_path}
                  name: cli
              callbacks:
                - class_path: lightning_gradguard.callbacks.adaptive_clipper.AdaptiveClipper
                  init_args:
            """
        )
        + textwrap.indent(textwrap.dedent(init_args), " " * 8)
        + "model:\n  hidden: 8\n"
    )
    return str(cfg)


def test_configured_from_a_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = _write_config(
        tmp_path,
        """\
        mode: agc
        agc_clipping: 0.02
        agc_exclude: ["^net\\\\.6\\\\."]
        max_norm: 2.0
        """,
    )
    cli = LightningCLI(CLIModel, run=False, args=["--config", cfg], save_config_kwargs={"overwrite": True})
    (clipper,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaptiveClipper)]
    assert (clipper.mode, clipper.agc_clipping, clipper.max_norm) == ("agc", 0.02, 2.0)
    assert clipper.agc_exclude == [r"^net\.6\."]
    cli.trainer.fit(cli.model)
    s = read_scalars(cli.trainer.logger.log_dir)
    assert sorted(s["clip/post_norm"]) == list(range(6))


def test_cli_bad_value_names_the_argument(tmp_path, capsys):
    from lightning.pytorch.cli import LightningCLI

    cfg = _write_config(tmp_path, "mode: percentile\npercentile: 0\n")
    with pytest.raises((ValueError, SystemExit)) as info:
        LightningCLI(CLIModel, run=False, args=["--config", cfg])
    assert "percentile" in str(info.value) + capsys.readouterr().err


# --------------------------------------------------------------------------------------
# cost: no host copy on steps that do not log
# --------------------------------------------------------------------------------------


class Probe(AdaptiveClipper):
    """Counts host synchronisations inside the clipper's step hook."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.syncs: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        counter = HostSyncCounter()
        calls = []
        original = torch.Tensor.tolist

        def counting_tolist(t):
            calls.append(1)
            return original(t)

        torch.Tensor.tolist = counting_tolist
        try:
            with counter:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            torch.Tensor.tolist = original
        self.syncs[trainer.global_step] = len(counter.syncs) + len(calls)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="norm", max_norm=0.5),
        dict(mode="value", clip_value=0.05),
        dict(mode="percentile", warmup_steps=2),
        dict(mode="zscore", warmup_steps=2, max_norm=5.0, min_norm=0.01),
        dict(mode="agc", max_norm=1.0),
        dict(mode="zscore", warmup_steps=2, skip_factor=4.0),
    ],
    ids=["norm", "value", "percentile", "zscore", "agc", "zscore-skip"],
)
def test_no_host_copy_on_steps_that_do_not_log(tmp_path, kwargs):
    probe = Probe(log_every_n_steps=4, **kwargs)
    trainer = make_trainer(tmp_path, [probe], max_steps=9, plugins=[fp16_cpu_plugin()])
    trainer.fit(EventMLP(), loader())
    per_step = 1 if kwargs.get("skip_factor") else 0  # the skip decision is one bool per step
    for step, syncs in probe.syncs.items():
        want = per_step + (1 if (step + 1) % 4 == 0 else 0)  # logging steps: 3, 7, ...
        assert syncs == want, f"step {step}: {syncs} host copies, expected {want}"


# --------------------------------------------------------------------------------------
# multi-process: DDP and FSDP2 (gloo, CPU)
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int) -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(jobs: list[tuple[list[str], dict[str, str]]], out: Path, timeout: float = 150.0) -> None:
    procs = []
    for i, (cmd, env) in enumerate(jobs):
        log = open(out / f"proc{i}.log", "w")  # closed below
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
    failed = []
    for proc, log in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
        if proc.returncode != 0:
            failed.append(Path(log.name).read_text(errors="replace")[-3000:])
    assert not failed, "distributed run failed:\n" + "\n---\n".join(failed)


def _wait_for(paths: list[Path], timeout: float = 30.0) -> None:
    """Rank 1 is a child of the launched rank 0, which may leave first: wait for its record."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # the last record may still be being written


@pytest.mark.slow
def test_ddp_every_rank_takes_the_same_decisions(tmp_path):
    _run([([sys.executable, str(SCRIPTS / "ddp_clipper.py"), str(tmp_path)], _env(_free_port()))], tmp_path)
    _wait_for([tmp_path / f"rank{r}.json" for r in range(2)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    d0, d1 = ranks[0]["decisions"], ranks[1]["decisions"]
    assert sorted(d0, key=int) == [str(s) for s in range(ranks[0]["max_steps"])]
    assert d0 == d1, "the ranks decided differently"
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"], "the ranks must see different data"
    spike, nan = str(ranks[0]["spike_step"]), str(ranks[0]["nan_step"])
    assert d0[spike]["skipped"] is True and d0[nan]["all_finite"] is False
    assert sum(d["skipped"] for d in d0.values()) == 1
    assert ranks[0]["seen"] == ranks[1]["seen"] == ranks[0]["max_steps"] - 2
    assert ranks[0]["weights"] == ranks[1]["weights"], "the weights diverged across ranks"
    scalars = read_scalars(str(tmp_path / "tb"))
    for step, dec in d0.items():
        assert scalars["clip/pre_norm"][int(step)] == pytest.approx(dec["pre_norm"], rel=1e-6, nan_ok=True)


@pytest.mark.slow
def test_fsdp2_sharded_gradients_are_clipped_like_the_unsharded_model(tmp_path):
    port = _free_port()
    jobs = []
    for rank in range(2):
        env = _env(port)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        jobs.append(([sys.executable, str(SCRIPTS / "fsdp2_clipper.py"), str(tmp_path)], env))
    _run(jobs, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rec in ranks:
        assert rec["sharded"]
        for case, got in rec["cases"].items():
            want = rec["reference"][case]
            for name, values in want.items():
                torch.testing.assert_close(
                    torch.tensor(got[name]), torch.tensor(values), rtol=1e-5, atol=1e-7, msg=f"{case} {name}"
                )
        assert rec["norm_after"] == pytest.approx(rec["threshold"], rel=1e-5)
    assert ranks[0]["cases"] == ranks[1]["cases"]
