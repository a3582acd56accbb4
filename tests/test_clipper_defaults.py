"""AdaptiveClipper's defaults: protection from the first step, a ceiling, bounded skipping (issue 13)."""

from __future__ import annotations

import math
import typing
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import CLIModel, loader, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_adaptive_clipper import EventMLP, clip_scalars

from lightning_gradguard.callbacks.adaptive_clipper import AdaptiveClipper
from lightning_gradguard.clipping import MODES, PercentileThreshold, ZScoreThreshold

REL = 1e-5
SPIKE = 1000.0


def _true_post(model: EventMLP, step: int) -> float:
    """The total norm the optimizer received at ``step``, measured by the module after the callbacks."""
    return model.reference["step"][step]["total"]


# --------------------------------------------------------------------------------------
# protection from the first step
# --------------------------------------------------------------------------------------


def test_the_default_never_lets_a_step_through_above_one(tmp_path):
    """``AdaptiveClipper()`` bounds every step, warm-up included, by 1.0: a corrupted batch at
    step 3 (inside the 25-step warm-up) is clipped like ``gradient_clip_val=1.0`` would."""
    clipper = AdaptiveClipper()
    assert (clipper.mode, clipper.max_norm, clipper.warmup_factor, clipper.skip_limit) == ("zscore", 1.0, 10.0, 3)
    model = EventMLP(events={3: SPIKE})
    trainer = make_trainer(tmp_path, [clipper], max_steps=8)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    assert sorted(s["clip/threshold"]) == list(range(8)), "a threshold is in force from the first step"
    for step in range(8):
        assert _true_post(model, step) <= 1.0 * (1 + 1e-6), f"step {step}"
    assert s["clip/pre_norm"][3] > 100 * s["clip/pre_norm"][2]
    assert _true_post(model, 3) == pytest.approx(1.0, rel=REL)


def test_without_a_ceiling_the_warmup_is_bounded_by_the_median_so_far(tmp_path):
    """With ``max_norm=inf`` the first step has nothing to be judged by; from the second on,
    a warm-up step is clipped to ``warmup_factor`` times the median of the norms before it."""
    clipper = AdaptiveClipper(max_norm=math.inf)
    model = EventMLP(events={3: SPIKE})
    trainer = make_trainer(tmp_path, [clipper], max_steps=6)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    assert 0 not in s["clip/threshold"], "no history, no ceiling: unbounded (not logged)"
    pre = [s["clip/pre_norm"][i] for i in range(3)]
    want = 10.0 * sorted(pre)[1]
    assert s["clip/threshold"][3] == pytest.approx(want, rel=REL)
    assert _true_post(model, 3) == pytest.approx(want, rel=REL)
    assert s["clip/coef"][3] < 0.05
    # the spike entered the start buffer but the median ignores it: step 4 is judged as before
    assert s["clip/threshold"][4] < 20 * max(pre)

    legacy = AdaptiveClipper(max_norm=math.inf, warmup_factor=math.inf)  # the behaviour before issue 13
    model = EventMLP(events={3: SPIKE})
    trainer = make_trainer(tmp_path / "legacy", [legacy], max_steps=6)
    trainer.fit(model, loader())
    assert clip_scalars(trainer)["clip/coef"][3] == 1.0, "an unbounded warm-up lets the spike through"


def test_the_statistics_learn_the_runs_scale_under_the_ceiling():
    """The ceiling bounds the clipping, not what the statistics learn: with norms near 10 and
    ``max_norm=1`` the z-score mean is near 10, so lifting the ceiling on resume gives a
    threshold in the run's own scale at once."""
    gen = torch.Generator().manual_seed(0)
    norms = 10.0 + torch.randn(80, generator=gen)
    rule = ZScoreThreshold(warmup_steps=5, warmup_factor=10.0, max_norm=1.0)
    for x in norms:
        assert rule.threshold().item() <= 1.0
        rule.observe(x, torch.tensor(True))
    assert rule.threshold().item() == 1.0
    assert 9.0 < rule.mean.item() < 11.0
    assert 10.0 < rule.bound().item() < 15.0

    free = ZScoreThreshold(warmup_steps=5, warmup_factor=10.0, max_norm=math.inf)
    free.load_state_dict(rule.state_dict())
    assert torch.equal(free.threshold(), rule.bound())


