"""Configuring the callbacks from a LightningCLI YAML file."""

from __future__ import annotations

import textwrap

import pytest
from helpers import CLIModel, read_scalars
from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import GradientNormLogger


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
    assert sorted(scalars["grad_norm/total"]) == [0, 2, 4]
    assert sorted(scalars["grad_norm/net"]) == [0, 2, 4]  # depth 1: one group for the whole Sequential
    assert "param_norm/net" in scalars


def test_yaml_bad_value_is_rejected_naming_the_argument(tmp_path, capsys):
    cfg = _write_config(tmp_path, "log_every_n_steps: 0\n")
    with pytest.raises((ValueError, SystemExit)) as info:
        LightningCLI(CLIModel, run=False, args=["--config", cfg])
    message = str(info.value) + capsys.readouterr().err
    assert "log_every_n_steps" in message
