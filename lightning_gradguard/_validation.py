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

__all__ = ["boolean", "choice", "grouping", "integer", "number", "path", "patterns"]

T = TypeVar("T")


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

    Args:
        name: the argument's name, quoted in the message.
        value: what was given.
        low, high: the bounds (``None``: unbounded on that side).
        low_inclusive, high_inclusive: whether each bound itself is allowed.
        allow_none: whether ``None`` is allowed.
    """
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        allowed = _describe("a finite number", low, high, low_inclusive, high_inclusive, allow_none)
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return float(value)


def integer(name: str, value: Any, *, low: int = 1, allow_none: bool = False) -> int | None:
    """An ``int`` (not a bool) >= ``low`` (``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"`{name}` must be {_describe('an integer', low, None, True, True, allow_none)}, got {value!r}."
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
    out = []
    for pattern in value:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` entries must be strings (regular expressions), got {pattern!r}.")
        try:
            out.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"`{name}` entry {pattern!r} is not a valid regular expression: {err}") from None
    return out


#: Allowed values of ``group_by``.
GROUP_BY_CHOICES = ("module", "parameter", "depth", "pattern", "total")
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
            try:
                compiled.append((label, re.compile(pattern)))
            except (re.error, TypeError) as err:
                raise ValueError(
                    f"`group_patterns[{label!r}]` must be a valid regular expression, got {pattern!r}: {err}"
                ) from None
    elif group_patterns is not None:
        raise ValueError(f"`group_patterns` is only used with `group_by='pattern'`, got group_by={group_by!r}.")
    return group_by, group_depth, (dict(group_patterns) if group_patterns is not None else None), compiled


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
