"""AdaptiveClipper's skip decided on the device (fused optimizers, issue 12 item 3), and _device_skip itself.

A torch fused optimizer skips its step exactly when ``found_inf`` is set: the clipper's
``skip_factor`` verdict then never leaves the device. These runs compare that path with
the host path (the same model with a plain optimizer) and count the host reads.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import fp16_cpu_plugin, loader, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from test_adaptive_clipper import EventMLP, Probe, clip_scalars
from test_clipper_defaults import _refusal_warnings, _shifted

from lightning_gradguard.callbacks import _device_skip
from lightning_gradguard.callbacks._device_skip import accepts_device_skip, skip_on_device
from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper, _any_rank

SPIKE = 1000.0
FUSED = functools.partial(torch.optim.AdamW, fused=True)
PLAIN = torch.optim.AdamW
#: skips at 6 and 8 (the NaN step between them neither extends nor ends the streak), 9 refused
#: (skip_limit=2), 13 skipped again after the streak ended
EVENTS = {6: SPIKE, 7: math.nan, 8: SPIKE, 9: SPIKE, 13: SPIKE}
SKIP = dict(warmup_steps=4, skip_factor=5.0, skip_limit=2, max_norm=math.inf)


class OptimizerHistory(pl.Callback):
    """Copies of the weights and of the AdamW state after every step: ``history[global_step]``.

    Also records, right after each step, whether a ``found_inf`` attribute outlived it.
    """

    def __init__(self) -> None:
        self.history: dict[int, dict[str, torch.Tensor]] = {}
        self.leftover_flags: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        optimizer = trainer.optimizers[0]
        copies = {f"w{i}": p.detach().clone() for i, p in enumerate(pl_module.parameters())}
        for i, p in enumerate(pl_module.parameters()):
            for name, value in optimizer.state.get(p, {}).items():
                copies[f"{name}{i}"] = value.detach().clone()
        self.history[trainer.global_step - 1] = copies
        if "found_inf" in optimizer.__dict__:
            self.leftover_flags.append(trainer.global_step - 1)


def _fit(tmp_path, optimizer_cls, events=EVENTS, steps=16, **kwargs):
    pl.seed_everything(0)
    clipper = AdaptiveClipper(**{**SKIP, **kwargs})
    history = OptimizerHistory()
    model = EventMLP(events=events, guard=True, optimizer_cls=optimizer_cls, lr=0.01)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [clipper, history], max_steps=steps)
        trainer.fit(model, loader())
    return clipper, history, clip_scalars(trainer), _refusal_warnings(record)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------
# a skipped step is exact, and the device path decides as the host path does
# --------------------------------------------------------------------------------------


def test_a_skipped_step_leaves_weights_and_optimizer_state_exactly_as_they_were(tmp_path):
    clipper, history, s, _ = _fit(tmp_path, FUSED)
    h = history.history
    assert clipper.skipped_steps == 3 and clipper.skips_refused == 1
    for skipped in (6, 8, 13):
        assert s["clip/coef"][skipped] == 0.0 and s["clip/post_norm"][skipped] == 0.0
        assert _same(h[skipped], h[skipped - 1]), f"step {skipped} changed the weights or the AdamW state"
        assert h[skipped]["step0"].item() == h[skipped - 1]["step0"].item()
    assert _same(h[7], h[6]), "the NaN step's gradients were dropped (EventMLP's guard)"
    for moved in (5, 9, 10, 14, 15):  # training continues: a refused outlier is clipped and applied
        assert not torch.equal(h[moved]["w0"], h[moved - 1]["w0"]), f"step {moved} did not update"
        assert h[moved]["step0"].item() == h[moved - 1]["step0"].item() + 1
    assert history.leftover_flags == [], "found_inf must not outlive the step it was set for"


def test_the_device_path_decides_as_the_host_path(tmp_path):
    device, _, on_device, device_warnings = _fit(tmp_path / "fused", FUSED)
    host, _, on_host, host_warnings = _fit(tmp_path / "plain", PLAIN)
    assert [k for k in on_device if on_device[k]] == [k for k in on_host if on_host[k]]
    skipped = [step for step, coef in sorted(on_device["clip/coef"].items()) if coef == 0.0]
    assert skipped == [step for step, coef in sorted(on_host["clip/coef"].items()) if coef == 0.0] == [6, 8, 13]
    for tag in on_host:
        assert sorted(on_device[tag]) == sorted(on_host[tag]), tag
        for step, want in on_host[tag].items():
            assert on_device[tag][step] == pytest.approx(want, rel=1e-4, abs=1e-7, nan_ok=True), f"{tag}@{step}"
    assert (device.skipped_steps, device.skips_refused) == (host.skipped_steps, host.skips_refused) == (3, 1)
    assert device.threshold_rule(0).seen.item() == host.threshold_rule(0).seen.item() == 16 - 4
    assert len(device_warnings) == len(host_warnings) == 1
    assert "from global step 9 " in device_warnings[0] and "from global step 9 " in host_warnings[0]
    assert device.last_decision() == pytest.approx(host.last_decision(), rel=1e-4)


def test_no_host_read_on_steps_that_do_not_log(tmp_path):
    """Device path: the one copy of a logging step only. Host path: one more on every step."""
    for name, optimizer_cls, per_step in (("fused", FUSED, 0), ("plain", PLAIN, 1)):
        probe = Probe(log_every_n_steps=4, mode="zscore", warmup_steps=2, skip_factor=4.0)
        model = EventMLP(events={5: SPIKE}, optimizer_cls=optimizer_cls)
        trainer = make_trainer(tmp_path / name, [probe], max_steps=9)
        trainer.fit(model, loader())
        assert probe.skipped_steps == 1
        for step, syncs in probe.syncs.items():
            want = per_step + (1 if (step + 1) % 4 == 0 else 0)  # logging steps: 3, 7
            assert syncs == want, f"{name}: step {step}: {syncs} host reads, expected {want}"


# --------------------------------------------------------------------------------------
# skip_limit, the refusal warning and checkpoints on the device path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("logged", [True, False], ids=["logger", "no-logger"])
def test_skip_limit_holds_on_the_device(tmp_path, logged):
    """A new regime: two steps skipped, the rest clipped, one warning (at the end of training without a logger)."""
    clipper = AdaptiveClipper(**SKIP)
    model = _shifted(14)
    model.optimizer_cls = FUSED
    history = OptimizerHistory()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [clipper, history], max_steps=14, logger=None if logged else False)
        trainer.fit(model, loader())
    h = history.history
    skipped = [step for step in range(1, 14) if _same(h[step], h[step - 1])]
    assert skipped == [6, 7]
    assert clipper.skipped_steps == 2 and clipper.skips_refused == 14 - 6 - 2
    messages = _refusal_warnings(record)
    assert len(messages) == 1 and "skip_limit=2" in messages[0] and "from global step 8 " in messages[0]
    if logged:
        s = clip_scalars(trainer)
        assert s["clip/skipped_steps"][13] == 2 and s["clip/skips_refused"][13] == 6
        for step in range(8, 14):  # refused steps are clipped to the threshold
            assert model.reference["step"][step]["total"] == pytest.approx(s["clip/threshold"][step], rel=1e-4)


def test_checkpoints_hold_ints_and_resume_a_streak(tmp_path):
    kwargs = dict(SKIP, skip_limit=3)
    total, cut = 14, 8  # the checkpoint after step 7: two skips of the streak done, one left
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=cut, save_top_k=-1)
    pl.seed_everything(0)
    full_clipper = AdaptiveClipper(**kwargs)
    model = _shifted(total)
    model.optimizer_cls = FUSED
    trainer = make_trainer(tmp_path / "a", [full_clipper, ckpt], max_steps=total, enable_checkpointing=True)
    trainer.fit(model, loader())
    full = clip_scalars(trainer)
    path = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={cut}" in p.name)
    saved = torch.load(path, weights_only=False)["callbacks"][full_clipper.state_key]["optimizers"][0]
    assert saved == {
        "steps": 8,
        "skipped_steps": 2,
        "over_streak": 2,
        "skips_refused": 0,
        "interval_steps": 0,
        "interval_clipped": 0,
    }
    assert all(type(v) is int for v in full_clipper.state_dict()["optimizers"][0].values())

    pl.seed_everything(0)
    resumed_clipper = AdaptiveClipper(**kwargs)
    model = _shifted(total)
    model.optimizer_cls = FUSED
    trainer = make_trainer(tmp_path / "b", [resumed_clipper], max_steps=total)
    trainer.fit(model, loader(), ckpt_path=str(path))
    resumed = clip_scalars(trainer)
    for tag in ("clip/threshold", "clip/pre_norm", "clip/coef", "clip/skipped_steps", "clip/skips_refused"):
        for step in range(cut, total):
            assert resumed[tag][step] == full[tag][step], f"{tag}@{step}"
    assert [full["clip/coef"][i] == 0.0 for i in range(6, 10)] == [True, True, True, False]
    assert resumed_clipper.skipped_steps == full_clipper.skipped_steps == 3


# --------------------------------------------------------------------------------------
# _device_skip, and where the device path does not apply
# --------------------------------------------------------------------------------------


def _adamw(fused: bool = True) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=fused)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # state exists from here on
    return optimizer, params


def _state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {f"w{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        out.update({f"{k}{i}": v.clone() for k, v in optimizer.state[p].items()})
    return out


def test_flags_are_ored_and_removed_after_the_step():
    optimizer, params = _adamw()
    before = _state(optimizer, params)
    skip_on_device(optimizer, torch.tensor(False))
    skip_on_device(optimizer, torch.tensor(True))
    skip_on_device(optimizer, torch.tensor(False))
    assert optimizer.found_inf.item() == 1.0, "one true flag is enough"
    optimizer.step()
    assert _same(_state(optimizer, params), before)
    assert "found_inf" not in optimizer.__dict__ and _device_skip._PENDING not in optimizer.__dict__

    skip_on_device(optimizer, torch.tensor(False))
    skip_on_device(optimizer, torch.tensor(False))
    optimizer.step()
    after = _state(optimizer, params)
    assert not torch.equal(after["w0"], before["w0"]) and after["step0"].item() == before["step0"].item() + 1
    assert "found_inf" not in optimizer.__dict__
    optimizer.step()  # no flag: a plain step
    assert _state(optimizer, params)["step0"].item() == before["step0"].item() + 2


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_flagged_step_with_nonfinite_gradients_changes_nothing(bad):
    optimizer, params = _adamw()
    before = _state(optimizer, params)
    params[0].grad[0, 0] = bad
    skip_on_device(optimizer, torch.tensor(True))
    optimizer.step()
    assert _same(_state(optimizer, params), before)


def test_only_fused_optimizers_without_a_scaler_accept_a_device_skip(tmp_path):
    plain = make_trainer(tmp_path, [], logger=False)
    fp16 = make_trainer(tmp_path, [], logger=False, plugins=[fp16_cpu_plugin()])
    fused, _ = _adamw(fused=True)
    unfused, _ = _adamw(fused=False)
    assert accepts_device_skip(plain, fused)
    assert not accepts_device_skip(plain, unfused)
    assert not accepts_device_skip(fp16, fused), "the GradScaler owns found_inf"


def _fp16_fit(tmp_path, events):
    # a small loss scale, so that the 1000x spike is an outlier rather than an fp16 overflow
    precision = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=16.0))
    probe = Probe(warmup_steps=4, skip_factor=5.0)
    model = EventMLP(events=events, optimizer_cls=FUSED, lr=0.01)
    history = OptimizerHistory()
    trainer = make_trainer(tmp_path, [probe, history], max_steps=10, plugins=[precision])
    trainer.fit(model, loader())
    return probe, history, trainer


def test_under_a_grad_scaler_a_fused_optimizer_takes_the_host_path(tmp_path):
    """The scaler owns ``found_inf``: the clipper reads its verdict on the host, as with any other optimizer."""
    probe, history, trainer = _fp16_fit(tmp_path, {})
    assert probe.skipped_steps == 0 and isinstance(probe._opt[0].skipped_steps, int), "the host path counts"
    assert probe.syncs == {step: 2 for step in range(10)}, "one read per step, one more to log (every step)"
    assert all(not torch.equal(history.history[s]["w0"], history.history[s - 1]["w0"]) for s in range(1, 10))
    assert trainer.precision_plugin.scaler.get_scale() == 16.0


def test_under_a_grad_scaler_a_fused_optimizer_skips_on_the_host_path(tmp_path):
    # dropping the gradients would leave GradScaler.step no overflow check to record and
    # GradScaler.update would raise: fused optimizers are skipped through found_inf instead
    probe, history, trainer = _fp16_fit(tmp_path, {6: SPIKE})
    assert probe.skipped_steps == 1
    assert _same(history.history[6], history.history[5])
    assert not _same(history.history[7], history.history[6])  # training goes on
    assert trainer.precision_plugin.scaler.get_scale() == 16.0, "a step we skip does not back the scale off"
    assert "found_inf" not in vars(trainer.optimizers[0])


def test_any_rank_is_the_flag_itself_outside_torch_distributed():
    assert not torch.distributed.is_initialized()
    flag = torch.tensor(True)
    assert _any_rank(flag) is flag


def _vote(rank: int, world: int, init_file: str, votes: list[bool], out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out[rank] = [_any_rank(torch.tensor(vote if r == rank else False)).item() for r, vote in enumerate(votes)]
        out[rank] += [_any_rank(torch.tensor(False)).item()]
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_any_rank_ors_the_flags_of_every_process(tmp_path):
    """Each rank votes in turn (only the voter's flag may be true): every rank gets the voter's flag."""
    context = torch.multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        out = manager.dict()
        procs = [
            context.Process(target=_vote, args=(r, 2, str(tmp_path / "init"), [True, True], out)) for r in range(2)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        assert [proc.exitcode for proc in procs] == [0, 0]
        assert dict(out) == {0: [True, True, False], 1: [True, True, False]}


DDP_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper

SPIKE_STEP = 8

class Model(pl.LightningModule):
    def __init__(self, clipper):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.clipper = clipper
        self.decisions = {}

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        if self.trainer.global_step == SPIKE_STEP and self.global_rank == 1:
            loss = loss * 1000.0  # only rank 1's batch: DDP's all-reduce carries it to rank 0
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=True)

    def on_before_optimizer_step(self, optimizer):
        self.decisions[self.trainer.global_step] = self.clipper.last_decision(0)["skipped"]

    def on_fit_end(self):
        record = {
            "world_size": self.trainer.world_size,
            "skipped": [s for s, skipped in sorted(self.decisions.items()) if skipped],
            "count": self.clipper.skipped_steps,
            "on_device": isinstance(self.clipper._opt[0].skipped_steps, torch.Tensor),
            "weights": torch.cat([p.detach().flatten() for p in self.parameters()]).tolist(),
        }
        with open(os.path.join(sys.argv[1], f"rank{self.global_rank}.json"), "w") as fh:
            json.dump(record, fh)

pl.seed_everything(0, verbose=False)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=g)
data = TensorDataset(x, x.sum(1, keepdim=True))
clipper = AdaptiveClipper(warmup_steps=4, skip_factor=5.0)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False, callbacks=[clipper],
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
)
trainer.fit(Model(clipper), DataLoader(data, batch_size=8, shuffle=False))
sys.stdout.flush()
os._exit(0)  # see tests/scripts/ddp_clipper.py: a gloo thread can abort the interpreter's teardown
"""


@pytest.mark.slow
def test_ddp_ranks_skip_the_same_step_on_the_device(tmp_path):
    from test_adaptive_clipper import _env, _free_port, _run, _wait_for

    script = tmp_path / "ddp_fused.py"
    script.write_text(DDP_SCRIPT)
    _run([([sys.executable, str(script), str(tmp_path)], _env(_free_port()))], tmp_path)
    _wait_for([tmp_path / f"rank{r}.json" for r in range(2)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["on_device"] for r in ranks), "a fused AdamW without a scaler takes the device path"
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [8]
    assert ranks[0]["count"] == ranks[1]["count"] == 1
    assert ranks[0]["weights"] == ranks[1]["weights"], "the weights diverged across ranks"


def test_a_skipped_first_step_of_fused_sgd_with_momentum_leaves_no_unfilled_buffer():
    # fused SGD creates missing momentum buffers with empty_like and fills them in the kernel:
    # a step skipped through found_inf would keep them unfilled (garbage for the next step)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(4096))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    assert _device_skip.unborn_momentum(opt) == [p]
    p.grad = torch.full((4096,), float("nan"))
    skip_on_device(opt, torch.tensor(True), certain=True)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4096)) and "momentum_buffer" not in opt.state[p]
    p.grad = torch.ones(4096)
    opt.step()  # the first real step: buffer = grad, w = 1 - 0.1
    assert torch.allclose(p.detach(), torch.full((4096,), 0.9))
    assert not _device_skip.unborn_momentum(opt)


def test_an_unknown_device_flag_waits_until_momentum_buffers_exist(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9, fused=True)
    trainer = make_trainer(tmp_path, [], max_steps=1)
    assert not accepts_device_skip(trainer, opt)  # the first step decides on the host
    no_momentum = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=True)
    assert accepts_device_skip(trainer, no_momentum)
