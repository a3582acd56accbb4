"""Real multi-process runs on CPU with gloo: DDP, FSDP2 ``fully_shard`` and ModelParallelStrategy.

Each scenario is a script under ``tests/scripts`` started in fresh processes (Lightning
relaunches its own scripts for rank 1; the FSDP2 script is started once per rank with
torchrun-style variables). The scripts record what they measured themselves, without
gradguard, into JSON files; the tests compare that with what gradguard reported or
logged to TensorBoard. Each script runs once per module (fixtures), so a run that
fails or hangs shows up in every test that needs it, with its output tail.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_close_rel, read_scalars

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "scripts"
TIMEOUT_S = 120
WORLD = 2

# Variables that would make a child believe it was started by a cluster or by torchrun.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_")


class RankFailed(AssertionError):
    """A launched process exited with a non-zero status."""


class RankHung(AssertionError):
    """A launched process did not finish within the time limit."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def _launch(jobs: list[tuple[list[str], dict[str, str]]], log_dir: Path, timeout: float = TIMEOUT_S) -> float:
    """Run the commands side by side; raise with their output tails if one fails or hangs.

    Each process starts its own session, so that on a timeout the whole group (including
    the rank Lightning spawned) is killed. Returns the wall time in seconds.
    """
    procs = []
    start = time.monotonic()
    for i, (cmd, env) in enumerate(jobs):
        log = log_dir / f"proc{i}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log, cmd))
    hung = []
    for proc, _log, _cmd in procs:
        remaining = max(1.0, timeout - (time.monotonic() - start))
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            hung.append(proc)
    for proc in hung:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    elapsed = time.monotonic() - start

    def report() -> str:
        parts = []
        for proc, log, cmd in procs:
            state = "killed after timeout" if proc in hung else f"exit code {proc.returncode}"
            parts.append(f"--- {' '.join(cmd[1:])} ({state}); last lines:\n{_tail(log)}")
        return "\n".join(parts)

    if hung:
        raise RankHung(f"distributed run did not finish within {timeout:.0f} s\n{report()}")
    if any(proc.returncode != 0 for proc, _, _ in procs):
        raise RankFailed(f"distributed run failed\n{report()}")
    return elapsed


def _lightning_run(script: str, out_dir: Path, *args: str) -> float:
    """A script whose Trainer(devices=2) relaunches it for rank 1."""
    cmd = [sys.executable, str(SCRIPTS / script), str(out_dir), *args]
    return _launch([(cmd, _base_env(_free_port()))], out_dir)


def _torchrun_style(script: str, out_dir: Path, *args: str) -> float:
    """One process per rank, with the variables torchrun would set."""
    port = _free_port()
    jobs = []
    for rank in range(WORLD):
        env = _base_env(port)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
        jobs.append(([sys.executable, str(SCRIPTS / script), str(out_dir), *args], env))
    return _launch(jobs, out_dir)


def _load(path: Path) -> dict:
    assert path.is_file(), f"{path.name} was not written; files there: {sorted(os.listdir(path.parent))}"
    with open(path) as fh:
        return json.load(fh)


def _event_files(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "**" / "events.out.tfevents.*"), recursive=True))


# ======================================================================================
# DDP + GradientNormLogger
# ======================================================================================


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    elapsed = _lightning_run("ddp_logger.py", out)
    ranks = [_load(out / f"rank{r}.json") for r in range(WORLD)]
    return out, ranks, elapsed


def test_ddp_logged_norms_are_those_of_the_all_reduced_gradients(ddp_run):
    out, ranks, _ = ddp_run
    rank0 = ranks[0]
    assert rank0["strategy"] == "DDPStrategy" and rank0["world_size"] == WORLD
    scalars = read_scalars(str(out / "tb"))
    logged = {t for t in scalars if t.startswith("grad_norm/")}
    assert logged == {"grad_norm/total", "grad_norm/net.0", "grad_norm/net.2", "grad_norm/net.4"}, logged
    steps = {int(s): rec for s, rec in rank0["steps"].items()}
    assert sorted(steps) == list(range(5))
    for step, rec in steps.items():
        for key, want in rec["norms"].items():
            tag = f"grad_norm/{key}"
            assert step in scalars[tag], f"{tag} has no value at step {step}: {sorted(scalars[tag])}"
            assert_close_rel(scalars[tag][step], want, 1e-4, f"{tag}@{step}")


