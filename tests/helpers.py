"""Small models, trainers and readers shared by the tests (importable by subprocess scripts too)."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 64, d: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class RecordingMLP(pl.LightningModule):
    """An MLP that records, independently of gradguard, the true gradient norms.

    ``self.reference[phase][step]`` holds ``{"total": ..., "<module>": ...}`` computed
    with ``torch.linalg.vector_norm`` on each ``.grad``, divided by the scale where the
    gradients are known to be still scaled. Module hooks run after the callbacks', so the
    gradients are exactly those the callbacks saw.
    """

    def __init__(self, d: int = 8, hidden: int = 16, depth: int = 3, lr: float = 0.05, optimizer_cls=None):
        super().__init__()
        layers: list[nn.Module] = []
        width = d
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.optimizer_cls = optimizer_cls or torch.optim.SGD
        self.reference: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
        self.backward_records: list[tuple[int, dict[str, float]]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), lr=self.lr)

    def _true_norms(self, divide_by: float = 1.0) -> dict[str, float]:
        if all(p.grad is None for p in self.parameters()):
            return {}  # a gradguard callback dropped this step's gradients
        groups: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, p in self.named_parameters():
            if p.grad is not None:
                groups[name.rsplit(".", 1)[0]].append(p.grad.detach().double() / divide_by)
        out = {k: torch.linalg.vector_norm(torch.cat([t.flatten() for t in v])).item() for k, v in groups.items()}
        out["total"] = torch.linalg.vector_norm(
            torch.cat([p.grad.detach().double().flatten() / divide_by for p in self.parameters() if p.grad is not None])
        ).item()
        return out

    def _scale_if(self, scaled: bool) -> float:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if (scaled and scaler is not None) else 1.0

    def on_after_backward(self):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        norms = self._true_norms(self._scale_if(scaler is not None))
        self.backward_records.append((self.trainer.global_step, norms))

    def on_before_optimizer_step(self, optimizer):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        still_scaled = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        norms = self._true_norms(self._scale_if(still_scaled))
        if norms:
            self.reference["step"][self.trainer.global_step] = norms


class SelfUnscalingSGD(torch.optim.Optimizer):
    """Plain SGD that declares it handles AMP scaling itself, as fused optimizers do.

    ``GradScaler.step`` then skips ``unscale_`` and hands it ``grad_scale``/``found_inf``.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() > 0:
            return None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad if grad_scale is None else p.grad / grad_scale
                    p.add_(g, alpha=-group["lr"])
        return None


def fp16_cpu_plugin() -> MixedPrecision:
    """Real fp16 autocast + GradScaler on CPU (plain precision='16-mixed' becomes bf16 on CPU)."""
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))


def make_trainer(tmp_path, callbacks, *, logger=None, **kwargs) -> pl.Trainer:
    if logger is None:
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=12,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        deterministic=True,
        default_root_dir=str(tmp_path),  # crash dumps of logger-less runs land here, not in the working directory
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(batch_size: int = 8, **kw) -> DataLoader:
    return DataLoader(regression_data(**kw), batch_size=batch_size, shuffle=False)


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """All scalars of every event file under ``log_dir``: tag -> {step: value}."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {log_dir}"
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                out[tag][ev.step] = ev.value
    return dict(out)


def read_accumulator(log_dir: str) -> EventAccumulator:
    files = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))
    assert files, f"no TensorBoard event file under {log_dir}"
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_close_rel(got: float, want: float, rel: float, what: str = "") -> None:
    import math

    if not math.isfinite(want):
        assert not math.isfinite(got), f"{what}: got {got!r}, want a non-finite value ({want!r})"
        return
    denom = max(abs(want), 1e-30)
    err = abs(got - want) / denom
    assert err <= rel, f"{what}: got {got!r}, want {want!r} (rel. error {err:.2e} > {rel:.0e})"


class CLIModel(RecordingMLP):
    """RecordingMLP with its own dataloader, for LightningCLI tests."""

    def __init__(self, hidden: int = 16, depth: int = 3, lr: float = 0.05):
        super().__init__(hidden=hidden, depth=depth, lr=lr)

    def train_dataloader(self):
        return loader()


def poisoned_loader(bad_batch: int, batch_size: int = 8, value: float = float("nan"), **kw) -> DataLoader:
    """Like :func:`loader`, with ``value`` written into the first sample of batch ``bad_batch``."""
    data = regression_data(**kw)
    x, y = data.tensors
    x = x.clone()
    x[bad_batch * batch_size, 0] = value
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class WeightHistory(pl.Callback):
    """Records a copy of every parameter after each training batch: ``history[global_step]``."""

    def __init__(self):
        self.history: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
