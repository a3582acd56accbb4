"""Every constructor argument of every public callback, probed with hypothesis.

The promise under test (README: "a bad value raises `ValueError` naming the argument"):
any value of any argument is either

- accepted, and the callback then works in a real ``Trainer.fit`` on CPU (it never fails
  later because of the value it accepted), or
- refused at construction with ``ValueError`` or ``TypeError`` whose message names the
  argument (its name appears as a word, e.g. ``window`` in "`window` must be ...").

Nothing else may escape the constructor (``AttributeError``, ``KeyError``, ``re.error``,
``OverflowError``, ...).

The arguments are read from each callback's signature with :mod:`inspect`, so a new
argument is covered automatically, and :func:`test_every_argument_has_a_strategy` fails
until it has a "plausible" strategy here (valid values, edge values and near misses, from
the docstrings). Each argument's values mix that strategy with a generic hostile one
(``None``, bools, huge ints, nan/inf/-0.0/1e308, strings, bytes, containers, objects).

Also tested: two stateful callbacks that differ in a single setting have different
``state_key`` values, so Lightning accepts both in one ``Trainer``.

Runs are derandomized (``derandomize=True``), so CI sees the same examples every time.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RecordingMLP, fp16_cpu_plugin, loader, make_trainer
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard import (
    AdaptiveClipper,
    AmpUnscaleCheck,
    GradientAnomalyError,
    GradientNormLogger,
    VanishExplodeAlarm,
)

CALLBACKS: tuple[type, ...] = (GradientNormLogger, VanishExplodeAlarm, AdaptiveClipper, AmpUnscaleCheck)

COMMON = dict(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
    derandomize=True,
    database=None,
)
#: construction only: cheap, many examples
CONSTRUCT = settings(max_examples=40, **COMMON)
CONSTRUCT_COMBINED = settings(max_examples=300, **COMMON)
#: a real Trainer.fit per example
FIT = settings(
    max_examples=25,
    # shrinking costs a fit per try (hundreds): report the first failing example as drawn (1-3 arguments)
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    **{**COMMON, "suppress_health_check": [*COMMON["suppress_health_check"], HealthCheck.filter_too_much]},
)


def keyword_arguments(cls: type) -> list[str]:
    """The keyword-only constructor arguments of ``cls``, in signature order."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

#: ints that no range check should pass through to a tensor size or a float conversion unnoticed
#: (``10**400`` does not fit a float; the others do not fit a tensor allocation, and fail at once)
HUGE_INTS = (2**62, 2**63 - 1, 2**64, 10**18, 10**400, -(10**400))
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 1.7976931348623157e308, 5e-324, 1e-300)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)

#: values no argument should choke on (it may refuse them, naming itself)
hostile: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=12),
    st.sampled_from(["", " ", "(", "[", "*", "?", "None", "none", "nan", "inf", "1", "1.0", "true", "False"]),
    st.binary(max_size=6),
    st.lists(_scalars, max_size=3),
    st.lists(_scalars, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=4), _scalars, max_size=3),
    st.dictionaries(st.integers(-2, 2), _scalars, max_size=2),
    st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), min_size=1, max_size=3),  # list of pairs
    st.sets(st.integers(0, 3), max_size=2),
    st.builds(object),
    st.just(Path("some/where")),
    st.sampled_from([0.5j, float, Ellipsis, re.compile("net"), range(3), b"net"]),
    st.sampled_from([torch.tensor(1.0), torch.tensor([1.0, 2.0]), torch.tensor(math.nan)]),
)


def _floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