# --------------------------------------------------------------------------------------
# skip_factor cannot stop training
# --------------------------------------------------------------------------------------

SHIFT = 6  # from this step on, every gradient is 1000x larger: a new regime, not a spike


def _shifted(steps: int) -> EventMLP:
    return EventMLP(events={s: SPIKE for s in range(SHIFT, steps)})


def _refusal_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "clipped instead of skipped" in str(w.message)]


def test_skipping_stops_after_skip_limit_steps_in_a_row(tmp_path):
    clipper = AdaptiveClipper(warmup_steps=4, skip_factor=5.0, skip_limit=2, max_norm=math.inf)
    model = _shifted(14)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [clipper], max_steps=14)
        trainer.fit(model, loader())
    s = clip_scalars(trainer)
    coef = [s["clip/coef"][i] for i in range(14)]
    assert [c == 0.0 for c in coef[SHIFT:]] == [True, True] + [False] * (14 - SHIFT - 2), coef
    assert clipper.skipped_steps == 2 and clipper.skips_refused == 14 - SHIFT - 2
    assert s["clip/skipped_steps"][13] == 2 and s["clip/skips_refused"][13] == 14 - SHIFT - 2
    # the refused steps are clipped to the threshold, not passed through
    for step in range(SHIFT + 2, 14):
        assert _true_post(model, step) == pytest.approx(s["clip/threshold"][step], rel=1e-4), f"step {step}"
    messages = _refusal_warnings(record)
    assert len(messages) == 1 and "skip_limit=2" in messages[0] and "clip/skips_refused" in messages[0]


def test_unbounded_skipping_would_skip_the_whole_new_regime(tmp_path):
    """What ``skip_limit`` prevents (the behaviour before issue 13): every step skipped."""
    clipper = AdaptiveClipper(warmup_steps=4, skip_factor=5.0, skip_limit=10**9, max_norm=math.inf)
    trainer = make_trainer(tmp_path, [clipper], max_steps=14, logger=False)
    trainer.fit(_shifted(14), loader())
    assert clipper.skipped_steps == 14 - SHIFT and clipper.skips_refused == 0


def test_a_lone_spike_is_still_skipped_and_the_count_starts_again(tmp_path):
    """A step back below the bound ends the streak: the next spike is skipped again."""
    events = {5: SPIKE, 6: SPIKE, 9: SPIKE}
    clipper = AdaptiveClipper(warmup_steps=4, skip_factor=5.0, skip_limit=1, max_norm=math.inf)
    trainer = make_trainer(tmp_path, [clipper], max_steps=12)
    trainer.fit(EventMLP(events=events), loader())
    coef = clip_scalars(trainer)["clip/coef"]
    assert coef[5] == 0.0 and coef[6] > 0.0 and coef[9] == 0.0
    assert clipper.skipped_steps == 2 and clipper.skips_refused == 1


def test_a_nonfinite_step_neither_extends_nor_ends_a_streak(tmp_path):
    """fp16 overflow steps are common in an explosive regime: they must not reset the count."""
    events = {6: SPIKE, 7: math.nan, 8: SPIKE, 9: SPIKE}
    clipper = AdaptiveClipper(warmup_steps=4, skip_factor=5.0, skip_limit=2, max_norm=math.inf)
    trainer = make_trainer(tmp_path, [clipper], max_steps=11)
    trainer.fit(EventMLP(events=events, guard=True), loader())
    coef = clip_scalars(trainer)["clip/coef"]
    assert coef[6] == 0.0 and coef[8] == 0.0, "two skips"
    assert 0.0 < coef[9] < 0.01, "the third outlier in a row is clipped, the NaN step between them not counted"
    assert clipper.skipped_steps == 2 and clipper.skips_refused == 1


