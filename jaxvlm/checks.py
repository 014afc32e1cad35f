"""Value rules for config fields: each settings dataclass checks its own fields with them, and a failure names the
field, so `jaxvlm.configuration` can report it under its full key path (`config.stages.sft.optimizer.eps: ...`).

A rule is a function of the value returning None when the value is fine, else what it must be ("must be >= 1").
Integer rules reject bools and floats (64.5 is never truncated to 64) and values above 2**31 - 1; number rules
reject NaN and infinities.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

Rule = Callable[[Any], "str | None"]


class FieldError(ValueError):
    """A field's value breaks its rule. `field` is the field's name (or a dotted path below the checked object)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _in_range(x, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (x <= lo if lo_open else x < lo):
        return False
    return not (hi is not None and (x >= hi if hi_open else x > hi))


INT32_MAX = 2**31 - 1  # sizes become int32 array shapes and indices, seeds 32-bit keys


def integer(lo: int | None = None, hi: int | None = INT32_MAX) -> Rule:
    """An int (not a bool, not a float) in [lo, hi] (by default at most INT32_MAX: a larger count or seed could
    only fail later, inside the run)."""
    text = _range_text(lo, None if hi == INT32_MAX else hi, False, False)

    def rule(x):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            return f"must be an integer{' ' + text if text else ''}, got {x!r}"
        if hi == INT32_MAX and x > hi:
            return f"must be <= {hi} (2**31 - 1), got {x!r}"
        if not _in_range(x, lo, hi, False, False):
            return f"must be {text}, got {x!r}"
        return None

    return rule


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite real number (ints allowed, bools not) in the given range (open ends with `lo_open` / `hi_open`)."""
    text = _range_text(lo, hi, lo_open, hi_open)

    def rule(x):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            return f"must be a finite number{' ' + text if text else ''}, got {x!r}"
        if not _in_range(x, lo, hi, lo_open, hi_open):
            return f"must be {text}, got {x!r}"
        return None

    return rule


def one_of(*choices) -> Rule:
    def rule(x):
        return None if isinstance(x, type(choices[0])) and x in choices else f"must be one of {choices}, got {x!r}"

    return rule


def boolean(x) -> str | None:
    return None if isinstance(x, bool) else f"must be True or False, got {x!r}"


def text(x) -> str | None:
    return None if isinstance(x, str) else f"must be a string, got {x!r}"


def optional(rule: Rule) -> Rule:
    """None, or a value `rule` accepts."""

    def check(x):
        if x is None:
            return None
        message = rule(x)
        return None if message is None else f"{message} (or None)"

    return check


def sequence_of(rule: Rule) -> Rule:
    """A list or tuple whose every element `rule` accepts."""

    def check(x):
        if not isinstance(x, (list, tuple)):
            return f"must be a list, got {x!r}"
        for k, item in enumerate(x):
            message = rule(item)
            if message is not None:
                return f"entry [{k}] {message}"
        return None

    return check


def check_fields(values: Any, rules: Mapping[str, Rule]) -> None:
    """Apply `rules` to the fields of `values` (a mapping or an object with attributes); FieldError on the first
    failure."""
    for field, rule in rules.items():
        value = values[field] if isinstance(values, Mapping) else getattr(values, field)
        message = rule(value)
        if message is not None:
            raise FieldError(field, message)
