"""Gradient-flow pictures: the bounded history, the PNGs, and the Images tab of a real run."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import loader, make_trainer, read_accumulator, read_scalars
from PIL import Image
from torch import nn

from lightning_gradguard import GradientNormLogger
from lightning_gradguard.flow import FlowHistory, heatmap_png, profile_png

# --------------------------------------------------------------------------------------
# the history buffer
# --------------------------------------------------------------------------------------


def test_history_memory_does_not_grow_with_the_run():
    history = FlowHistory(capacity=16)
    names = [f"l{i}" for i in range(5)]
    for step in range(0, 100_000, 10):
        history.add(step, names, [float(step + 1)] * 5)
    steps = history.steps
    assert 8 <= len(steps) <= 16 and history.matrix().shape == (5, len(steps))
    assert steps[0] == 0, "the start of the run stays in the picture"
    gaps = set(np.diff(steps).tolist())
    assert len(gaps) == 1, f"kept steps are evenly spaced, got gaps {sorted(gaps)}"
    assert steps[-1] >= 100_000 - 10 - gaps.pop(), "the kept steps reach the end of the run"
    assert history.latest_step == 99_990 and history.latest["l0"] == 99_991.0
    assert history._values.shape == (16, 5)  # the buffer itself never grows


def test_history_follows_new_and_reordered_layers():
    history = FlowHistory(capacity=8)
    history.add(0, ["b", "a"], [1.0, 10.0])  # registration order first
    history.add(1, ["a", "b"], [100.0, 0.0])  # then the forward order is known
    history.add(2, ["a", "b", "c"], [1000.0, None, float("nan")])  # c unfrozen; b without gradient
    assert history.names == ["a", "b", "c"]
    m = history.matrix()
    assert m[0].tolist() == [1.0, 2.0, 3.0]  # log10 of a's norms, moved with its name
    assert m[1, 0] == 0.0 and m[1, 1] == -math.inf and math.isnan(m[1, 2])  # b: 1, exactly 0, absent
    assert math.isnan(m[2, 0]) and math.isnan(m[2, 1]) and m[2, 2] == math.inf  # c: absent, absent, NaN norm
    restored = FlowHistory(capacity=8)
    restored.load_state_dict(history.state_dict())
    assert restored.names == history.names and restored.steps == history.steps
    np.testing.assert_array_equal(restored.matrix(), m)


def test_history_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity"):
        FlowHistory(capacity=1)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_pictures_of_a_vanishing_profile_are_pngs_of_a_readable_size():
    history = FlowHistory()
    names = [f"net.layers.{2 * i}" for i in range(20)]
    for step in range(9, 300, 10):
        history.add(step, names, [10.0 ** (-17 + 0.9 * i) for i in range(20)])
    history.extras["update_ratio"] = dict.fromkeys(names, 1e-3)
    heat, prof = _decode(heatmap_png(history)), _decode(profile_png(history))
    for image in (heat, prof):
        assert image.shape[0] >= 400 and image.shape[1] >= 1000, image.shape
        assert image.std() > 20, "a picture, not a blank page"
    # the heatmap's top row (input side, 1e-17) and bottom row (1e0) have different colours
    height, width = heat.shape[:2]
    x = int(width * 0.54)  # the middle of the image axes (0.2 to 0.88 of the width)
    top, bottom = heat[int(height * 0.08) + 4, x].astype(int), heat[int(height * 0.9) - 4, x].astype(int)
    assert top.sum() < 200 and bottom.sum() > 450, f"viridis: dark at 1e-17 {top}, bright at 1e0 {bottom}"


# --------------------------------------------------------------------------------------
# in a real Trainer.fit
# --------------------------------------------------------------------------------------


class DeepSigmoid(pl.LightningModule):
    """The textbook vanishing net (10 sigmoid layers), with a head registered before the body."""

    def __init__(self, depth: int = 10, nan_at: int | None = None):
        super().__init__()
        self.head = nn.Linear(16, 1)
        layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
        for _ in range(depth - 2):
            layers += [nn.Linear(16, 16), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x)), y)
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self):
        if self.global_step == self.nan_at:
            self.body[0].weight.grad[0, 0] = math.nan

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit_deep_sigmoid(tmp_path, **kwargs):
    cb = GradientNormLogger(flow_every_n_steps=10, log_param_norms=True, log_update_ratio=True)
    trainer = make_trainer(tmp_path, [cb], max_steps=30, log_every_n_steps=5, **kwargs)
    trainer.fit(DeepSigmoid(), loader(n=256))
    return trainer


def test_images_tab_gets_heatmap_and_profile_at_their_interval(tmp_path):
    trainer = _fit_deep_sigmoid(tmp_path)
    acc = read_accumulator(trainer.logger.log_dir)
    assert {"grad_flow/heatmap", "grad_flow/profile"} <= set(acc.Tags()["images"])
    for tag in ("grad_flow/heatmap", "grad_flow/profile"):
        events = acc.Images(tag)
        assert [e.step for e in events] == [9, 19, 29], "every 10 steps, on logging steps, the last once"
        image = _decode(events[-1].encoded_image_string)
        assert image.shape[:2] == (events[-1].height, events[-1].width)
        assert image.shape[0] >= 400 and image.shape[1] >= 1000
    # the Text tab lists the layers in the order they run: the body first, the head last
    text = acc.Tensors("gradguard/layers/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.index("`body.0`") < text.index("`body.16`") < text.index("`head`"), text


def test_scalars_hold_no_nan_or_inf_and_log10_keys_span_the_decades(tmp_path):
    trainer = _fit_deep_sigmoid(tmp_path)
    scalars = read_scalars(trainer.logger.log_dir)
    for tag, points in scalars.items():
        assert all(math.isfinite(v) for v in points.values()), f"{tag}: {points}"
    first, last = scalars["grad_norm_log10/first"], scalars["grad_norm_log10/last"]
    assert sorted(first) == sorted(scalars["train_loss"]) == [4, 9, 14, 19, 24, 29]
    assert all(last[s] - first[s] > 2 for s in first), "10 sigmoid layers: shallow gradients decades smaller"
    assert math.isclose(10 ** first[4], scalars["grad_norm/body.0"][4], rel_tol=1e-4)
    assert {"grad_norm_log10/middle", "update_ratio_log10/first", "update_ratio_log10/total"} <= set(scalars)


def test_a_nan_step_is_left_out_of_the_scalars_and_red_in_the_picture(tmp_path):
    cb = GradientNormLogger(flow_every_n_steps=100)
    trainer = make_trainer(tmp_path, [cb], max_steps=6, log_every_n_steps=1)
    trainer.fit(DeepSigmoid(nan_at=3), loader(n=256))
    scalars = read_scalars(trainer.logger.log_dir)
    assert 3 not in scalars["grad_norm/total"] and 3 not in scalars["grad_norm/body.0"]
    assert scalars["grad_norm/body.2"][3] > 0, "the finite layers of that step are logged"
    history = cb.flow_histories[""]
    column = history.steps.index(3)
    assert history.matrix()[history.names.index("body.0"), column] == math.inf  # drawn red


def test_without_matplotlib_the_pictures_say_once_that_they_are_off(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    cb = GradientNormLogger(flow_every_n_steps=5)
    with pytest.warns(UserWarning, match=r"pictures are off: matplotlib is not installed") as record:
        trainer = make_trainer(tmp_path, [cb], max_steps=12)
        trainer.fit(DeepSigmoid(), loader(n=256))
    assert sum("pictures are off" in str(w.message) for w in record) == 1
    assert "grad_flow/heatmap" not in read_accumulator(trainer.logger.log_dir).Tags()["images"]
    assert 11 in read_scalars(trainer.logger.log_dir)["grad_norm/total"]


def test_flow_arguments_are_checked():
    with pytest.raises(ValueError, match="flow_every_n_steps"):
        GradientNormLogger(flow_every_n_steps=0)
    with pytest.raises(ValueError, match="flow_history"):
        GradientNormLogger(flow_history=1)


def test_history_survives_a_checkpoint(tmp_path):
    cb = GradientNormLogger(flow_every_n_steps=100)
    trainer = make_trainer(tmp_path, [cb], max_steps=4)
    trainer.fit(DeepSigmoid(), loader(n=256))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    resumed = GradientNormLogger(flow_every_n_steps=100)
    trainer = make_trainer(tmp_path / "b", [resumed], max_steps=8)
    trainer.fit(DeepSigmoid(), loader(n=256), ckpt_path=str(path))
    assert resumed.flow_histories[""].steps == list(range(8)), "the picture covers the steps before the resume"


# --------------------------------------------------------------------------------------
# a real TensorBoard server
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.slow
def test_tensorboard_serves_the_pictures_the_text_and_drawable_scalars(tmp_path):
    trainer = _fit_deep_sigmoid(tmp_path)
    run = os.path.relpath(trainer.logger.log_dir, tmp_path)
    port = _free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1"),
            *("--port", str(port), "--load_fast", "false", "--reload_interval", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline, images = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                query = urllib.parse.urlencode({"tag": "grad_flow/heatmap", "run": run})
                images = json.loads(_get(f"{base}/images/images?{query}"))
                if len(images) == 3:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert [i["step"] for i in images] == [9, 19, 29], images
        png = _get(f"{base}/images/individualImage?{images[-1]['query']}")
        picture = _decode(png)
        assert picture.shape[0] >= 400 and picture.shape[1] >= 1000 and picture.std() > 20

        query = urllib.parse.urlencode({"tag": "gradguard/layers/text_summary", "run": run})
        text = json.loads(_get(f"{base}/text/text?{query}"))
        assert text and "body.0" in text[-1]["text"]

        tags = json.loads(_get(f"{base}/scalars/tags"))[run]
        assert "grad_norm_log10/first" in tags
        for tag in ("grad_norm/total", "grad_norm_log10/first", "update_ratio_log10/total"):
            query = urllib.parse.urlencode({"tag": tag, "run": run})
            points = json.loads(_get(f"{base}/scalars/scalars?{query}"))
            assert points and all(math.isfinite(value) for _, _, value in points), (tag, points)
    finally:
        server.terminate()
        server.wait(timeout=30)


class ManyLayers(pl.LightningModule):
    """80 small Linear layers in a row: more module groups than ``group_by="auto"`` logs."""

    def __init__(self, depth: int = 80) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = x
        for layer in self.body:
            h = h + 0.1 * torch.tanh(layer(h))  # residual: every layer gets a gradient
        return nn.functional.mse_loss(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("with_weights", [False, True], ids=["defaults", "weights-and-updates"])
def test_auto_default_logs_at_most_64_layers_and_the_pictures_keep_every_module(tmp_path, with_weights):
    from lightning_gradguard.stats import AUTO_MAX_GROUPS

    cb = GradientNormLogger(log_param_norms=with_weights, log_update_ratio=with_weights, flow_every_n_steps=4)
    assert cb.group_by == "auto"
    trainer = make_trainer(tmp_path, [cb], max_steps=4, log_every_n_steps=1)
    model = ManyLayers()
    trainer.fit(model, loader(n=64))
    scalars = read_scalars(trainer.logger.log_dir)
    layers = {t.split("/", 1)[1] for t in scalars if t.startswith("grad_norm/") and t != "grad_norm/total"}
    assert 16 <= len(layers) <= AUTO_MAX_GROUPS < 81, len(layers)
    history = cb.flow_histories[""]
    assert len(history.names) == 81 and history.names[0] == "body.0" and history.names[-1] == "head"
    # a merged group's logged norm is the norm of its modules' norms, which the picture holds
    merged = next(name for name in layers if name.startswith("body.0"))
    first, last = (int(part) for part in merged.removeprefix("body.").split("-"))
    column = history.matrix()[:, -1]
    members = [10.0 ** column[history.names.index(f"body.{i}")] for i in range(first, last + 1)]
    assert scalars[f"grad_norm/{merged}"][3] == pytest.approx(math.sqrt(sum(v * v for v in members)), rel=1e-4)
    assert "grad_flow/heatmap" in read_accumulator(trainer.logger.log_dir).Tags()["images"]
    if not with_weights:
        assert "param_norm" not in history.extras and "update_ratio" not in history.extras
        return
    # the profile's weight norms and update ratios are per module too: weights, not gradients
    weights, ratios = history.extras["param_norm"], history.extras["update_ratio"]
    assert list(weights) == list(history.names) == list(ratios)
    layer = model.body[0]
    now = math.sqrt(layer.weight.detach().pow(2).sum().item() + layer.bias.detach().pow(2).sum().item())
    assert weights["body.0"] == pytest.approx(now, rel=1e-2)  # before the last step: SGD moved it by ~1e-3
    assert weights["body.0"] != pytest.approx(10.0 ** column[0], rel=0.1)
    assert 1e-6 < ratios["body.0"] < 1e-1


def test_a_grouping_that_merges_by_itself_draws_what_it_logs(tmp_path):
    cb = GradientNormLogger(group_by="depth", group_depth=1, flow_every_n_steps=4)
    trainer = make_trainer(tmp_path, [cb], max_steps=4, log_every_n_steps=1)
    trainer.fit(ManyLayers(), loader(n=64))
    scalars = read_scalars(trainer.logger.log_dir)
    assert {"grad_norm/body", "grad_norm/head"} <= set(scalars) and "grad_norm/body.0" not in scalars
    assert cb.flow_histories[""].names == ["body", "head"]  # only "auto" draws finer than it logs


def test_module_grouping_draws_what_it_logs(tmp_path):
    cb = GradientNormLogger(group_by="module", flow_every_n_steps=4)
    trainer = make_trainer(tmp_path, [cb], max_steps=4, log_every_n_steps=1)
    trainer.fit(ManyLayers(), loader(n=64))
    scalars = read_scalars(trainer.logger.log_dir)
    assert sum(t.startswith("grad_norm/body.") for t in scalars) == 80
    assert len(cb.flow_histories[""].names) == 81


def test_a_checkpoint_of_the_old_module_default_resumes_its_pictures(tmp_path):
    """``group_by="auto"`` became the default: a checkpoint written with ``"module"`` still resumes the history."""
    cb = GradientNormLogger(group_by="module", flow_every_n_steps=100)
    trainer = make_trainer(tmp_path, [cb], max_steps=4)
    trainer.fit(DeepSigmoid(), loader(n=256))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    resumed = GradientNormLogger(flow_every_n_steps=100)
    assert resumed.state_key != cb.state_key and resumed._legacy_state_key == cb.state_key
    trainer = make_trainer(tmp_path / "b", [resumed], max_steps=8)
    trainer.fit(DeepSigmoid(), loader(n=256), ckpt_path=str(path))
    assert resumed.flow_histories[""].steps == list(range(8)), "the picture covers the steps before the resume"
