"""Configuring the callbacks from a LightningCLI YAML file."""

from __future__ import annotations

import textwrap

import pytest
from helpers import CLIModel, read_scalars
from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import GradientNormLogger, VanishExplodeAlarm


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
              enable_progress_bar: false
              enable_model_summary: false
              enable_checkpointing: false
              logger:
                class_path: lightning.pytorch.loggers.TensorBoardLogger
                init_args:
                  save_dir: {tmp_path}
                  name: cli
              callbacks:
                - class_path: lightning_gradguard.GradientNormLogger
                  init_args:
            """
        )
        + textwrap.indent(textwrap.dedent(init_args), " " * 8)
        + "model:\n  hidden: 8\n"
    )
    return str(cfg)


def test_yaml_config_builds_the_callback_and_fit_logs(tmp_path):
    cfg = _write_config(
        tmp_path,
        """\
        log_every_n_steps: 2
        group_by: depth
        group_depth: 1
        log_param_norms: true
        """,
    )
    cli = LightningCLI(CLIModel, run=False, args=["--config", cfg], save_config_kwargs={"overwrite": True})
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, GradientNormLogger)]
    assert len(callbacks) == 1
    cb = callbacks[0]
    assert (cb.log_every_n_steps, cb.group_by, cb.group_depth, cb.log_param_norms) == (2, "depth", 1, True)
    cli.trainer.fit(cli.model)
    scalars = read_scalars(cli.trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/total"]) == [1, 3, 5]  # Lightning's cadence: (step + 1) % 2 == 0
    assert sorted(scalars["grad_norm/net"]) == [1, 3, 5]  # depth 1: one group for the whole Sequential
    assert "param_norm/net" in scalars


def test_yaml_bad_value_is_rejected_naming_the_argument(tmp_path, capsys):
    cfg = _write_config(tmp_path, "log_every_n_steps: 0\n")
    with pytest.raises((ValueError, SystemExit)) as info:
        LightningCLI(CLIModel, run=False, args=["--config", cfg])
    message = str(info.value) + capsys.readouterr().err
    assert "log_every_n_steps" in message


def test_yaml_config_for_the_alarm(tmp_path):
    cfg = tmp_path / "alarm.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              accelerator: cpu
              max_steps: 3
              enable_progress_bar: false
              enable_checkpointing: false
              default_root_dir: {tmp_path}
              logger: false
              callbacks:
                - class_path: lightning_gradguard.VanishExplodeAlarm
                  init_args:
                    halt_on_nan: false
                    explode_action: skip
                    vanish_ratio: 1.0e+6
                    patience: 5
                    spike_zscore: null
            model:
              hidden: 8
            """
        )
    )
    cli = LightningCLI(CLIModel, run=False, args=["--config", str(cfg)], save_config_kwargs={"overwrite": True})
    (alarm,) = [c for c in cli.trainer.callbacks if isinstance(c, VanishExplodeAlarm)]
    assert alarm.nonfinite_action == "skip" and alarm.actions["exploding"] == "skip"
    assert alarm.detector_kwargs["vanish_ratio"] == 1e6 and alarm.detector_kwargs["spike_zscore"] is None
    cli.trainer.fit(cli.model)
    assert alarm.steps_checked == 3


def test_yaml_bad_alarm_value_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_gradguard.VanishExplodeAlarm\n"
        "      init_args:\n        explode_action: panic\n"
    )
    with pytest.raises((ValueError, SystemExit)) as info:
        LightningCLI(CLIModel, run=False, args=["--config", str(cfg)])
    assert "explode_action" in str(info.value) + capsys.readouterr().err
