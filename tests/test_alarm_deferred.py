"""VanishExplodeAlarm(defer_host_read=...): the host reads a step's reading one step later.

Real ``Trainer.fit`` runs on CPU with ``torch.optim.AdamW(fused=True)``, whose step the
alarm skips from a device flag (``found_inf``). The deferred mode must skip exactly the
steps the immediate mode skips, report the same findings (at the steps they happened),
counts and checkpoints, and read nothing of the current step on the host.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from functools import partial
from typing import NamedTuple

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordingMLP, fp16_cpu_plugin, loader, make_trainer, poisoned_loader, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from lightning_gradguard import GradientAnomalyError, VanishExplodeAlarm, _arrays
from lightning_gradguard.diagnosis import DeviceReading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from demo import Classifier, DeepSigmoidMLP, two_spirals

FusedAdamW = partial(torch.optim.AdamW, fused=True)


def _model(**kw) -> RecordingMLP:
    return RecordingMLP(optimizer_cls=FusedAdamW, lr=kw.pop("lr", 1e-2), **kw)


def _fit(tmp_path, model, data, callbacks, **kw):
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks, **kw)
    trainer.fit(model, data)
    return trainer


class StateHistory(pl.Callback):
    """Copies of the weights and of the optimizer state after each training batch: ``[global_step]``."""

    def __init__(self):
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.optim: dict[int, list[dict[str, Tensor]]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        self.weights[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        self.optim[step] = [{k: v.clone() for k, v in opt.state[p].items()} for p in pl_module.parameters()]


def _assert_same_state(history: StateHistory, a: int, b: int) -> None:
    for name, w in history.weights[a].items():
        assert torch.equal(w, history.weights[b][name]), name
    for sa, sb in zip(history.optim[a], history.optim[b]):
        assert set(sa) == {"step", "exp_avg", "exp_avg_sq"}
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------- (a) a NaN step is skipped exactly


def test_nan_step_is_skipped_exactly_by_the_fused_optimizer(tmp_path):
    k = 4
    alarm, history = VanishExplodeAlarm(defer_host_read=True, halt_on_nan=False), StateHistory()
    with pytest.warns(UserWarning, match=f"nonfinite gradients at step {k}"):
        trainer = _fit(tmp_path, _model(), poisoned_loader(k), [alarm, history], max_steps=8)
    assert trainer.global_step == 8 and alarm.halted_at is None
    _assert_same_state(history, k + 1, k)  # after step k = after step k-1: weights, exp_avg(_sq), step
    assert not torch.equal(history.weights[k + 2]["net.0.weight"], history.weights[k + 1]["net.0.weight"])
    assert alarm.skipped_steps == 1 and alarm.counts["nonfinite"] == 1 and alarm.steps_checked == 8
    assert [(f.kind, f.step) for f in alarm.findings] == [("nonfinite", k)]  # the step it happened at
    assert alarm._deferred.pending_buffer is None  # the last step was read at the end of training


def test_nan_with_stop_halts_with_finite_weights_and_a_usable_checkpoint(tmp_path):
    k = 10  # after stats.MAX_ABS_LEARNING: the snapshot no longer computes max |g| unasked
    alarm, history = VanishExplodeAlarm(defer_host_read=True, nonfinite_action="stop"), StateHistory()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    model = _model()
    with pytest.warns(UserWarning, match=f"nonfinite gradients at step {k}"):
        trainer = _fit(
            tmp_path, model, poisoned_loader(k, n=128), [alarm, history, ckpt], max_steps=20, enable_checkpointing=True
        )
    assert alarm.halted_at == k and trainer.should_stop
    # the host learns of step k at step k+1, whose update is dropped too; nothing after it runs
    assert max(history.weights) == k + 2
    _assert_same_state(history, k + 1, k)
    _assert_same_state(history, k + 2, k)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p.detach(), history.weights[k][name]), name
    assert alarm.skipped_steps == 1 and alarm.steps_checked == k + 1  # as in the immediate mode
    last = tmp_path / "ckpt" / "last.ckpt"
    restored = RecordingMLP.load_from_checkpoint(str(last), optimizer_cls=FusedAdamW)
    for name, p in restored.named_parameters():
        assert torch.equal(p, history.weights[k][name]), name
    saved = torch.load(str(last), weights_only=False)
    assert saved["callbacks"][alarm.state_key]["counts"]["nonfinite"] == 1
    # the crash dump holds step k's batch and statistics, though written at step k+1
    dump = torch.load(alarm.dump_paths[0], weights_only=False)
    assert dump["step"] == k and dump["batch_idx"] == k and torch.isnan(dump["batch"][0]).any()
    assert dump["nonfinite_groups"] == ["net.0", "net.2", "net.4", "net.6"]
    assert math.isnan(dump["max_abs"])  # step k's max |g|, not step k+1's finite one


def test_raise_is_raised_at_the_next_step_and_at_the_end_of_training(tmp_path):
    for k, steps in ((3, 10), (5, 6)):  # the second: the NaN step is the last one, read at on_train_end
        alarm = VanishExplodeAlarm(defer_host_read=True, nonfinite_action="raise")
        history, model = StateHistory(), _model()
        with pytest.raises(GradientAnomalyError) as info:
            _fit(tmp_path / str(k), model, poisoned_loader(k), [alarm, history], max_steps=steps)
        assert info.value.finding.kind == "nonfinite" and info.value.finding.step == k
        assert os.path.exists(info.value.finding.dump_path)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), history.weights[k][name]), name
        assert alarm.halted_at == k and alarm.skipped_steps == 1


# ---------------------------------------------------------------------- (b) the same as the immediate mode


def _compare_modes(tmp_path, make_model, data, steps, **alarm_kw):
    """Run immediate and deferred on the same seeded run; return both alarms after checking they agree."""
    alarms, weights, scalars = {}, {}, {}
    for defer in (False, True):
        alarm = VanishExplodeAlarm(defer_host_read=defer, **alarm_kw)
        pl.seed_everything(0, verbose=False)  # the same initial weights and batches
        model, batches = make_model(), data()
        with pytest.warns(UserWarning):
            trainer = _fit(tmp_path / str(defer), model, batches, [alarm], max_steps=steps)
        alarms[defer], weights[defer] = alarm, {n: p.detach().clone() for n, p in model.named_parameters()}
        tags = read_scalars(trainer.logger.log_dir)
        scalars[defer] = {tag: v for tag, v in tags.items() if tag.startswith("alarm/")}
    now, late = alarms[False], alarms[True]
    strip = lambda f: {**f.as_dict(), "dump_path": None}  # noqa: E731 - the dumps lie in different folders
    assert [strip(f) for f in late.findings] == [strip(f) for f in now.findings]
    assert late.counts == now.counts and late.episodes == now.episodes and late.first_step == now.first_step
    assert (late.skipped_steps, late.steps_checked, late.halted_at) == (
        now.skipped_steps,
        now.steps_checked,
        now.halted_at,
    )
    assert scalars[True] == scalars[False]  # logged at the steps they belong to
    for name, w in weights[False].items():
        assert torch.equal(weights[True][name], w), name
    return now, late


class SpikeAt(RecordingMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * (1e4 if self.trainer.global_step in (25, 33) else 1.0)


class GrowingLoss(RecordingMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 10.0 ** (1.5 * max(0, self.trainer.global_step - 4))


def test_explosion_same_findings_counts_and_skips_as_immediate(tmp_path):
    now, _ = _compare_modes(
        tmp_path,
        lambda: SpikeAt(optimizer_cls=FusedAdamW, lr=1e-3),
        lambda: loader(n=512),
        40,
        warmup_steps=20,
        max_norm=None,
        explode_action="skip",
        episode_gap=3,
    )
    assert [(f.kind, f.step) for f in now.findings] == [("exploding", 25), ("exploding", 33)]
    assert now.skipped_steps == 2


def test_growth_stop_same_halt_as_immediate(tmp_path):
    now, late = _compare_modes(
        tmp_path,
        lambda: GrowingLoss(optimizer_cls=FusedAdamW, lr=1e-3),
        lambda: loader(n=256),
        30,
        explode_action="stop",
    )
    assert now.halted_at == late.halted_at == 6 and now.findings[0].kind == "exploding"
    assert late.findings[0].dump_path and os.path.exists(late.findings[0].dump_path)


class FusedClassifier(Classifier):
    def configure_optimizers(self):
        return FusedAdamW(self.parameters(), lr=self.lr)


def test_vanishing_same_findings_and_counts_as_immediate(tmp_path):
    data = lambda: DataLoader(two_spirals(n=1024), batch_size=128, shuffle=True)  # noqa: E731
    now, _ = _compare_modes(
        tmp_path, lambda: FusedClassifier(DeepSigmoidMLP(20, 32), 1e-3), data, 40, patience=20, dead_patience=5
    )
    assert now.findings[0].kind == "vanishing" and now.findings[0].step == 19
    assert now.counts["vanishing"] == 21


def test_checkpoints_hold_the_same_state_in_both_modes(tmp_path):
    states = {}
    for defer in (False, True):
        alarm = VanishExplodeAlarm(defer_host_read=defer, warmup_steps=2)
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / str(defer)), every_n_train_steps=3, save_top_k=-1)
        pl.seed_everything(0, verbose=False)
        model = _model()
        _fit(tmp_path / f"run{defer}", model, loader(), [alarm, ckpt], max_steps=7, enable_checkpointing=True)
        files = sorted(glob.glob(str(tmp_path / str(defer) / "*.ckpt")))
        states[defer] = [torch.load(f, weights_only=False)["callbacks"][alarm.state_key] for f in files]
        assert [s["steps_checked"] for s in states[defer]] == [3, 6]  # the step of the save included
    assert repr(states[True]) == repr(states[False])  # repr: NaN (unwritten ring slots) equals NaN
    assert VanishExplodeAlarm(defer_host_read=True).state_key == VanishExplodeAlarm(defer_host_read=False).state_key


# ---------------------------------------------------------------------- (c) no host read of the current step


class Read(NamedTuple):
    what: str  # "tolist", "numpy" or the aten op
    tensor: Tensor
    current: bool  # computed in the hook from this step's gradients or loss flags
    where: str  # the innermost lightning_gradguard function on the stack


def _gradguard_caller() -> str:
    frame = sys._getframe(1)
    while frame is not None:
        if f"{os.sep}lightning_gradguard{os.sep}" in frame.f_code.co_filename:
            return frame.f_code.co_qualname
        frame = frame.f_back
    return "?"


#: Host reads that exist on the CPU only: there the snapshot looks at which float32 norms
#: left the range by viewing a CPU tensor's memory (no copy, no device); on other devices it
#: takes a max |g| pass instead and reads nothing (``stats._bucket_norms``).
CPU_ONLY = {"_cpu_norms"}


def _device_reads(reads):
    return [r for r in reads if r.where not in CPU_ONLY]


def _current(reads):
    return [(r.what, r.where) for r in _device_reads(reads) if r.current]


class CurrentStepReads(TorchDispatchMode):
    """Host reads inside the alarm's hook, each marked with whether it reads the current step.

    The current step's values are those computed, inside the hook, from the gradients
    (and the micro-batch loss flags) of this step: every tensor an op computes from one
    of them is tainted, in-place writes included. A read is ``tolist``/``numpy`` (patched
    by the caller) or an op that copies a value to the host (``HostSyncCounter.SYNC_OPS``).
    """

    SYNC_OPS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero")

    def __init__(self, seeds):
        super().__init__()
        self._tainted: dict[int, Tensor] = {}  # storage address -> a tensor that keeps it alive (no reuse)
        for t in seeds:
            self._taint(t)
        self.reads: list[Read] = []

    def _taint(self, t):
        if isinstance(t, Tensor) and t.layout == torch.strided:
            self._tainted[t.untyped_storage().data_ptr()] = t

    def tainted(self, t) -> bool:
        return isinstance(t, Tensor) and t.layout == torch.strided and t.untyped_storage().data_ptr() in self._tainted

    def note_read(self, what, t):
        self.reads.append(Read(what, t, self.tainted(t), _gradguard_caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dirty = any(self.tainted(t) for t in tree_leaves((args, kwargs)))
        if str(func).startswith(self.SYNC_OPS):
            for t in tree_leaves(args):
                if isinstance(t, Tensor):
                    self.note_read(str(func), t)
        out = func(*args, **kwargs)
        if dirty:
            for t in tree_leaves(out):
                self._taint(t)
            for i, arg in enumerate(func._schema.arguments):  # in-place and out= writes
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = args[i] if i < len(args) else kwargs.get(arg.name)
                    for t in tree_leaves(value):
                        self._taint(t)
        return out


def _watch_reads(alarm, monkeypatch):
    """Wrap the alarm's hook: per call, the reads it made and the buffer held from the previous step."""
    calls = []
    hook = alarm.on_before_optimizer_step
    active: list[CurrentStepReads] = []
    # the deferred read exists for devices, where the rules run in torch: run them so here too
    # (on the CPU they run in numpy on views of the tensors, which this check would count as reads)
    monkeypatch.setattr(_arrays, "_forced", _arrays.DEVICE)
    for name in ("tolist", "numpy"):
        original = getattr(Tensor, name)

        def patched(self, *a, _original=original, _name=name, **kw):
            if active:
                active[-1].note_read(_name, self)
            return _original(self, *a, **kw)

        monkeypatch.setattr(Tensor, name, patched)

    def watched(trainer, pl_module, optimizer):
        seeds = [p.grad for p in pl_module.parameters() if p.grad is not None]
        seeds += [m.loss_finite for m in alarm._window.batches if m.loss_finite is not None]
        previous = alarm._deferred.pending_buffer
        mode = CurrentStepReads(seeds)
        active.append(mode)
        try:
            with mode:
                hook(trainer, pl_module, optimizer)
        finally:
            active.pop()
        calls.append((trainer.global_step, previous, mode.reads))

    monkeypatch.setattr(alarm, "on_before_optimizer_step", watched)
    return calls


