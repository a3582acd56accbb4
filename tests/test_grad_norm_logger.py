"""GradientNormLogger under real Trainer.fit runs, read back from TensorBoard / CSV."""

from __future__ import annotations

import csv
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    RecordingMLP,
    SelfUnscalingSGD,
    assert_close_rel,
    fp16_cpu_plugin,
    loader,
    make_trainer,
    read_accumulator,
    read_scalars,
)

from lightning_gradguard import AdaptiveClipper, GradientNormLogger
from lightning_gradguard.callbacks._base import GradGuardCallback


def _check_against_reference(scalars, reference, rel, prefix="grad_norm"):
    assert reference, "the reference recorder saw no step"
    checked = 0
    for step, norms in reference.items():
        for key, want in norms.items():
            tag = f"{prefix}/{key}"
            if not math.isfinite(want):  # TensorBoard cannot draw it: not logged
                assert step not in scalars.get(tag, {}), f"{tag}@{step}: a non-finite value was logged"
                continue
            assert tag in scalars, f"{tag} missing; logged tags: {sorted(scalars)}"
            assert step in scalars[tag], f"{tag} has no value at step {step}: {sorted(scalars[tag])}"
            assert_close_rel(scalars[tag][step], want, rel, f"{tag}@{step}")
            checked += 1
    return checked


def test_fp32_norms_match_vector_norm(tmp_path):
    model = RecordingMLP()
    trainer = make_trainer(tmp_path, [GradientNormLogger()], max_steps=10)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    checked = _check_against_reference(scalars, model.reference["step"], 1e-4)
    assert checked == 10 * 5  # 10 steps x (total + 4 Linear layers)
    # names follow module registration order; Tanh has no parameters
    assert {t for t in scalars if t.startswith("grad_norm/")} == {
        "grad_norm/total",
        "grad_norm/net.0",
        "grad_norm/net.2",
        "grad_norm/net.4",
        "grad_norm/net.6",
    }


@pytest.mark.parametrize("accumulate", [1, 2])
def test_default_interval_follows_trainer(tmp_path, accumulate):
    model = RecordingMLP()
    trainer = make_trainer(
        tmp_path, [GradientNormLogger()], max_steps=16, log_every_n_steps=5, accumulate_grad_batches=accumulate
    )
    trainer.fit(model, loader(n=256))
    scalars = read_scalars(trainer.logger.log_dir)
    # Lightning's own cadence: (step + 1) % 5 == 0, the steps of the model's self.log("train_loss")
    assert sorted(scalars["grad_norm/total"]) == [4, 9, 14]
    assert sorted(scalars["grad_norm/total"]) == sorted(scalars["train_loss"])


def test_own_interval_and_grouping_options(tmp_path):
    model = RecordingMLP()
    cb = GradientNormLogger(log_every_n_steps=4, group_by="parameter", log_max_abs=True)
    trainer = make_trainer(tmp_path, [cb], max_steps=9, log_every_n_steps=1)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/total"]) == [3, 7]
    assert "grad_norm/net.0.weight" in scalars and "grad_norm/net.0.bias" in scalars
    assert "grad_max_abs/total" in scalars
    assert all(v > 0 for v in scalars["grad_max_abs/total"].values())