def test_ddp_gradients_really_were_averaged_over_different_data(ddp_run):
    """Guards the premise of the test above: the ranks saw different rows, and the
    gradient the callback measured is the mean of the two local gradients, not either."""
    _, ranks, _ = ddp_run
    for step, rec0 in ranks[0]["steps"].items():
        rec1 = ranks[1]["steps"][step]
        rows0, rows1 = set(rec0["batch_rows"]), set(rec1["batch_rows"])
        assert rows0 and rows1 and not rows0 & rows1, f"step {step}: ranks shared rows {rows0 & rows1}"
        g0, g1 = torch.tensor(rec0["grad"]), torch.tensor(rec1["grad"])
        local0, local1 = torch.tensor(rec0["local_grad"]), torch.tensor(rec1["local_grad"])
        scale = torch.linalg.vector_norm(g0).item()
        assert torch.linalg.vector_norm(g0 - g1).item() <= 1e-6 * scale, f"step {step}: ranks' gradients differ"
        mean = (local0 + local1) / 2
        assert torch.linalg.vector_norm(g0 - mean).item() <= 1e-5 * scale, f"step {step}: not the mean"
        spread = torch.linalg.vector_norm(local0 - local1).item()
        assert spread > 1e-2 * scale, f"step {step}: local gradients nearly equal, averaging is untested"


def test_ddp_only_rank_zero_writes_event_files(ddp_run):
    out, _, _ = ddp_run
    files = _event_files(out)
    assert len(files) == 1, f"expected one event file (rank 0), found {files}"
    assert Path(files[0]).parent == out / "tb" / "version_0"


# ======================================================================================
# FSDP2 (fully_shard) + stats.take_snapshot, no Trainer
# ======================================================================================

REL_FSDP = 1e-5


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    elapsed = _torchrun_style("fsdp2_snapshot.py", out)
    return [_load(out / f"rank{r}.json") for r in range(WORLD)], elapsed


def _check_against(record: dict, reference: dict, what: str, divide_by: float = 1.0) -> None:
    groups = record["groups"]
    assert list(groups) == [k for k in reference if k not in ("total", "max_abs")], what
    for name, got in groups.items():
        assert_close_rel(got, reference[name] / divide_by, REL_FSDP, f"{what} group {name}")
    assert_close_rel(record["total"], reference["total"] / divide_by, REL_FSDP, f"{what} total")
    assert_close_rel(record["max_abs"], reference["max_abs"] / divide_by, REL_FSDP, f"{what} max_abs")
    assert record["all_finite"] and not record["nonfinite_groups"], what


def test_fsdp2_gradients_are_unevenly_sharded_dtensors(fsdp2_run):
    ranks, _ = fsdp2_run
    for rec in ranks:
        assert rec["sharded"] and rec["grad_types"] == ["DTensor"]
        assert "norm.bias" not in rec["names"], "the frozen parameter must not be in the ParamSet"
    numel0, numel1 = ranks[0]["local_numel"], ranks[1]["local_numel"]
    assert numel0["inp.weight"] == 4 * 6 and numel1["inp.weight"] == 3 * 6  # 7 rows split 4/3
    assert all(numel1[n] > 0 for n in numel1), f"an empty shard belongs to the other test: {numel1}"


def test_fsdp2_grouped_norms_match_the_unsharded_model(fsdp2_run):
    ranks, _ = fsdp2_run
    for rec in ranks:
        r = rec["rank"]
        ref = rec["reference"]
        # the two references agree with each other (same weights, same global batch)
        for name, want in ref["unsharded_module"].items():
            assert_close_rel(ref["full_tensor_module"][name], want, REL_FSDP, f"rank {r} full_tensor {name}")
        _check_against(rec["snapshot"]["module"], ref["unsharded_module"], f"rank {r} by module")
        _check_against(rec["snapshot"]["parameter"], ref["unsharded_parameter"], f"rank {r} by parameter")
        assert_close_rel(rec["snapshot"]["snapshot_total"], ref["unsharded_module"]["total"], REL_FSDP, "device total")
        assert rec["snapshot"]["snapshot_all_finite"]
    # every rank reports the very same numbers
    assert ranks[0]["snapshot"] == ranks[1]["snapshot"]


def test_fsdp2_scale_is_divided_out(fsdp2_run):
    ranks, _ = fsdp2_run
    for rec in ranks:
        ref = rec["reference"]["unsharded_module"]
        _check_against(rec["scaled"]["1024"], ref, f"rank {rec['rank']} scale=1024.0", divide_by=1024.0)
        _check_against(rec["scaled"]["tensor_0.25"], ref, f"rank {rec['rank']} scale=tensor(0.25)", divide_by=0.25)


def test_fsdp2_nonfinite_local_shard_is_reported_on_every_rank(fsdp2_run):
    ranks, _ = fsdp2_run
    cases = ranks[0]["nonfinite"]
    assert len(cases) == 2 * 7 * WORLD  # NaN and Inf, 7 parameters, each rank
    for case in cases:
        kind, pname, target = case.split(":")
        group = pname.rsplit(".", 1)[0]
        poked = [rec["nonfinite"][case]["poked_here"] for rec in ranks]
        assert poked == [target == f"rank{r}" for r in range(WORLD)], f"{case}: poked on {poked}"
        for rec in ranks:
            got = rec["nonfinite"][case]
            what = f"{case}, seen on rank {rec['rank']}"
            assert got["nonfinite_groups"] == [group], f"{what}: nonfinite_groups={got['nonfinite_groups']}"
            assert got["all_finite"] is False, what
            check = math.isnan if kind == "nan" else math.isinf
            assert check(got["total"]) and check(got["max_abs"]), f"{what}: total={got['total']} max={got['max_abs']}"
            assert check(got["groups"][group]), f"{what}: group norm {got['groups'][group]}"
            ref = rec["reference"]["unsharded_module"]
            for other, value in got["groups"].items():
                if other != group:
                    assert_close_rel(value, ref[other], REL_FSDP, f"{what}: untouched group {other}")