#: a positive magnitude (a norm, a ratio, a scale): ordinary values, ints, and the edges of float
positive = st.one_of(
    _floats(1e-3, 1e3),
    st.integers(1, 100),
    st.sampled_from([5e-324, 1e-300, 1e-30, 1e30, 1e308, 1.7976931348623157e308, 0.0, -1.0, math.inf, math.nan]),
    st.sampled_from(HUGE_INTS),
)
#: a fraction in (0, 1) or [0, 1], with its edges and just beyond
fraction = st.one_of(
    _floats(0.0, 1.0),
    st.sampled_from([0, 1, 0.0, 1.0, -0.0, 5e-324, 1e-300, 0.9999999999999999, 1.0000000000000002, -1e-300, 2]),
)
#: a count (>= 0 or >= 1 depending on the argument)
count = st.one_of(st.integers(-2, 60), st.sampled_from(HUGE_INTS), st.sampled_from([1.0, 2.5, True, False]))
optional_count = st.one_of(st.none(), count)
flag = st.one_of(st.booleans(), st.sampled_from([0, 1, "True", "false", None, 1.0]))

regex = st.one_of(
    st.sampled_from([r"^net\.0\.", r"net", r".*", r"", r"^net\.[24]\.", r"(?i)NET", r"\.bias$", r"^head\."]),
    st.sampled_from(["(", "[a-", "*", "(?P<x>", "\\", r"a{2,1}"]),  # invalid regexes
    st.sampled_from([b"net", re.compile(r"^net\.2\."), re.compile(rb"net")]),  # bytes / compiled
    st.text(max_size=6),
)
group_label = st.one_of(
    st.sampled_from(["first", "rest", "bias", "other", "total", "", "a/b", " ", "grad_norm"]),
    st.text(max_size=5),
    st.sampled_from([1, None, ("a",)]),
)
group_patterns = st.one_of(
    st.dictionaries(group_label, regex, min_size=1, max_size=3),
    st.just({}),
    st.sampled_from(
        [
            {"first": r"^net\.0\.", "rest": r"^net\."},
            {"first": "("},
            [("first", r"^net\.0\.")],  # a list of pairs where a mapping is expected
            r"^net\.0\.",  # a bare string
            ["^net"],
        ]
    ),
)
group_by = st.sampled_from(["module", "parameter", "depth", "pattern", "total", "Module", "layer", "", "depth "])
group_depth = st.one_of(st.integers(-1, 6), st.sampled_from(HUGE_INTS), st.sampled_from([1.0, True, "2"]))
action = st.sampled_from(["warn", "skip", "stop", "raise", "Warn", "warn ", "ignore", "", "none", "halt"])
agc_exclude = st.one_of(
    st.lists(regex, max_size=3),
    st.lists(regex, max_size=2).map(tuple),
    st.sampled_from([r"^net\.6\.", {"head": r"^net\.6\."}, [1], [None], ()]),
)
dump_dir = st.sampled_from(
    [
        None,
        "",
        os.path.join(tempfile.gettempdir(), "gradguard-test-dumps"),
        Path(tempfile.gettempdir()) / "gradguard-test-dumps",
        b"/tmp/gradguard-test-dumps",
        ["/tmp"],
    ]
)