def test_csv_logger_gets_the_same_keys(tmp_path):
    model = RecordingMLP()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [GradientNormLogger()], logger=logger, max_steps=6)
    trainer.fit(model, loader())
    path = os.path.join(logger.log_dir, "metrics.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    logged = {int(r["step"]): float(r["grad_norm/total"]) for r in rows if r.get("grad_norm/total")}
    assert sorted(logged) == list(range(6))
    for step, norms in model.reference["step"].items():
        assert_close_rel(logged[step], norms["total"], 1e-4, f"csv total@{step}")
    assert "grad_norm/net.6" in rows[0]


@pytest.mark.parametrize("hook", ["on_before_optimizer_step", "on_after_backward"])
def test_fp16_gradscaler_norms_are_unscaled(tmp_path, hook):
    model = RecordingMLP()
    trainer = make_trainer(tmp_path, [GradientNormLogger(hook=hook)], max_steps=8, plugins=[fp16_cpu_plugin()])
    trainer.fit(model, loader())
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() > 1000  # the gradients really were scaled
    scalars = read_scalars(trainer.logger.log_dir)
    if hook == "on_before_optimizer_step":
        _check_against_reference(scalars, model.reference["step"], 1e-3)
    else:
        first = {}
        for step, norms in model.backward_records:
            first.setdefault(step, norms)
        _check_against_reference(scalars, first, 1e-3, prefix="grad_norm_microbatch")


def test_fp16_optimizer_that_unscales_itself(tmp_path):
    model = RecordingMLP(optimizer_cls=SelfUnscalingSGD)
    trainer = make_trainer(tmp_path, [GradientNormLogger()], max_steps=8, plugins=[fp16_cpu_plugin()])
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    _check_against_reference(scalars, model.reference["step"], 1e-3)
    # the optimizer saw scaled gradients (norms in the thousands); we logged unscaled ones
    finite = [v for v in scalars["grad_norm/total"].values() if v == v and v != float("inf")]
    assert len(finite) >= 5 and max(finite) < 1e3


def test_gradient_accumulation_logs_accumulated_norm_once_per_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = RecordingMLP()
    cb = GradientNormLogger()
    trainer = make_trainer(tmp_path, [cb], max_steps=4, accumulate_grad_batches=2)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(scalars["grad_norm/total"]) == [0, 1, 2, 3]
    _check_against_reference(scalars, model.reference["step"], 1e-4)
    # on_after_backward ran for each of the 8 micro-batches; the logged value is the
    # accumulated gradient of the step, i.e. the last micro-batch's record, not the first's
    assert len(model.backward_records) == 8
    differ = 0
    for step in range(4):
        first, last = model.backward_records[2 * step][1], model.backward_records[2 * step + 1][1]
        assert_close_rel(scalars["grad_norm/total"][step], last["total"], 1e-4, f"accumulated@{step}")
        differ += abs(first["total"] - last["total"]) > 1e-2 * last["total"]
    assert differ >= 2  # so matching the accumulated value is not matching the first micro-batch


class TwoOptimizerModel(RecordingMLP):
    """Manual optimisation with two optimizers over disjoint parameters (GAN-like)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.per_opt_reference: dict[tuple[int, int], float] = {}

    def configure_optimizers(self):
        first = list(self.net[0].parameters()) + list(self.net[2].parameters())
        second = list(self.net[4].parameters()) + list(self.net[6].parameters())
        return torch.optim.SGD(first, lr=0.05), torch.optim.Adam(second, lr=0.01)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for i, opt in enumerate((opt_a, opt_b)):
            loss = torch.nn.functional.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            params = [p for g in opt.optimizer.param_groups for p in g["params"]]
            self.per_opt_reference[(self.trainer.global_step, i)] = torch.linalg.vector_norm(
                torch.cat([p.grad.flatten() for p in params])
            ).item()
            opt.step()

    def on_before_optimizer_step(self, optimizer):
        pass


def test_several_optimizers_each_sees_only_its_parameters(tmp_path):
    model = TwoOptimizerModel()
    trainer = make_trainer(tmp_path, [GradientNormLogger()], max_steps=6)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    # both optimizers step in each batch: their points share the batch's step, as self.log's do
    # (global_step counts optimizer steps: 0 and 1 in the first batch)
    assert set(scalars["grad_norm/opt0/total"]) == set(scalars["grad_norm/opt1/total"]) == {0, 1, 2}
    assert "grad_norm/opt0/net.0" in scalars and "grad_norm/opt0/net.4" not in scalars
    assert "grad_norm/opt1/net.6" in scalars and "grad_norm/opt1/net.2" not in scalars
    for (global_step, i), want in model.per_opt_reference.items():
        step = global_step // 2
        assert_close_rel(scalars[f"grad_norm/opt{i}/total"][step], want, 1e-4, f"opt{i}@{step}")


def test_param_norms_and_update_ratio(tmp_path):
    class Recorder(RecordingMLP):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            self._before = {n: p.detach().clone() for n, p in self.named_parameters()}

        def on_train_batch_end(self, *args):
            before = torch.cat([v.flatten() for v in self._before.values()])
            after = torch.cat([p.detach().flatten() for p in self.parameters()])
            self.reference["ratio"][self.trainer.global_step - 1] = {
                "total": (torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)).item()
            }
            self.reference["param"][self.trainer.global_step - 1] = {
                "total": torch.linalg.vector_norm(before).item(),
                "net.0": torch.linalg.vector_norm(
                    torch.cat([self._before["net.0.weight"].flatten(), self._before["net.0.bias"]])
                ).item(),
            }

    model = Recorder()
    cb = GradientNormLogger(log_param_norms=True, log_update_ratio=True)
    trainer = make_trainer(tmp_path, [cb], max_steps=5)
    trainer.fit(model, loader())
    scalars = read_scalars(trainer.logger.log_dir)
    _check_against_reference(scalars, model.reference["param"], 1e-4, prefix="param_norm")
    _check_against_reference(scalars, model.reference["ratio"], 1e-3, prefix="update_ratio")
    assert "update_ratio/net.6" in scalars


def test_histograms_and_custom_scalars_layout(tmp_path):
    model = RecordingMLP()
    cb = GradientNormLogger(histogram_every_n_steps=3)
    trainer = make_trainer(tmp_path, [cb], max_steps=7)
    trainer.fit(model, loader())
    acc = read_accumulator(trainer.logger.log_dir)
    hist_tags = acc.Tags()["histograms"]
    assert "grad_hist/net.0" in hist_tags
    assert [e.step for e in acc.Histograms("grad_hist/net.0")] == [2, 5]
    # The custom-scalars layout is stored as a tensor summary that names our charts.
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    titles = [chart.title for cat in layout.category for chart in cat.chart]
    assert titles == [
        "gradient norm, total",
        "log10 gradient norm: first, middle, last layer (names in the Text tab)",
    ]


def test_custom_scalars_layout_holds_the_other_callbacks_charts(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    trainer = make_trainer(tmp_path, [AdaptiveClipper(), GradientNormLogger()], max_steps=3)
    trainer.fit(RecordingMLP(), loader())
    acc = read_accumulator(trainer.logger.log_dir)
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {chart.title: chart for cat in layout.category for chart in cat.chart}
    clip = charts["clipping: threshold vs pre-clip norm"]  # the clipper's own chart, written by the logger
    assert list(clip.multiline.tag) == [r"^clip/(opt\d+/)?(threshold|pre_norm)$"]
    assert "clip/threshold" in acc.Tags()["scalars"] and "clip/pre_norm" in acc.Tags()["scalars"]


class SnapshotProbe(GradGuardCallback):
    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(self._snapshot(trainer, pl_module, "step", optimizer))


def test_snapshot_is_shared_whatever_the_callback_order(tmp_path):
    first, second = SnapshotProbe(), SnapshotProbe()
    model = RecordingMLP()
    trainer = make_trainer(tmp_path, [first, GradientNormLogger(), second], max_steps=5)
    trainer.fit(model, loader())
    assert len(first.seen) == len(second.seen) == 5
    for a, b in zip(first.seen, second.seen):
        assert a is b
    assert len({id(s) for s in first.seen}) == 5  # a new snapshot every step


def test_no_logger_warns(tmp_path):
    with pytest.warns(UserWarning, match="no logger"):
        trainer = make_trainer(tmp_path, [GradientNormLogger()], logger=False, max_steps=2)
        trainer.fit(RecordingMLP(), loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps"),
        ({"hook": "on_step"}, "hook"),
        ({"group_by": "layer"}, "group_by"),
        ({"group_by": "depth"}, "group_depth"),
        ({"group_depth": 2}, "group_depth"),
        ({"group_by": "pattern"}, "group_patterns"),
        ({"group_by": "pattern", "group_patterns": {"x": "("}}, r"`group_patterns` entry 'x'"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps"),
        ({"per_layer": "yes"}, "per_layer"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNormLogger(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        GradientNormLogger(10)  # type: ignore[misc]


def test_logged_max_abs_is_pre_clip_when_a_clipper_runs_first(tmp_path, recwarn):
    """Snapshots compute max |g| lazily; a logger that reads it after a clipper must still see pre-clip values."""

    class PreClipMax(RecordingMLP):
        def __init__(self) -> None:
            super().__init__()
            self.pre_clip: dict[int, float] = {}

        def on_after_backward(self) -> None:  # before on_before_optimizer_step, where the clipper scales
            grads = [p.grad.detach().abs().max() for p in self.parameters() if p.grad is not None]
            self.pre_clip[self.trainer.global_step] = torch.stack(grads).max().item()

    model = PreClipMax()
    clipper = AdaptiveClipper(mode="norm", max_norm=1e-4)  # clips every step, hard
    logger_cb = GradientNormLogger(log_max_abs=True, log_every_n_steps=10)
    trainer = make_trainer(tmp_path, [clipper, logger_cb], max_steps=20)
    trainer.fit(model, loader())
    logged = read_scalars(trainer.logger.log_dir)["grad_max_abs/total"]
    assert sorted(logged) == [9, 19]  # past the first snapshots, where max |g| is always computed up front
    for step, value in logged.items():
        assert value == pytest.approx(model.pre_clip[step], rel=1e-6), f"step {step}: post-clip value logged"
        assert value > 1e-3  # the clipped gradients' max would be below max_norm=1e-4
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning) and "max" in str(w.message)]
