"""GradGuard preset and zero-code enabling through the GRADGUARD variable, inside real Trainers."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from helpers import RecordingMLP, loader, make_trainer, read_scalars

from lightning_gradguard import AmpUnscaleCheck, GradGuard, GradientNormLogger, VanishExplodeAlarm
from lightning_gradguard.preset import callbacks_factory


def _gradguard(trainer) -> list:
    """The gradguard callbacks that will run: attached directly or inside a GradGuard."""
    out = []
    for cb in trainer.callbacks:
        out += cb.callbacks if isinstance(cb, GradGuard) else [cb]
    return [cb for cb in out if isinstance(cb, (GradientNormLogger, VanishExplodeAlarm, AmpUnscaleCheck))]


def test_the_factory_is_registered_where_lightning_looks():
    names = [ep.value for ep in entry_points(group="lightning.pytorch.callbacks_factory")]
    assert "lightning_gradguard.preset:callbacks_factory" in names


def test_without_the_variable_a_trainer_gets_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADGUARD", raising=False)
    assert callbacks_factory() == []
    trainer = make_trainer(tmp_path, [])
    assert _gradguard(trainer) == []
    monkeypatch.setenv("GRADGUARD", "0")
    assert _gradguard(make_trainer(tmp_path, [])) == []


def test_gradguard_1_adds_the_recommended_set_to_an_unchanged_script(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADGUARD", "1")
    trainer = make_trainer(tmp_path, [], max_steps=10, log_every_n_steps=5)
    kinds = [type(cb) for cb in _gradguard(trainer)]
    assert kinds == [GradientNormLogger, VanishExplodeAlarm, AmpUnscaleCheck]
    trainer.fit(RecordingMLP(), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/total"]) == sorted(scalars["train_loss"]) == [4, 9]
    assert any(t.startswith("alarm/") for t in scalars), sorted(scalars)


def test_a_named_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADGUARD", "Log")
    assert [type(cb) for cb in _gradguard(make_trainer(tmp_path, []))] == [GradientNormLogger]
    monkeypatch.setenv("GRADGUARD", "full")
    logger = _gradguard(make_trainer(tmp_path, []))[0]
    assert logger.log_param_norms and logger.log_update_ratio and logger.log_max_abs


def test_a_bad_value_is_a_clear_error_inside_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADGUARD", "yes please")
    with pytest.raises(ValueError, match=r"GRADGUARD='yes please' names no gradguard preset.*recommended"):
        make_trainer(tmp_path, [])


def test_never_duplicates_a_callback_the_script_attached(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADGUARD", "1")
    own = GradientNormLogger(log_every_n_steps=2, flow_every_n_steps=None)
    trainer = make_trainer(tmp_path, [own], max_steps=4)
    trainer.fit(RecordingMLP(), loader())
    running = _gradguard(trainer)
    assert [type(cb) for cb in running] == [GradientNormLogger, VanishExplodeAlarm, AmpUnscaleCheck]
    assert running[0] is own, "the script's own logger stays, the variable's gives way"
    assert sorted(read_scalars(trainer.logger.log_dir)["grad_norm/total"]) == [1, 3]  # logged once, at 2

    # a GradGuard in the script's callbacks: the variable adds nothing more
    trainer = make_trainer(tmp_path / "b", [GradGuard(preset="alarm")], max_steps=2)
    trainer.fit(RecordingMLP(), loader())
    assert [type(cb) for cb in _gradguard(trainer)] == [VanishExplodeAlarm, GradientNormLogger, AmpUnscaleCheck]


def test_gradguard_in_callbacks_runs_its_callbacks_and_checkpoints_them(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADGUARD", raising=False)
    guard = GradGuard(log_every_n_steps=3, flow_every_n_steps=None)
    trainer = make_trainer(tmp_path, [guard], max_steps=6)
    trainer.fit(RecordingMLP(), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/total"]) == [2, 5]
    alarm = guard.callbacks[1]
    assert alarm.steps_checked == 6
    path = tmp_path / "g.ckpt"
    trainer.save_checkpoint(path)
    import torch

    saved = torch.load(path, weights_only=False)["callbacks"][guard.state_key]
    assert alarm.state_key in saved
    resumed = GradGuard(log_every_n_steps=3, flow_every_n_steps=None)
    trainer = make_trainer(tmp_path / "r", [resumed], max_steps=8)
    trainer.fit(RecordingMLP(), loader(), ckpt_path=str(path))
    assert resumed.callbacks[1].steps_checked == 8, "the alarm continued from its checkpoint"


def test_bad_preset_arguments_name_the_argument():
    with pytest.raises(ValueError, match="preset"):
        GradGuard(preset="everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradGuard(log_every_n_steps=0)