def test_deferred_hook_reads_only_the_previous_steps_copy(tmp_path, monkeypatch):
    alarm = VanishExplodeAlarm(defer_host_read=True)
    calls = _watch_reads(alarm, monkeypatch)
    _fit(tmp_path, _model(), loader(), [alarm], max_steps=6)
    assert len(calls) == 6 and alarm.steps_checked == 6
    for step, previous, reads in calls:
        assert _current(reads) == [], step
        reads = _device_reads(reads)
        if previous is None:  # nothing held yet: no host read at all
            assert step == 0 and reads == []
        else:  # exactly one host read per step: the copy the previous step left
            assert [(r.what, r.tensor is previous) for r in reads] == [("tolist", True)], step
    assert alarm.findings == []


def test_deferred_flagged_steps_read_only_their_own_previous_step(tmp_path, monkeypatch):
    k = 3
    alarm = VanishExplodeAlarm(defer_host_read=True, halt_on_nan=False)
    calls = _watch_reads(alarm, monkeypatch)
    with pytest.warns(UserWarning, match=f"nonfinite gradients at step {k}"):
        _fit(tmp_path, _model(), poisoned_loader(k), [alarm], max_steps=6)
    assert alarm.findings[0].step == k
    counts = {}
    for step, _, reads in calls:
        assert _current(reads) == [], step  # never this step's values
        counts[step] = len(_device_reads(reads))
    # step k's finding is built at step k+1 from step k's statistics: more reads there, none of step k+1
    assert counts[k + 1] > 1 and all(n == 1 for s, n in counts.items() if s not in (0, k + 1))