def test_fsdp2_empty_local_shard(tmp_path):
    """A parameter with fewer rows than ranks (here a (1, 5) weight and a (1,) bias on two
    ranks) leaves rank 1 with an empty local gradient; its contribution must count as zero."""
    _torchrun_style("fsdp2_snapshot.py", tmp_path, "--head-out", "1")
    ranks = [_load(tmp_path / f"rank{r}.json") for r in range(WORLD)]
    assert ranks[1]["local_numel"]["head.bias"] == 0
    for rec in ranks:
        _check_against(rec["snapshot"]["module"], rec["reference"]["unsharded_module"], f"rank {rec['rank']}")


# ======================================================================================
# Lightning ModelParallelStrategy (FSDP2 via configure_model) + GradientNormLogger
# ======================================================================================


@pytest.fixture(scope="module")
def model_parallel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_parallel")
    elapsed = _lightning_run("model_parallel_logger.py", out)
    return out, _load(out / "reference.json"), elapsed


def test_model_parallel_strategy_logged_norms_match_full_tensors(model_parallel_run):
    out, ref, _ = model_parallel_run
    assert ref["strategy"] == "ModelParallelStrategy" and ref["world_size"] == WORLD
    assert ref["grad_types"] == ["DTensor"], "the callback must have seen sharded gradients"
    files = _event_files(out)
    assert len(files) == 1, f"expected one event file (rank 0), found {files}"
    scalars = read_scalars(str(out / "tb"))
    steps = {int(s): rec for s, rec in ref["steps"].items()}
    assert sorted(steps) == list(range(4))
    checked = 0
    for step, rec in steps.items():
        for kind, tag_prefix, rel in (
            ("grad", "grad_norm", 1e-5),
            ("param", "param_norm", 1e-5),
            ("update_ratio", "update_ratio", 1e-4),
        ):
            for key, want in rec[kind].items():
                tag = f"{tag_prefix}/{key}"
                assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
                assert step in scalars[tag], f"{tag} has no value at step {step}"
                assert_close_rel(scalars[tag][step], want, rel, f"{tag}@{step}")
                checked += 1
    assert checked == 4 * (4 + 4 + 1)


# ======================================================================================
# DDP + VanishExplodeAlarm: a NaN on one rank only stops every rank at the same step
# ======================================================================================


def test_ddp_nan_on_one_rank_stops_both_ranks_at_the_same_step(tmp_path):
    elapsed = _lightning_run("ddp_alarm.py", tmp_path)
    ranks = [_load(tmp_path / f"rank{r}.json") for r in range(WORLD)]
    bad_step = 3
    for rec in ranks:
        assert rec["halted_at"] == bad_step, rec
        assert rec["global_step"] == bad_step + 1, rec  # stopped right after the bad batch
        assert rec["skipped_steps"] == 1 and rec["finite"], rec
        # the skipped step left the weights as they were after step bad_step - 1
        assert rec["final"] == rec["before_bad_step"]
    # rank 0's gradients were finite, yet it took the same decision; the weights agree
    assert ranks[0]["counts"]["nonfinite"] == ranks[1]["counts"]["nonfinite"] == 1
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[1]["dumps"] and ranks[1]["dumps"][0].endswith("_rank1.pt")
    assert elapsed < TIMEOUT_S


def test_ddp_nan_on_one_rank_keeps_clipper_state_and_weights_identical(tmp_path):
    """A NaN on rank 1 only, after the all-reduce, with AdaptiveClipper and halt_on_nan=False:
    both ranks skip the step, carry on, and keep the same statistics and weights."""
    _lightning_run("ddp_alarm.py", tmp_path, "carry-on")
    ranks = [_load(tmp_path / f"rank{r}.json") for r in range(WORLD)]
    for rec in ranks:
        assert rec["halted_at"] is None and rec["global_step"] == 12, rec
        assert rec["skipped_steps"] == 1 and rec["finite"], rec
        assert rec["counts"]["nonfinite"] == 1
        assert rec["clip_state"]["seen"] == 11, "the NaN step must not enter the statistics on any rank"
    assert ranks[0]["clip_state"] == ranks[1]["clip_state"], "the clipping statistics diverged across ranks"
    assert ranks[0]["final"] == ranks[1]["final"], "the weights diverged across ranks"