#: "plausible" values per argument name (valid values, edges, typos), shared by the callbacks
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    # shared
    "log_every_n_steps": optional_count,
    "group_by": group_by,
    "group_depth": st.one_of(st.none(), group_depth),
    "group_patterns": st.one_of(st.none(), group_patterns),
    "max_consecutive_overflows": count,
    "min_loss_scale": positive,
    "warmup_steps": st.one_of(st.none(), count),
    "max_norm": st.one_of(st.none(), positive),
    # GradientNormLogger
    "hook": st.sampled_from(["on_before_optimizer_step", "on_after_backward", "on_before_backward", "backward", ""]),
    "per_layer": flag,
    "log_max_abs": flag,
    "log_param_norms": flag,
    "log_update_ratio": flag,
    "histogram_every_n_steps": optional_count,
    "custom_scalars": flag,
    "flow_every_n_steps": optional_count,
    "flow_history": count,
    # VanishExplodeAlarm
    "halt_on_nan": flag,
    "nonfinite_action": st.one_of(st.none(), action),
    "explode_action": action,
    "vanish_action": action,
    "dead_action": action,
    "spike_zscore": st.one_of(st.none(), positive),
    "spike_min_ratio": st.one_of(st.none(), positive),
    "ema_alpha": fraction,
    "vanish_ratio": st.one_of(st.none(), positive, st.sampled_from([1, 1.0, 1.0000001, 2])),
    "vanish_floor": st.one_of(st.none(), positive),
    "patience": count,
    "dead_patience": count,
    "episode_gap": count,
    "crash_dump": flag,
    "dump_dir": dump_dir,
    # AdaptiveClipper
    "mode": st.sampled_from(["norm", "value", "percentile", "zscore", "agc", "Norm", "zscore ", "auto", "", "clip"]),
    "clip_value": st.one_of(st.none(), positive),
    "percentile": st.one_of(
        st.none(), _floats(0.0, 100.0), st.sampled_from([0, 100, 50, 1e-300, 100.00000000000001, -0.0, 101])
    ),
    "window": st.one_of(st.none(), count),
    "z_threshold": st.one_of(st.none(), positive),
    "ema_decay": st.one_of(st.none(), fraction),
    "agc_clipping": st.one_of(st.none(), positive),
    "agc_eps": st.one_of(st.none(), positive),
    "agc_exclude": st.one_of(st.none(), agc_exclude),
    "warmup_max_norm": st.one_of(st.none(), positive),
    "min_norm": st.one_of(st.none(), positive),
    "skip_factor": st.one_of(st.none(), positive, st.sampled_from([1, 1.0, 1.0000001, 0.5])),
    "warmup_factor": st.one_of(st.none(), positive, st.just(math.inf)),
    "skip_limit": st.one_of(st.none(), count),
    "growth_total": st.one_of(st.none(), positive, st.sampled_from([1, 1.0, 1.0000001, 2])),
    "growth_step": st.one_of(positive, st.sampled_from([1, 1.0, 1.0000001, 0.5])),
    "dead_unit_share": st.one_of(st.none(), fraction),
    "defer_host_read": st.sampled_from([True, False, "auto", "Auto", 1, 0, None, "yes"]),
    # AmpUnscaleCheck
    "max_skip_rate": fraction,
    "skip_rate_window": count,
    "track_underflow": flag,
    "underflow_rise": fraction,
    "fix_scaled_clipping": flag,
}


def plausible(name: str) -> st.SearchStrategy[Any]:
    if name not in PLAUSIBLE:
        raise KeyError(f"no strategy for argument {name!r}: add one to PLAUSIBLE in {__file__}")
    return PLAUSIBLE[name]


def any_value(name: str) -> st.SearchStrategy[Any]:
    """Hostile or plausible: what a test throws at argument ``name``."""
    return st.one_of(hostile, plausible(name))


def kwargs_of(cls: type, value: Callable[[str], st.SearchStrategy[Any]], max_size: int = 3) -> st.SearchStrategy:
    """A random non-empty subset of ``cls``'s arguments, each with a value from ``value(name)``."""
    names = keyword_arguments(cls)
    return st.lists(st.sampled_from(names), min_size=1, max_size=max_size, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: value(n) for n in chosen})
    )


#: AdaptiveClipper: the arguments each mode takes (docstring), and the one it requires
LEARNED = {"warmup_steps", "warmup_max_norm", "warmup_factor", "max_norm", "min_norm", "skip_factor", "skip_limit"}
MODE_ARGS = {
    "norm": {"max_norm"},
    "value": {"clip_value"},
    "percentile": {"percentile", "window", *LEARNED},
    "zscore": {"z_threshold", "ema_decay", *LEARNED},
    "agc": {"agc_clipping", "agc_eps", "agc_exclude", "warmup_steps", "warmup_max_norm", "max_norm"},
}
MODE_REQUIRES = {"norm": "max_norm", "value": "clip_value"}


