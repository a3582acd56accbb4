"""Configuring the callbacks from a LightningCLI YAML file."""

from __future__ import annotations

import importlib.util
import os
import textwrap

import pytest
from helpers import CLIModel, read_accumulator, read_scalars
from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import GradGuard, GradientNormLogger, VanishExplodeAlarm


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


# --------------------------------------------------------------------------------------
# the README's command-line example (examples/cli.py, examples/cli_config.yaml)
# --------------------------------------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _example_cli():
    spec = importlib.util.spec_from_file_location("example_cli", os.path.join(EXAMPLES, "cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quiet(tmp_path) -> list[str]:
    return [
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def test_readme_cli_example_with_its_yaml_trains_and_logs(tmp_path):
    config = os.path.join(EXAMPLES, "cli_config.yaml")
    cli = _example_cli().main(["fit", "--config", config, "--trainer.max_steps=20", *_quiet(tmp_path)])
    kinds = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert {"GradientNormLogger", "VanishExplodeAlarm", "AdaptiveClipper"} <= set(kinds)
    acc = read_accumulator(cli.trainer.logger.log_dir)
    assert "grad_flow/heatmap" in acc.Tags()["images"]
    scalars = read_scalars(cli.trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/total"]) == sorted(scalars["train/loss"]) == [9, 19]
    assert "clip/pre_norm" in scalars and "update_ratio_log10/first" in scalars


def test_short_class_names_on_the_command_line(tmp_path):
    args = ["fit", "--trainer.max_steps=4", "--trainer.log_every_n_steps=2", *_quiet(tmp_path)]
    args += ["--trainer.callbacks+=GradGuard", "--trainer.callbacks.preset=log"]
    args += ["--trainer.callbacks+=AdaptiveClipper", "--trainer.callbacks.mode=norm", "--trainer.callbacks.max_norm=1"]
    cli = _example_cli().main(args)
    guard = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradGuard))
    assert [type(cb).__name__ for cb in guard.callbacks] == ["GradientNormLogger"]
    assert sorted(read_scalars(cli.trainer.logger.log_dir)["clip/pre_norm"]) == [1, 3]


def test_help_lists_the_choices_and_a_typo_is_a_short_error(capsys):
    with pytest.raises(SystemExit) as info:
        _example_cli().main(["fit", "--trainer.callbacks.help", "GradientNormLogger"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "{module,parameter,depth,pattern,total,auto}" in out
    assert "{on_before_optimizer_step,on_after_backward}" in out
    with pytest.raises(SystemExit) as info:
        _example_cli().main(["fit", "--trainer.callbacks+=GradientNormLogger", "--trainer.callbacks.hook=on_step"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "on_step" in err and "on_after_backward" in err and "Traceback" not in err


def test_yaml_gradguard_preset(tmp_path):
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              max_steps: 4
              log_every_n_steps: 2
              enable_progress_bar: false
              logger:
                class_path: TensorBoardLogger
                init_args: {{save_dir: {tmp_path}, name: guard}}
              callbacks:
                - class_path: lightning_gradguard.GradGuard
                  init_args: {{preset: full, flow_every_n_steps: 2}}
            """
        )
    )
    cli = _example_cli().main(["fit", "--config", str(cfg)])
    guard = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradGuard))
    assert guard.preset == "full" and guard.callbacks[0].log_param_norms
    assert "grad_flow/heatmap" in read_accumulator(cli.trainer.logger.log_dir).Tags()["images"]
    assert sorted(read_scalars(cli.trainer.logger.log_dir)["param_norm/total"]) == [1, 3]
