"""VanishExplodeAlarm under real Trainer.fit runs on CPU."""

from __future__ import annotations

import dataclasses
import glob
import inspect
import math
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    RecordingMLP,
    WeightHistory,
    fp16_cpu_plugin,
    loader,
    make_trainer,
    poisoned_loader,
    read_scalars,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard import GradientAnomalyError, GradientNormLogger, VanishExplodeAlarm
from lightning_gradguard.callbacks import _session
from lightning_gradguard.diagnosis import DetectorConfig, DeviceReading
from lightning_gradguard.stats import take_snapshot

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from demo import Classifier, DeepSigmoidMLP, ResidualReLUMLP, two_spirals


def _spirals(batch_size=128):
    return DataLoader(two_spirals(n=1024), batch_size=batch_size, shuffle=True)


def read_texts(log_dir: str) -> dict[str, dict[int, str]]:
    """Tag -> step -> markdown of the Text tab, read back from the event files."""
    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, str]] = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            events = acc.Tensors(tag)
            out[tag[: -len("/text_summary")]] = {e.step: e.tensor_proto.string_val[0].decode() for e in events}
    return out


def _fit(tmp_path, model, data, callbacks, **kw):
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks, **kw)
    trainer.fit(model, data)
    return trainer


# ---------------------------------------------------------------------- vanishing / healthy


def test_deep_sigmoid_is_reported_as_vanishing_naming_its_first_layers(tmp_path):
    pl.seed_everything(0, verbose=False)
    alarm = VanishExplodeAlarm(patience=20)
    with pytest.warns(UserWarning, match="vanishing gradients at step 19"):
        trainer = _fit(tmp_path, Classifier(DeepSigmoidMLP(20, 32), 1e-3), _spirals(), [alarm], max_steps=40)
    finding = alarm.findings[0]
    assert finding.kind == "vanishing" and finding.step == 19  # within the patience window
    assert finding.layers[0][0] == "net.layers.0"  # the first layer is named first
    assert finding.ratio > 1e4
    assert any("ReLU" in a for a in finding.advice)
    assert alarm.counts["vanishing"] == 40 - 19 and alarm.episodes["vanishing"] == 1  # warned once
    assert alarm.counts["nonfinite"] == alarm.counts["exploding"] == alarm.counts["dead"] == 0
    assert trainer.global_step == 40  # "warn" does not stop
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["alarm/vanishing"][39] == 21.0
    assert scalars["alarm/deep_shallow_log10"][0] > 4
    assert "alarm/exploding" not in scalars and "alarm/dead" not in scalars  # kinds that never fired: no chart
    texts = read_texts(trainer.logger.log_dir)
    assert list(texts["alarm/findings"]) == [19]  # the finding, at its step, as markdown
    md = texts["alarm/findings"][19]
    assert md.startswith("**vanishing** gradients at step 19") and "| `net.layers.0` |" in md and "**Try:**" in md
    assert "| vanishing | 21 | 1 | 19 |" in texts["alarm/summary"][40]  # the health summary at the end of fit


def test_healthy_residual_relu_raises_no_alarm_of_any_kind(tmp_path, recwarn):
    alarm = VanishExplodeAlarm()
    model = Classifier(ResidualReLUMLP(20, 32), 1e-3)
    trainer = _fit(tmp_path, model, _spirals(), [alarm], max_steps=300, log_every_n_steps=50)
    assert alarm.steps_checked == 300
    assert all(v == 0 for v in alarm.counts.values()), alarm.counts
    assert alarm.findings == []
    assert not [w for w in recwarn if "[gradguard]" in str(w.message)]
    assert "no vanishing, exploding, dead or non-finite" in alarm.summary()
    assert trainer.global_step == 300


def test_dead_layer_is_reported(tmp_path):
    class DeadMiddle(RecordingMLP):
        def forward(self, x):
            h = self.net[0](x)
            h = self.net[2](h) * 0.0  # the layer's output is multiplied away: exact-zero gradient
            return self.net[6](torch.tanh(self.net[4](torch.tanh(h) + x.sum(1, keepdim=True))))

    alarm = VanishExplodeAlarm(dead_patience=5, vanish_ratio=None)
    with pytest.warns(UserWarning, match="dead gradients"):
        _fit(tmp_path, DeadMiddle(), loader(), [alarm], max_steps=8)
    finding = next(f for f in alarm.findings if f.kind == "dead")
    assert [name for name, _ in finding.layers] == ["net.0", "net.2"]