def complete(cls: type, kwargs: dict[str, Any], choose: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """``kwargs`` with the companions its arguments need to be accepted (a ``group_by``, a mode, its required bound).

    ``choose`` picks one of several fitting options (a hypothesis draw, or the first).
    """
    kwargs = dict(kwargs)
    names = keyword_arguments(cls)
    if "group_by" in names:
        if "group_by" not in kwargs and kwargs.get("group_depth") is not None:
            kwargs["group_by"] = "depth"
        if "group_by" not in kwargs and kwargs.get("group_patterns") is not None:
            kwargs["group_by"] = "pattern"
        if kwargs.get("group_by") == "depth" and "group_depth" not in kwargs:
            kwargs["group_depth"] = choose([2, 1, 3])
        if kwargs.get("group_by") == "pattern" and "group_patterns" not in kwargs:
            kwargs["group_patterns"] = {"first": r"^net\.0\."}
    if cls is AdaptiveClipper:
        given_args = {n for n, v in kwargs.items() if v is not None and n not in ("mode", "log_every_n_steps")}
        if "mode" not in kwargs:
            modes = [m for m, accepted in MODE_ARGS.items() if given_args <= accepted]
            modes.sort(key=lambda m: m != "zscore")  # the default mode first
            if modes:
                kwargs["mode"] = choose(modes)
        required = MODE_REQUIRES.get(kwargs["mode"]) if isinstance(kwargs.get("mode"), str) else None
        if required and kwargs.get(required) is None:
            kwargs[required] = choose([1.0, 0.5, 10.0])
    return kwargs


#: every argument gets each of these, deterministically (random draws may miss a single value)
EDGE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    *HUGE_INTS,
    *SPECIAL_FLOATS,
    0.5,
    "",
    "(",
    "module",
    "warn",
    b"net",
    [],
    (),
    {},
    ["^net"],
    [("first", "^net")],
    {"first": "^net"},
    object(),
    Path("some/where"),
    0.5j,
    torch.tensor(1.0),
    torch.tensor([1.0, 2.0]),
)
#: argument-specific edges, on top of :data:`EDGE_VALUES`
ARG_EDGES: dict[str, tuple[Any, ...]] = {
    "group_patterns": (
        {"first": b"net"},
        {"first": re.compile(r"^net\.0\.")},
        {"first": re.compile(rb"net")},
        {"other": r"^net\.0\."},
        {"total": "net"},
        {"a/b": "net", "c d": r"\.bias$"},
        {"first": "("},
        {"first": None},
        {1: "net"},
        {"first": r"^nothing_matches$"},
    ),
    "agc_exclude": ([b"net"], [re.compile("net")], ["("], [r"^nothing_matches$"], [""], "net", (r"^net\.6\.",)),
    "dump_dir": (Path(tempfile.gettempdir()) / "gradguard-test-dumps", b"/tmp/gradguard-test-dumps"),
    "group_depth": (1, 3, 50),
    "percentile": (100, 100.0, 1e-300, 99.99999999999999),
    "ema_alpha": (1e-300, 0.9999999999999999),
    "ema_decay": (1e-300, 0.9999999999999999),
    "max_skip_rate": (1, 1.0, 1e-300),
    "underflow_rise": (1, 1.0, 1e-300),
    "vanish_ratio": (1.0000000000000002,),
    "skip_factor": (1.0000000000000002,),
    "mode": tuple(MODE_ARGS),
    "hook": ("on_before_optimizer_step", "on_after_backward"),
    "group_by": ("module", "parameter", "depth", "pattern", "total"),
    "nonfinite_action": ("skip", "stop", "raise"),
    **{name: ("warn", "skip", "stop", "raise") for name in ("explode_action", "vanish_action", "dead_action")},
}


#: edges that behave like another one in a fit (same int64/float range), left out there to save time
SAME_IN_A_FIT = {2**63 - 1, 10**18, 1.7976931348623157e308, 1e-300}


def edge_values(name: str, *, for_fit: bool = False) -> tuple[Any, ...]:
    values = EDGE_VALUES + ARG_EDGES.get(name, ())
    if for_fit:
        values = tuple(v for v in values if not (type(v) in (int, float) and v in SAME_IN_A_FIT))
    return values


# --------------------------------------------------------------------------------------
# The promise, as a check
# --------------------------------------------------------------------------------------


def show(kwargs: dict[str, Any]) -> str:
    """``kwargs`` as a call would spell them, ints too long to read written as powers of ten."""

    def one(value: Any) -> str:
        if type(value) is int and abs(value) > 10**30:
            return f"{'-' if value < 0 else ''}10**{len(str(abs(value))) - 1}"
        return repr(value)

    return ", ".join(f"{name}={one(value)}" for name, value in kwargs.items())


