"""Every argument check of lightning_gradguard, written once.

Each function takes the argument's name and value, returns the value in its normal form
(a float for a number, a list of compiled patterns, ...) and raises ``ValueError`` whose
message names the argument, shows the value and says what is allowed. Callbacks and the
Trainer-free classes (learned thresholds, AGC, the detector) call the same functions, so
a range is stated in one place.

Example:
    >>> number("percentile", 150.0, low=0.0, high=100.0)
    Traceback (most recent call last):
    ...
    ValueError: `percentile` must be a finite number in (0.0, 100.0], got 150.0.
    >>> choice("mode", "zscore", ("norm", "zscore"))
    'zscore'
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["boolean", "choice", "grouping", "integer", "number", "path", "patterns", "regex"]

T = TypeVar("T")


#: the largest finite float32: thresholds and statistics live in float32 tensors
FLOAT32_MAX = 3.4028234663852886e38
#: the default upper bound of a count (steps, a window): larger is refused, not allocated
MAX_COUNT = 10**9
#: the upper bound of a count that sizes a buffer (a window of steps kept on the device)
MAX_WINDOW = 10**6


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    """A finite real number within the bounds (``None`` where allowed), returned as ``float``.

    Numbers beyond float32's range (``|x| > 3.4e38``, e.g. ``1e308`` or ``10**400``) are
    refused: every threshold ends up in a float32 tensor.

    Args:
        name: the argument's name, quoted in the message.
        value: what was given.
        low, high: the bounds (``None``: unbounded on that side).
        low_inclusive, high_inclusive: whether each bound itself is allowed.
        allow_none: whether ``None`` is allowed.
    """
    if value is None and allow_none:
        return None
    as_float = _as_float(value)
    ok = as_float is not None and math.isfinite(as_float)
    if ok and low is not None:
        ok = as_float >= low if low_inclusive else as_float > low
    if ok and high is not None:
        ok = as_float <= high if high_inclusive else as_float < high
    if not ok:
        allowed = _describe("a finite number", low, high, low_inclusive, high_inclusive, allow_none)
        raise ValueError(f"`{name}` must be {allowed}, got {_show(value)}.")
    if abs(as_float) > FLOAT32_MAX:
        raise ValueError(f"`{name}` must fit float32 (|x| <= {FLOAT32_MAX:.3g}), got {_show(value)}.")
    return as_float


def integer(name: str, value: Any, *, low: int = 1, high: int = MAX_COUNT, allow_none: bool = False) -> int | None:
    """An ``int`` (not a bool) in ``[low, high]`` (``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"`{name}` must be {_describe('an integer', low, high, True, True, allow_none)}, got {_show(value)}."
        )
    return value


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False``, nothing else (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def choice(name: str, value: Any, choices: Sequence[T]) -> T:
    """One of ``choices``."""
    if isinstance(value, str) and value in choices:
        return value  # type: ignore[return-value]
    if not isinstance(value, str) and any(value is c for c in choices):
        return value
    raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def path(name: str, value: Any, *, allow_none: bool = True) -> str | None:
    """A filesystem path (``str`` or ``os.PathLike``), returned as ``str``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"`{name}` must be a path{' or None' if allow_none else ''}, got {value!r}.")
    return os.fspath(value)


def patterns(name: str, value: Any) -> list[re.Pattern[str]]:
    """A list of regular expressions (``None``: empty), compiled."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"`{name}` must be a list of regular expressions or None, got {value!r}.")
    return [regex(name, pattern, entry=f"entry {i}") for i, pattern in enumerate(value)]


def regex(name: str, value: Any, *, entry: str = "") -> re.Pattern[str]:
    """A regular expression over text: a ``str`` or a compiled ``str`` pattern (not bytes).

    ``entry`` says which part of the argument ``value`` is (``"entry 2"``), for the message.
    """
    what = f"`{name}` {entry}".rstrip()
    if isinstance(value, re.Pattern) and isinstance(value.pattern, str):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a regular expression given as a string, got {value!r}.")
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"{what} must be a valid regular expression, got {value!r}: {err}") from None


#: Allowed values of ``group_by``.
GROUP_BY_CHOICES = ("module", "parameter", "depth", "pattern", "total", "auto")
#: Group names a user pattern may not take (they are logged keys of their own).
RESERVED_GROUP_NAMES = frozenset({"total"})


def grouping(
    group_by: Any, group_depth: Any, group_patterns: Any
) -> tuple[str, int | None, dict[str, str] | None, list[tuple[str, re.Pattern[str]]]]:
    """The grouping arguments shared by every callback, checked together.

    Returns:
        ``(group_by, group_depth, group_patterns, compiled)`` where ``compiled`` lists
        ``(group name, regex)`` for ``group_by="pattern"``.
    """
    choice("group_by", group_by, GROUP_BY_CHOICES)
    if group_by == "depth":
        if isinstance(group_depth, bool) or not isinstance(group_depth, int) or group_depth < 1:
            raise ValueError(f"`group_depth` must be an integer >= 1 when `group_by='depth'`, got {group_depth!r}.")
    elif group_depth is not None:
        raise ValueError(f"`group_depth` is only used with `group_by='depth'`, got group_by={group_by!r}.")
    if group_patterns is not None and not isinstance(group_patterns, Mapping):
        raise ValueError(
            "`group_patterns` must be a mapping of group name to regular expression (e.g. "
            f"{{'encoder': '^encoder\\\\.'}}) or None, got {type(group_patterns).__name__} {group_patterns!r}."
        )
    compiled: list[tuple[str, re.Pattern[str]]] = []
    if group_by == "pattern":
        if not group_patterns:
            raise ValueError(
                "`group_patterns` must be a non-empty mapping of group name to regular expression "
                f"when `group_by='pattern'`, got {group_patterns!r}."
            )
        for label, pattern in group_patterns.items():
            if not isinstance(label, str) or not label or label in RESERVED_GROUP_NAMES:
                raise ValueError(
                    f"`group_patterns` keys must be non-empty strings other than {sorted(RESERVED_GROUP_NAMES)}, "
                    f"got {label!r}."
                )
            compiled.append((label, regex("group_patterns", pattern, entry=f"entry {label!r}")))
    elif group_patterns is not None:
        raise ValueError(f"`group_patterns` is only used with `group_by='pattern'`, got group_by={group_by!r}.")
    return group_by, group_depth, (dict(group_patterns) if group_patterns is not None else None), compiled


def _as_float(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool) that fits one, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float64's range
        return None


def _show(value: Any) -> str:
    """``repr(value)``, shortened for huge ints (``10**400`` has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:25]}...{text[-10:]} ({len(text)} characters)"


def _describe(
    what: str, low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool, allow_none: bool
) -> str:
    if low is not None and high is not None:
        what += f" in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    elif low is not None:
        what += f" {'>=' if low_inclusive else '>'} {low}"
    elif high is not None:
        what += f" {'<=' if high_inclusive else '<'} {high}"
    return what + (" or None" if allow_none else "")