def test_the_read_check_catches_the_immediate_mode(tmp_path, monkeypatch):
    """The check above would fail if the current reading were read: the immediate mode reads it."""
    alarm = VanishExplodeAlarm(defer_host_read=False)
    calls = _watch_reads(alarm, monkeypatch)
    _fit(tmp_path, _model(), loader(), [alarm], max_steps=3)
    for step, previous, reads in calls:
        assert previous is None
        assert _current(reads) == [("tolist", "DeviceReading.to_host")], step


# ---------------------------------------------------------------------- (d) where it does not apply


def _count_immediate_reads(monkeypatch):
    readings = []
    to_host = DeviceReading.to_host
    monkeypatch.setattr(DeviceReading, "to_host", lambda reading: readings.append(to_host(reading)) or readings[-1])
    return readings


@pytest.mark.parametrize(
    ("defer", "optimizer", "plugins"),
    [
        ("auto", FusedAdamW, []),  # "auto" on CPU: immediate, as before
        (True, torch.optim.AdamW, []),  # not fused: no device skip
        (True, FusedAdamW, [fp16_cpu_plugin]),  # an fp16 GradScaler owns found_inf
    ],
    ids=["auto-on-cpu", "not-fused", "grad-scaler"],
)
def test_falls_back_to_the_immediate_read(tmp_path, monkeypatch, defer, optimizer, plugins):
    readings = _count_immediate_reads(monkeypatch)
    alarm, history = VanishExplodeAlarm(defer_host_read=defer, halt_on_nan=False), StateHistory()
    model = RecordingMLP(optimizer_cls=optimizer, lr=1e-2)
    held = []
    hook = alarm.on_before_optimizer_step

    def watched(*args):
        hook(*args)
        held.append(alarm._deferred.pending_buffer)

    monkeypatch.setattr(alarm, "on_before_optimizer_step", watched)
    plugins = [p() for p in plugins]
    if plugins:  # under the scaler a NaN step is an overflow the scaler skips: a clean run shows the mode
        _fit(tmp_path, model, loader(), [alarm, history], max_steps=5, plugins=plugins)
    else:
        with pytest.warns(UserWarning, match="nonfinite gradients at step 2"):
            _fit(tmp_path, model, poisoned_loader(2), [alarm, history], max_steps=5)
        assert alarm.skipped_steps == 1
        for name, w in history.weights[3].items():  # the step's gradients were dropped
            assert torch.equal(w, history.weights[2][name]), name
    assert len(readings) == alarm.steps_checked == 5  # one immediate host read per step
    assert held == [None] * 5 and alarm._deferred._latch is None  # never held, never skipped on the device