def _names(message: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) is not None


def construct(cls: type, kwargs: dict[str, Any]) -> Any | None:
    """The callback, or ``None`` when it is refused as promised; anything else fails the test."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(_names(message, name) for name in kwargs), (
            f"{cls.__name__}({show(kwargs)}) raised {type(err).__name__} whose message names none of "
            f"{sorted(kwargs)}: {message!r}"
        )
        return None
    except Exception as err:
        raise AssertionError(
            f"{cls.__name__}({show(kwargs)}) raised {type(err).__name__} (only ValueError/TypeError naming the "
            f"argument may escape the constructor): {err}"
        ) from err


def fit(callbacks: list[Any], *, fp16: bool = False, max_steps: int = 3) -> Trainer:
    """A short real ``Trainer.fit`` on CPU, logging to TensorBoard in a temporary folder."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(
            tmp,
            callbacks,
            logger=TensorBoardLogger(tmp, name="tb"),
            max_steps=max_steps,
            plugins=[fp16_cpu_plugin()] if fp16 else None,
        )
        trainer.fit(RecordingMLP(), loader())
    return trainer


# --------------------------------------------------------------------------------------
# Coverage of the signatures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_every_argument_has_a_strategy(cls: type) -> None:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert not positional, f"{cls.__name__}: arguments {positional} are not keyword-only"
    missing = [name for name in keyword_arguments(cls) if name not in PLAUSIBLE]
    assert not missing, f"{cls.__name__}: no strategy for {missing}; add them to PLAUSIBLE"
    cls()  # the defaults are accepted


# --------------------------------------------------------------------------------------
# Construction: accept, or refuse naming the argument
# --------------------------------------------------------------------------------------