# ---------------------------------------------------------------------- exploding


class ReluRNN(pl.LightningModule):
    """nn.RNN with ReLU and weight_hh filled with a constant > 1: gradients grow with length."""

    def __init__(self, fill: float = 1.0, length: int = 20, lr: float = 1e-3):
        super().__init__()
        self.rnn = nn.RNN(5, 10, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(10, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.fill_(fill / 10)
        self.length, self.lr = length, lr

    def training_step(self, batch, batch_idx):
        (x,) = batch
        out, _ = self.rnn(x[:, : self.length])
        return self.head(out[:, -1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _sequences(n=64, length=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(torch.utils.data.TensorDataset(torch.rand(n, length, 5, generator=g)), batch_size=16)


def test_exploding_rnn_is_reported(tmp_path):
    # weight_hh = 0.25 everywhere: spectral radius 2.5 on non-negative (ReLU) states, so the
    # gradient grows ~2.5x per time step: length 20 gives norms far above the ceiling.
    alarm = VanishExplodeAlarm(max_norm=1e4, halt_on_nan=True)
    with pytest.warns(UserWarning, match="exploding gradients at step 0"):
        _fit(tmp_path, ReluRNN(fill=2.5, length=20, lr=1e-12), _sequences(), [alarm], max_steps=4)
    finding = alarm.findings[0]
    assert finding.kind == "exploding" and finding.total_norm > 1e4
    assert "ceiling" in finding.summary
    assert {name for name, _ in finding.layers} >= {"rnn"}
    assert any("LSTM" in a for a in finding.advice)


def test_spike_against_the_runs_own_history(tmp_path):
    class SpikeAt(RecordingMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (1e4 if self.trainer.global_step == 30 else 1.0)

    alarm = VanishExplodeAlarm(warmup_steps=20, max_norm=None, explode_action="skip")
    history = WeightHistory()
    with pytest.warns(UserWarning, match="exploding gradients at step 30"):
        _fit(tmp_path, SpikeAt(), loader(n=512), [alarm, history], max_steps=40)
    finding = alarm.findings[0]
    assert finding.zscore is not None and finding.zscore > 6
    assert alarm.counts["exploding"] == 1 and alarm.skipped_steps == 1
    for name, value in history.history[31].items():  # the spike step was skipped
        assert torch.equal(value, history.history[30][name]), name


# ---------------------------------------------------------------------- non-finite


def test_nan_in_data_halts_at_that_step_with_last_good_weights(tmp_path):
    k = 5
    alarm = VanishExplodeAlarm()  # halt_on_nan=True by default
    history = WeightHistory()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    model = RecordingMLP(optimizer_cls=torch.optim.Adam, lr=1e-2)
    with pytest.warns(UserWarning, match=f"nonfinite gradients at step {k}"):
        trainer = _fit(
            tmp_path, model, poisoned_loader(k), [alarm, history, ckpt], max_steps=20, enable_checkpointing=True
        )
    assert alarm.halted_at == k and trainer.should_stop
    assert max(history.history) == k + 1  # batch k ran (skipped), nothing after it
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p.detach(), history.history[k][name]), name  # = after step k-1
    for state in trainer.optimizers[0].state.values():
        for v in state.values():
            assert torch.isfinite(v).all()
    # a checkpoint taken at the halt is usable: finite, loads, equals the last good weights
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    restored = RecordingMLP.load_from_checkpoint(str(last))
    for name, p in restored.named_parameters():
        assert torch.equal(p, history.history[k][name]), name
    # the crash dump holds the offending batch
    dumps = glob.glob(os.path.join(trainer.log_dir, "gradguard_crash_step*.pt"))
    assert dumps == alarm.dump_paths and len(dumps) == 1
    dump = torch.load(dumps[0], weights_only=False)
    assert dump["step"] == k and dump["batch_idx"] == k
    assert torch.isnan(dump["batch"][0]).any()
    assert dump["nonfinite_groups"] == ["net.0", "net.2", "net.4", "net.6"]
    assert "halted at step 5" in alarm.summary()


def test_raise_action_carries_the_diagnosis(tmp_path):
    alarm = VanishExplodeAlarm(nonfinite_action="raise")
    model = RecordingMLP()
    before = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    with pytest.raises(GradientAnomalyError) as info:
        _fit(tmp_path, model, poisoned_loader(3), [alarm, Snap()], max_steps=10)
    finding = info.value.finding
    assert finding.kind == "nonfinite" and finding.step == 3
    assert finding.layers[0][0] == "net.0"
    assert "NaN/Inf" in str(info.value) and "try:" in str(info.value)
    assert finding.dump_path and os.path.exists(finding.dump_path)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    texts = read_texts(glob.glob(os.path.join(tmp_path, "tb", "version_*"))[0])
    assert "**nonfinite** gradients at step 3" in texts["alarm/findings"][3]
    assert "| nonfinite | 1 | 1 | 3 |" in texts["alarm/summary"][3]  # written although fit ended with the error


def test_halt_on_nan_false_skips_and_continues(tmp_path):
    alarm = VanishExplodeAlarm(halt_on_nan=False)
    model = RecordingMLP()
    history = WeightHistory()
    with pytest.warns(UserWarning, match="nonfinite"):
        trainer = _fit(tmp_path, model, poisoned_loader(2), [alarm, history], max_steps=8)
    assert trainer.global_step == 8 and alarm.halted_at is None
    assert alarm.skipped_steps == 1 and alarm.counts["nonfinite"] == 1
    for name in history.history[3]:
        assert torch.equal(history.history[3][name], history.history[2][name])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not glob.glob(os.path.join(trainer.log_dir, "gradguard_crash_*"))


def test_nonfinite_loss_alone_is_caught(tmp_path):
    class InfLoss(RecordingMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + (torch.log(torch.zeros(())) * 0 if batch_idx == 2 else 0)  # -inf * 0 = NaN

    alarm = VanishExplodeAlarm()
    with pytest.warns(UserWarning, match="nonfinite"):
        _fit(tmp_path, InfLoss(), loader(), [alarm], max_steps=6)
    assert alarm.halted_at == 2


# ---------------------------------------------------------------------- fp16


def test_fp16_single_overflow_is_counted_not_halted(tmp_path):
    class OneHugeLoss(RecordingMLP):
        def __init__(self, poison: bool):
            super().__init__()
            self.poison = poison

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (1e35 if self.poison and batch_idx == 6 else 1.0)

    counts = {}
    for poison in (False, True):
        alarm = VanishExplodeAlarm()
        pl.seed_everything(0, verbose=False)  # same weights in both runs
        trainer = _fit(
            tmp_path / str(poison), OneHugeLoss(poison), loader(), [alarm], max_steps=8, plugins=[fp16_cpu_plugin()]
        )
        assert alarm.halted_at is None and trainer.global_step == 8
        assert alarm.counts["nonfinite"] == 0 and alarm.findings == []
        counts[poison] = alarm.counts["overflow"]
    assert counts[True] == counts[False] + 1  # exactly the injected step, on top of the usual start-up ones
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["alarm/overflow"][7] == counts[True]


def test_fp16_persistent_overflow_halts(tmp_path):
    class AlwaysHuge(RecordingMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (1e35 if self.trainer.global_step >= 3 else 1.0)

    alarm = VanishExplodeAlarm(max_consecutive_overflows=5)
    model = AlwaysHuge()
    with pytest.warns(UserWarning, match="fp16 overflow steps in a row"):
        trainer = _fit(tmp_path, model, loader(n=256), [alarm], max_steps=30, plugins=[fp16_cpu_plugin()])
    assert alarm.halted_at is not None and alarm.halted_at <= 3 + 5
    assert trainer.global_step < 30
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- state, config, args


def test_state_dict_round_trip_restores_the_running_statistics(tmp_path):
    alarm = VanishExplodeAlarm(warmup_steps=3)
    _fit(tmp_path, RecordingMLP(), loader(), [alarm], max_steps=6)
    state = alarm.state_dict()
    fresh = VanishExplodeAlarm(warmup_steps=3)
    fresh.load_state_dict(state)
    assert fresh.steps_checked == 6
    restored = fresh._detector(0).state_dict()
    assert restored["count"] == pytest.approx(6.0)
    assert restored["mean"] == pytest.approx(alarm.detectors[0].state_dict()["mean"])


def test_works_beside_the_logger_sharing_one_snapshot(tmp_path, monkeypatch):
    taken = []

    def counting_take_snapshot(*args, **kwargs):
        taken.append(take_snapshot(*args, **kwargs))
        return taken[-1]

    readings = []
    to_host = DeviceReading.to_host
    monkeypatch.setattr(_session, "take_snapshot", counting_take_snapshot)
    monkeypatch.setattr(DeviceReading, "to_host", lambda reading: readings.append(to_host(reading)) or readings[-1])
    alarm = VanishExplodeAlarm()
    trainer = _fit(tmp_path, RecordingMLP(), loader(), [GradientNormLogger(), alarm], max_steps=5)
    assert len(taken) == 5, "each callback took its own snapshot"  # one per optimizer step, for both
    assert len(readings) == alarm.steps_checked == 5
    scalars = read_scalars(trainer.logger.log_dir)
    for step, reading in enumerate(readings):
        assert reading.total_norm == pytest.approx(scalars["grad_norm/total"][step], rel=1e-6), step
    # the first step's window holds one step: its median ratio is that step's deepest / shallowest norm
    first, last = scalars["grad_norm/net.0"][0], scalars["grad_norm/net.6"][0]
    assert readings[0].ratio == pytest.approx(last / first, rel=1e-5)
    assert scalars["alarm/deep_shallow_log10"][0] == pytest.approx(math.log10(last / first), abs=1e-5)
    assert not [k for k in scalars if k.startswith("alarm/") and k not in ("alarm/deep_shallow_log10", "alarm/zscore")]


def test_the_detector_settings_default_to_the_config():
    params = inspect.signature(VanishExplodeAlarm).parameters
    for f in dataclasses.fields(DetectorConfig):
        assert params[f.name].default == f.default, f.name
    alarm = VanishExplodeAlarm(patience=7, max_norm=100)
    assert alarm.config == DetectorConfig(patience=7, max_norm=100)
    assert alarm.detector_kwargs == dataclasses.asdict(alarm.config)


class TwoOptimizers(pl.LightningModule):
    """Manual optimisation: ``first`` (optimizer 0) and ``second`` (optimizer 1), stepped one after the other.

    At batch ``nan_batch`` a NaN is written into ``first``'s gradient only: optimizer 0's step
    is non-finite, optimizer 1's gradients are clean.
    """

    def __init__(self, nan_batch: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 1)
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        first_opt, second_opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.second(torch.tanh(self.first(x))), y)
        first_opt.zero_grad()
        second_opt.zero_grad()
        self.manual_backward(loss)
        if batch_idx == self.nan_batch:
            self.first.weight.grad[0, 0] = math.nan
        first_opt.step()
        second_opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)


def test_after_a_halt_no_later_optimizer_of_the_batch_updates(tmp_path):
    """The halt comes at optimizer 0's step; optimizer 1's clean step in the same batch must not apply."""
    k = 3

    class BatchStart(pl.Callback):
        def __init__(self):
            self.weights = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.weights[batch_idx] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    alarm, start = VanishExplodeAlarm(), BatchStart()
    model = TwoOptimizers(nan_batch=k)
    with pytest.warns(UserWarning, match=f"nonfinite gradients at step {2 * k}"):
        trainer = _fit(tmp_path, model, loader(), [alarm, start], max_steps=20, logger=False)
    assert not torch.equal(start.weights[k]["second.weight"], start.weights[k - 1]["second.weight"])  # it learns
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p.detach(), start.weights[k][name]), f"{name} changed in the batch of the halt"
    assert alarm.halted_at == 2 * k  # optimizer 0's step of batch k (each optimizer step counts)
    assert alarm.steps_checked == 2 * k + 1 and alarm.skipped_steps == 1 and trainer.global_step == 2 * k + 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"halt_on_nan": "yes"}, "halt_on_nan"),
        ({"nonfinite_action": "warn"}, "nonfinite_action"),
        ({"explode_action": "explode"}, "explode_action"),
        ({"vanish_action": None}, "vanish_action"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"spike_zscore": 0}, "spike_zscore"),
        ({"ema_alpha": 1.0}, "ema_alpha"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"vanish_ratio": 0.5}, "vanish_ratio"),
        ({"vanish_floor": math.inf}, "vanish_floor"),
        ({"patience": 0}, "patience"),
        ({"dead_patience": 1.5}, "dead_patience"),
        ({"spike_min_ratio": -3}, "spike_min_ratio"),
        ({"max_consecutive_overflows": 0}, "max_consecutive_overflows"),
        ({"group_by": "nope"}, "group_by"),
        ({"dump_dir": 3}, "dump_dir"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VanishExplodeAlarm(**kwargs)


# ---------------------------------------------------------------------- earlier warnings, dead units, text


class GrowingLoss(RecordingMLP):
    """From step ``start`` on, the loss (and so every gradient) is multiplied by ~32 more each step."""

    def __init__(self, start: int = 5):
        super().__init__()
        self.start = start

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 10.0 ** (1.5 * max(0, self.trainer.global_step - self.start + 1))


def test_geometric_growth_stops_before_the_ceiling_and_before_warm_up_arms_the_spike_rule(tmp_path):
    alarm = VanishExplodeAlarm(explode_action="stop")  # warm-up 20: the spike rule is not armed yet
    model = GrowingLoss(start=5)
    with pytest.warns(UserWarning, match="geometric growth"):
        trainer = _fit(tmp_path, model, loader(n=256), [alarm], max_steps=30)
    assert alarm.halted_at == 6  # x32 at step 5 (one step is not a trend), x1e3 over steps 5-6: stop
    finding = alarm.findings[0]
    assert finding.kind == "exploding" and finding.total_norm < 1e6  # below the ceiling
    assert [n for n, _ in finding.layers] == ["net.0", "net.2", "net.4", "net.6"]  # every layer, input side first
    assert all(torch.isfinite(p).all() for p in model.parameters())
    texts = read_texts(trainer.logger.log_dir)
    assert "**exploding** gradients at step 6" in texts["alarm/findings"][6]
    assert "training halted at step 6" in texts["alarm/summary"][6]  # written on halt
    baseline = VanishExplodeAlarm(explode_action="stop", growth_total=None)
    _fit(tmp_path / "ceiling", GrowingLoss(start=5), loader(n=256), [baseline], max_steps=30)
    assert baseline.halted_at > alarm.halted_at  # the ceiling (1e6) alone fires later, on a larger norm
    assert baseline.findings[0].total_norm > 30 * finding.total_norm


class DyingReLU(pl.LightningModule):
    """A ReLU MLP whose first layer's biases are pushed far negative at ``kill_step``: most units die."""

    def __init__(self, kill_step: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        self.kill_step = kill_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.kill_step:
            with torch.no_grad():
                self.net[0].bias[:24] = -100.0  # 24 of 32 units never fire again
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_dead_units_are_reported_with_their_layer_and_share(tmp_path):
    alarm = VanishExplodeAlarm(dead_patience=5)
    with pytest.warns(UserWarning, match="dead gradients"):
        trainer = _fit(tmp_path, DyingReLU(kill_step=3), loader(n=256), [alarm], max_steps=12)
    finding = alarm.findings[0]
    assert finding.kind == "dead" and finding.step == 3 + 5 - 1
    assert finding.units == [("net.0", 0.75, 32)]  # 24 of 32 rows of the first Linear
    assert "net.0: 75% of 32" in finding.summary
    assert alarm.counts["dead"] == 12 - finding.step
    assert "| `net.0` | 75% of 32 |" in read_texts(trainer.logger.log_dir)["alarm/findings"][finding.step]
    quiet = VanishExplodeAlarm(dead_patience=5, dead_unit_share=None)
    _fit(tmp_path / "off", DyingReLU(kill_step=3), loader(n=256), [quiet], max_steps=12)
    assert quiet.counts["dead"] == 0  # the layer as a whole still learns: only units are dead


def test_action_arguments_are_typed_as_literals():
    from typing import get_args, get_type_hints

    hints = get_type_hints(VanishExplodeAlarm.__init__)
    assert set(get_args(hints["explode_action"])) == {"warn", "skip", "stop", "raise"}
    assert set(get_args(get_args(hints["nonfinite_action"])[0])) == {"skip", "stop", "raise"}
    with pytest.raises(ValueError, match="explode_action"):
        VanishExplodeAlarm(explode_action="halt")