def test_deferred_reads_no_reading_immediately(tmp_path, monkeypatch):
    readings = _count_immediate_reads(monkeypatch)
    alarm = VanishExplodeAlarm(defer_host_read=True)
    _fit(tmp_path, _model(), loader(), [alarm], max_steps=4)
    assert readings == [] and alarm.steps_checked == 4


# ---------------------------------------------------------------------- (e) arguments


@pytest.mark.parametrize("value", [1, 0, None, "yes", "AUTO", "true"])
def test_bad_defer_host_read_names_the_argument(value):
    with pytest.raises(ValueError, match="defer_host_read"):
        VanishExplodeAlarm(defer_host_read=value)


def test_defer_host_read_is_kept_as_given():
    assert VanishExplodeAlarm().defer_host_read == "auto"
    assert VanishExplodeAlarm(defer_host_read=True).defer_host_read is True
    assert VanishExplodeAlarm(defer_host_read=False).defer_host_read is False


# ---------------------------------------------------------------------- several optimizers, the latch


def test_halt_of_one_optimizer_keeps_the_others_step_of_that_batch_out(tmp_path):
    """Optimizer 0's step of batch k is non-finite; the host learns of it at optimizer 1's step and drops it."""
    from test_alarm import TwoOptimizers

    class FusedTwo(TwoOptimizers):
        def configure_optimizers(self):
            return (
                torch.optim.SGD(self.first.parameters(), lr=0.1, fused=True),
                torch.optim.SGD(self.second.parameters(), lr=0.1, fused=True),
            )

    k, starts = 3, {}

    class BatchStart(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts[batch_idx] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    alarm = VanishExplodeAlarm(defer_host_read=True)
    model = FusedTwo(nan_batch=k)
    with pytest.warns(UserWarning, match=f"nonfinite gradients at step {2 * k}"):
        trainer = _fit(tmp_path, model, loader(), [alarm, BatchStart()], max_steps=20, logger=False)
    assert not torch.equal(starts[k]["second.weight"], starts[k - 1]["second.weight"])  # it learns
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p.detach(), starts[k][name]), name
    assert alarm.halted_at == 2 * k  # as in the immediate mode (test_alarm)
    assert alarm.steps_checked == 2 * k + 1 and alarm.skipped_steps == 1 and trainer.global_step == 2 * k + 2