CASES = [(cls, name) for cls in CALLBACKS for name in keyword_arguments(cls)]


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}-{n}" for c, n in CASES])
@CONSTRUCT
@given(data=st.data())
def test_one_argument_is_accepted_or_refused_by_name(cls: type, name: str, data: st.DataObject) -> None:
    value = data.draw(any_value(name), label=name)
    construct(cls, {name: value})


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}-{n}" for c, n in CASES])
def test_edge_values_are_accepted_or_refused_by_name(cls: type, name: str) -> None:
    failures = []
    for value in edge_values(name):
        alone = {name: value}
        completed = complete(cls, alone, lambda options: options[0])  # with the mode / group_by it needs
        for kwargs in [alone] if completed.keys() == alone.keys() else [alone, completed]:
            try:
                construct(cls, kwargs)
            except AssertionError as err:
                failures.append(str(err).split("\n")[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
@CONSTRUCT_COMBINED
@given(data=st.data())
def test_arguments_together_are_accepted_or_refused_by_name(cls: type, data: st.DataObject) -> None:
    kwargs = data.draw(kwargs_of(cls, any_value), label="kwargs")
    construct(cls, kwargs)


# --------------------------------------------------------------------------------------
# Accepted values work in a real fit
# --------------------------------------------------------------------------------------


@st.composite
def fit_kwargs(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    """1-3 plausible arguments, with the companions they need to be accepted."""
    return complete(cls, draw(kwargs_of(cls, plausible)), lambda options: draw(st.sampled_from(options)))


def fit_works(callback: Any, kwargs: dict[str, Any], fp16: bool) -> str | None:
    """``None`` when a short fit with ``callback`` finishes (or raises a legitimate finding), else what went wrong."""
    try:
        fit([callback], fp16=fp16)
    except GradientAnomalyError as err:
        # a legitimate finding under action "raise" (a tight threshold on a healthy model)
        kind = getattr(err.finding, "kind", None)
        if isinstance(callback, VanishExplodeAlarm) and callback.actions.get(kind) == "raise":
            return None
        return f"{type(callback).__name__}({show(kwargs)}) raised {err!r} in fit"
    except Exception as err:
        return (
            f"{type(callback).__name__}({show(kwargs)}) was accepted but Trainer.fit(fp16={fp16}) failed with "
            f"{type(err).__name__}: {err}"
        )
    return None


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
@FIT
@given(data=st.data())
def test_accepted_arguments_work_in_a_real_fit(cls: type, data: st.DataObject) -> None:
    kwargs = data.draw(fit_kwargs(cls), label="kwargs")
    callback = construct(cls, kwargs)
    assume(callback is not None)
    # AmpUnscaleCheck is idle without an fp16 GradScaler: run it (and sometimes the others) under real fp16
    fp16 = cls is AmpUnscaleCheck or data.draw(st.booleans(), label="fp16")
    problem = fit_works(callback, kwargs, fp16)
    assert problem is None, problem


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}-{n}" for c, n in CASES])
def test_accepted_edge_values_work_in_a_real_fit(cls: type, name: str) -> None:
    failures = []
    accepted = 0
    for value in edge_values(name, for_fit=True):
        kwargs = complete(cls, {name: value}, lambda options: options[0])
        try:
            callback = construct(cls, kwargs)
        except AssertionError:
            continue  # reported by test_edge_values_are_accepted_or_refused_by_name
        if callback is None:
            continue
        # one fit per value (time): fp32 and real fp16 in turn; AmpUnscaleCheck is idle without fp16
        fp16 = cls is AmpUnscaleCheck or accepted % 2 == 1
        accepted += 1
        problem = fit_works(callback, kwargs, fp16)
        if problem is not None:
            failures.append(problem.split("\n")[0])
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------
# Two callbacks that differ in one setting fit in one Trainer
# --------------------------------------------------------------------------------------

STATE_KEY_CASES: list[tuple[type, dict[str, Any], str, Any, Any]] = [
    (AdaptiveClipper, {}, "max_norm", 5.0, 6.0),
    (AdaptiveClipper, {}, "skip_factor", 2.0, 3.0),
    (AdaptiveClipper, {}, "warmup_max_norm", 1.0, 2.0),
    (AdaptiveClipper, {}, "min_norm", 0.1, 0.2),
    (AdaptiveClipper, {}, "log_every_n_steps", 1, 2),
    (AdaptiveClipper, {}, "warmup_steps", 2, 3),
    (AdaptiveClipper, {"mode": "percentile"}, "window", 10, 20),
    (AdaptiveClipper, {"mode": "agc"}, "agc_exclude", [r"^net\.0\."], [r"^net\.6\."]),
    (VanishExplodeAlarm, {}, "spike_zscore", 8.0, 9.0),
    (VanishExplodeAlarm, {}, "max_norm", 1e6, 1e7),
    (VanishExplodeAlarm, {}, "ema_alpha", 0.05, 0.1),
    (VanishExplodeAlarm, {}, "patience", 20, 21),
    (VanishExplodeAlarm, {}, "explode_action", "warn", "skip"),
    (VanishExplodeAlarm, {}, "episode_gap", 10, 11),
    (VanishExplodeAlarm, {}, "group_by", "module", "parameter"),
    (VanishExplodeAlarm, {}, "log_every_n_steps", 1, 2),
    (AmpUnscaleCheck, {}, "skip_rate_window", 10, 20),
]


@pytest.mark.parametrize(
    ("cls", "base", "name", "first", "second"),
    STATE_KEY_CASES,
    ids=[f"{c.__name__}-{n}" for c, _, n, _, _ in STATE_KEY_CASES],
)
def test_callbacks_differing_in_one_argument_fit_in_one_trainer(
    cls: type, base: dict[str, Any], name: str, first: Any, second: Any
) -> None:
    a, b = cls(**base, **{name: first}), cls(**base, **{name: second})
    assert a.state_key != b.state_key, (
        f"{cls.__name__}s differing only in {name} ({first!r} vs {second!r}) share state_key {a.state_key!r}: "
        "Lightning refuses them together and a checkpoint would mix their states"
    )
    trainer = fit([a, b], fp16=cls is AmpUnscaleCheck, max_steps=2)
    assert trainer.global_step == 2