def test_resume_in_the_middle_of_a_skip_streak_follows_the_uninterrupted_run(tmp_path):
    kwargs = dict(warmup_steps=4, skip_factor=5.0, skip_limit=3, max_norm=math.inf)
    total, cut = 14, 8  # the checkpoint after step 7: two skips of the streak done, one left
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=cut, save_top_k=-1)
    pl.seed_everything(0)
    full_clipper = AdaptiveClipper(**kwargs)
    trainer = make_trainer(tmp_path / "a", [full_clipper, ckpt], max_steps=total, enable_checkpointing=True)
    trainer.fit(_shifted(total), loader())
    full = clip_scalars(trainer)
    path = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={cut}" in p.name)

    pl.seed_everything(0)
    resumed_clipper = AdaptiveClipper(**kwargs)
    trainer = make_trainer(tmp_path / "b", [resumed_clipper], max_steps=total)
    trainer.fit(_shifted(total), loader(), ckpt_path=str(path))
    resumed = clip_scalars(trainer)
    for tag in ("clip/threshold", "clip/pre_norm", "clip/coef", "clip/skipped_steps", "clip/skips_refused"):
        for step in range(cut, total):
            assert resumed[tag][step] == full[tag][step], f"{tag}@{step}"
    assert [full["clip/coef"][i] == 0.0 for i in range(SHIFT, SHIFT + 4)] == [True, True, True, False]
    assert resumed_clipper.skipped_steps == full_clipper.skipped_steps == 3


# --------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------


def test_mode_is_a_literal_listing_every_mode():
    hint = typing.get_type_hints(AdaptiveClipper.__init__)["mode"]
    assert typing.get_origin(hint) is typing.Literal
    assert typing.get_args(hint) == tuple(MODES)


def test_lightning_cli_help_lists_the_modes(capsys):
    from lightning.pytorch.cli import LightningCLI

    target = "lightning_gradguard.callbacks.adaptive_clipper.AdaptiveClipper"
    with pytest.raises(SystemExit):
        LightningCLI(CLIModel, run=False, args=["--trainer.callbacks.help", target])
    out = capsys.readouterr().out
    assert "{norm,value,percentile,zscore,agc}" in out
    assert "--trainer.callbacks.skip_limit" in out and "--trainer.callbacks.warmup_factor" in out


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(skip_limit=0), "skip_limit"),
        (dict(skip_limit=2.5), "skip_limit"),
        (dict(skip_limit=True), "skip_limit"),
        (dict(warmup_factor=0.0), "warmup_factor"),
        (dict(warmup_factor=math.nan), "warmup_factor"),
        (dict(warmup_factor=-math.inf), "warmup_factor"),
        (dict(max_norm=-math.inf), "max_norm"),
        (dict(max_norm=math.nan), "max_norm"),
        (dict(max_norm=0.0), "max_norm"),
        (dict(mode="norm", max_norm=1.0, skip_limit=2), "skip_limit"),
        (dict(mode="agc", warmup_factor=2.0), "warmup_factor"),
        (dict(mode="percentile", min_norm=2.0), "min_norm"),  # above the default ceiling 1.0
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AdaptiveClipper(**kwargs)


@pytest.mark.parametrize("mode", ["percentile", "zscore", "agc"])
def test_an_infinite_max_norm_means_no_ceiling(tmp_path, mode):
    clipper = AdaptiveClipper(mode=mode, max_norm=math.inf, min_norm=None if mode == "agc" else 2.0)
    model = EventMLP(events={3: SPIKE})
    trainer = make_trainer(tmp_path, [clipper], max_steps=5)
    trainer.fit(model, loader())
    s = clip_scalars(trainer)
    assert all(math.isfinite(v) for tag in s.values() for v in tag.values())
    if mode != "agc":  # the learned modes: from step 1, 10x the median so far; nothing caps it at 1
        assert s["clip/threshold"][1] == pytest.approx(10 * s["clip/pre_norm"][0], rel=REL)
        assert s["clip/threshold"][1] > 1.0
    else:
        assert "clip/threshold" not in s


@pytest.mark.parametrize("rule_cls", [PercentileThreshold, ZScoreThreshold])
def test_a_zero_median_bounds_nothing_during_the_warmup(rule_cls):
    """Gradients exactly zero at first (a frozen start) must not zero every later warm-up step."""
    rule = rule_cls(warmup_steps=5, warmup_factor=10.0)
    rule.observe(torch.tensor(0.0), torch.tensor(True))
    assert math.isinf(rule.threshold().item())
    for x in (0.0, 2.0, 2.0):
        rule.observe(torch.tensor(x), torch.tensor(True))
    assert rule.threshold().item() == pytest.approx(10.0 * 1.0)  # median of 0, 0, 2, 2
