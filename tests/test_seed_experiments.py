"""examples/seed_experiments.py: the seeds' two experiments, checked on the event files it writes."""

from __future__ import annotations

import importlib.util
import io
import itertools
import os
import sys
from contextlib import redirect_stdout

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytest.importorskip("matplotlib")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "seed_experiments.py")
LENGTHS = (10, 20, 50)


def _load_example():
    spec = importlib.util.spec_from_file_location("seed_experiments", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _accumulator(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _last(acc: EventAccumulator, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("seeds"))
    out = io.StringIO()
    with redirect_stdout(out):
        _load_example().main(["--logdir", logdir, "--steps", "4", "--lengths", *map(str, LENGTHS)])
    return logdir, out.getvalue()


def test_sigmoid_without_residual_vanishes_and_residual_relu_does_not(logs):
    logdir, _ = logs
    sigmoid = _accumulator(os.path.join(logdir, "depth", "sigmoid_plain"))
    first, last = _last(sigmoid, "grad_norm/net.stem"), _last(sigmoid, "grad_norm/net.head")
    assert 0 < first < 1e-8 * last, f"sigmoid, plain: first layer {first:.2e}, last {last:.2e}"

    relu = _accumulator(os.path.join(logdir, "depth", "relu_residual"))
    first, last = _last(relu, "grad_norm/net.stem"), _last(relu, "grad_norm/net.head")
    assert first > 1e-2 * last, f"relu, residual: first layer {first:.2e}, last {last:.2e}"
    # the alarm agrees: it called the plain sigmoid net's gradients vanishing, and not the residual ReLU net's
    assert "alarm/findings/text_summary" in sigmoid.Tags()["tensors"]
    text = sigmoid.Tensors("alarm/findings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "vanishing" in text and "net.stem" in text
    tag = "alarm/findings/text_summary"
    findings = relu.Tensors(tag) if tag in relu.Tags()["tensors"] else []
    assert not any("vanishing" in f.tensor_proto.string_val[0].decode() for f in findings)


def test_rnn_input_side_gradient_shrinks_with_sequence_length(logs):
    logdir, _ = logs
    early = [_last(_accumulator(os.path.join(logdir, "length", f"T{t:03d}")), "grad_norm/net.early") for t in LENGTHS]
    recent = [_last(_accumulator(os.path.join(logdir, "length", f"T{t:03d}")), "grad_norm/net.recent") for t in LENGTHS]
    assert all(a > b for a, b in itertools.pairwise(early)), f"net.early by length {LENGTHS}: {early}"
    assert early[-1] < 1e-4 * early[0], f"net.early by length {LENGTHS}: {early}"
    # the other steps' encoder is not what shrinks: the decay is the distance to the loss
    assert min(recent) > 0.1 * max(recent), f"net.recent by length {LENGTHS}: {recent}"


def test_pictures_and_numbers_in_tensorboard(logs):
    logdir, printed = logs
    for run in ("depth/sigmoid_plain", "depth/relu_residual", f"length/T{LENGTHS[-1]:03d}"):
        tags = _accumulator(os.path.join(logdir, *run.split("/"))).Tags()["images"]
        assert {"grad_flow/heatmap", "grad_flow/profile"} <= set(tags), f"{run}: {tags}"
    summary = _accumulator(os.path.join(logdir, "summary"))
    assert {"seeds/gradient_vs_depth", "seeds/gradient_vs_length"} <= set(summary.Tags()["images"])
    for tag in ("seeds/gradient_vs_depth", "seeds/gradient_vs_length"):
        image = summary.Images(tag)[-1]
        assert image.encoded_image_string.startswith(b"\x89PNG") and image.width >= 400 and image.height >= 300
    table = summary.Tensors("seeds/numbers/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "sigmoid_plain" in table and "net.early" in table
    assert f"tensorboard --logdir {logdir}" in printed
    assert "sigmoid_plain" in printed and "recent/early" in printed