def test_the_latch_keeps_skipping_after_a_stop_kind_until_reset():
    from lightning_gradguard.callbacks._deferred import DeferredReadings

    def reading(**flags):
        values = {f: torch.tensor(flags.get(f, False)) for f in ("nonfinite", "exploding", "vanishing", "dead")}
        return DeviceReading(
            **values,
            overflow=torch.tensor(False),
            zscore=torch.tensor(0.0),
            ratio=torch.tensor(1.0),
            total_norm=torch.tensor(1.0),
            loss_scale=torch.tensor(1.0),
        )

    held = DeferredReadings(True, {"nonfinite": "skip", "exploding": "stop", "vanishing": "skip", "dead": "warn"})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], fused=True)
    verdicts = []
    for r in (reading(dead=True), reading(vanishing=True), reading(), reading(exploding=True), reading()):
        held.skip(opt, r)
        verdicts.append(float(opt.found_inf))
        p.grad = torch.ones(1)
        opt.step()  # the step post-hook removes found_inf again
        assert "found_inf" not in opt.__dict__
    assert verdicts == [0.0, 1.0, 0.0, 1.0, 1.0]  # warn: no skip; skip: that step; stop: every later step too
    held.reset()
    held.skip(opt, reading())
    assert float(opt.found_inf) == 0.0


@pytest.mark.parametrize("defer", [True, False])
def test_a_non_finite_first_step_with_fused_sgd_momentum_leaves_clean_buffers(tmp_path, defer):
    # the first step would create SGD's momentum buffers: it is decided on the host and its
    # gradients dropped, so no unfilled buffer reaches the next step
    fused_sgd = partial(torch.optim.SGD, momentum=0.9, fused=True)
    model = RecordingMLP(optimizer_cls=fused_sgd, lr=0.01)
    alarm = VanishExplodeAlarm(defer_host_read=defer, halt_on_nan=False)
    with pytest.warns(UserWarning, match="nonfinite gradients at step 0"):
        _fit(tmp_path, model, poisoned_loader(0), [alarm], max_steps=4)
    assert alarm.skipped_steps == 1
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in model.parameters())
    opt = model.trainer.optimizers[0]
    assert all(torch.isfinite(opt.state[p]["momentum_buffer"]).all() for p in model.parameters())
