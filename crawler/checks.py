"""Value checks shared by the config loader and the endpoint specs: one `Invalid` per problem.

Each check takes a value as TOML gave it and returns it checked (and, for the
API's parameters, wire-ready), or raises `Invalid` with one line saying what was
expected and what came instead. `at` adds where the value lives as the error
unwinds, so the caller that knows the whole path can report it.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class Invalid(Exception):
    """A problem found deep down; `at` grows as it unwinds to where the value lives."""

    def __init__(self, reason: str, at: str = "") -> None:
        super().__init__(reason, at)
        self.reason, self.at = reason, at


@contextmanager
def at(prefix: str) -> Iterator[None]:
    """Prefix the location of any `Invalid` raised inside with `prefix`."""
    try:
        yield
    except Invalid as error:
        raise Invalid(error.reason, prefix + error.at) from None


# Order matters: bool is an int, datetime is a date.
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (dt.datetime, "datetime"),
    (dt.date, "date"),
    (dt.time, "time"),
)


def show(value: Any) -> str:
    """The value as TOML spells it, escaped and cut short so the message stays one line."""
    if isinstance(value, list):
        text = "[" + ", ".join(map(show, value)) + "]"
    elif isinstance(value, (bool, str)):
        text = json.dumps(value, ensure_ascii=False)  # JSON's true/false and "..." are TOML's too
    else:
        text = "{...}" if isinstance(value, dict) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def got(value: Any) -> str:
    """`got <value> (<TOML type>)`, the tail of every type or range complaint."""
    kind = next((name for cls, name in _TOML_TYPES if isinstance(value, cls)), type(value).__name__)
    return f"got {show(value)} ({kind})"


def quoted(words: Iterable[str]) -> str:
    """`"a", "b", "c"`."""
    return ", ".join(f'"{word}"' for word in words)


def suggest(word: str, choices: Iterable[str]) -> str:
    """`; did you mean "X"?` for the nearest choice, case-insensitively, or nothing."""
    by_fold = {choice.casefold(): choice for choice in choices}
    close = difflib.get_close_matches(word.casefold(), list(by_fold), n=1)
    return f'; did you mean "{by_fold[close[0]]}"?' if close else ""


def is_int(value: Any) -> bool:
    """An integer and not a bool (TOML's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(value: Any, low: int, high: int | None = None) -> int:
    """An integer from `low` to `high` (inclusive; no upper bound without one)."""
    if is_int(value) and value >= low and (high is None or value <= high):
        return int(value)
    wanted = (
        f"an integer from {low} to {high}"
        if high is not None
        else "a positive integer"
        if low == 1
        else f"an integer >= {low}"
    )
    raise Invalid(f"expected {wanted}, {got(value)}")


def positive_number(value: Any) -> float:
    """A finite number > 0, as a float."""
    if (is_int(value) or isinstance(value, float)) and 0 < value < math.inf:
        return float(value)
    raise Invalid(f"expected a number > 0, {got(value)}")


def at_least(value: Any, low: float) -> float:
    """A finite number >= `low`, as a float."""
    if (is_int(value) or isinstance(value, float)) and low <= value < math.inf:
        return float(value)
    raise Invalid(f"expected a number >= {low:g}, {got(value)}")


def non_negative(value: Any) -> float:
    """A finite number >= 0, as a float."""
    if (is_int(value) or isinstance(value, float)) and 0 <= value < math.inf:
        return float(value)
    raise Invalid(f"expected a number >= 0, {got(value)}")


def text(value: Any) -> str:
    """A string with something besides whitespace in it, unchanged."""
    if isinstance(value, str) and value.strip():
        return value
    raise Invalid(f"expected a non-empty string, {got(value)}")


def one_of(choices: tuple[str, ...], value: Any) -> str:
    """One of `choices`, spelled exactly (with a suggestion when only the case or a letter is off)."""
    if not isinstance(value, str):
        raise Invalid(f"expected one of {quoted(choices)}, {got(value)}")
    if value not in choices:
        raise Invalid(f"{show(value)} is not one of {quoted(choices)}{suggest(value, choices)}")
    return value


def each(values: list[Any], check: Callable[[Any], str]) -> tuple[str, ...]:
    """Checks every item, naming the bad one; drops repeats, keeps order."""
    out: dict[str, None] = {}
    for index, value in enumerate(values, 1):
        with at(f"[{index}]"):
            out[check(value)] = None
    return tuple(out)
