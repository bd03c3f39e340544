"""JSON read exactly as served: every value intact, each array element's own bytes.

The API serialises with JavaScript's `JSON.stringify`, which emits integer
literals beyond 64 bits (a seed near 2**64) and lone surrogate escapes (a prompt
cut inside an emoji). orjson turns the first into a float without a word and
refuses the second; re-serialising what it parsed would change what was served.
So an item is never re-serialised: its line in the archive is its own bytes from
the response, and the parsed value is only read (id, guard keys).

Two paths give the same result. The fast one parses with orjson and accepts the
parse only when serialising it back reproduces the served bytes exactly, which
is what the API's compact output almost always is. Anything else (big integers,
surrogates, whitespace, another key order) takes the exact path: the standard
library's C scanner, element by element, which keeps integers exact, accepts
lone surrogates and reports where each element ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import orjson

# The C scanner: one value from a position, and where it ends.
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_SPACE = re.compile(r"[ \t\n\r]*")
_dump = orjson.dumps
_dump_line = functools.partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)


class NotJson(ValueError):
    """The bytes are not the JSON shape asked for; the reason is one line."""


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a JSON array: its value, and its bytes as one NDJSON line."""

    value: Any
    line: bytes  # the element's own bytes, line breaks between tokens removed, plus b"\n"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A JSON object whose array under one key was split into elements."""

    fields: dict[str, Any]  # every other key's value
    elements: list[Element] | None  # None when the key is absent or not an array


def loads(data: bytes | str) -> Any:
    """A JSON value with every number exact and lone surrogates kept; raises NotJson."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _loads_exact(data)
    if _lossless(value):
        return value
    return _loads_exact(data)


def member_bytes(data: bytes, key: str) -> bytes | None:
    """The bytes of the value under `key` in the JSON object `data`, exactly as written.

    None when the key is absent; of duplicate keys the last wins, as in any parser.
    Raises NotJson for anything that is not a JSON object.
    """
    with _scanning():
        return _Splitter(_text(data), key).member()


def split_object(body: bytes, key: str) -> Envelope:
    """`body` as an object whose `key` holds an array, each element with its own bytes.

    Raises NotJson for anything that is not a JSON object.
    """
    fast = _split_fast(body, key)
    return fast if fast is not None else _split_exact(body, key)


# -- the fast path -------------------------------------------------------------------


def _split_fast(body: bytes, key: str) -> Envelope | None:
    """orjson's parse, when the served array is byte for byte what orjson would write."""
    try:
        whole = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(whole, dict) or not isinstance(array := whole.get(key), list):
        return None
    head = b'{"' + key.encode() + b'":'
    # Equal bytes mean equal values: no float stood in for a big integer, nothing was dropped.
    if not body.startswith(head) or not body.startswith(_dump(array), len(head)):
        return None
    fields = {k: v for k, v in whole.items() if k != key}
    return Envelope(fields, [Element(v, _dump_line(v)) for v in array])


def _lossless(value: Any) -> bool:
    """No float in `value` could be an integer beyond 64 bits that orjson turned into one."""
    if isinstance(value, float):
        return not (abs(value) >= 2**63 and value.is_integer())
    if isinstance(value, dict):
        return all(map(_lossless, value.values()))
    if isinstance(value, list):
        return all(map(_lossless, value))
    return True


# -- the exact path ------------------------------------------------------------------


def _text(data: bytes | str) -> str:
    try:
        return data if isinstance(data, str) else data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotJson(f"not UTF-8 (bad byte at offset {exc.start})") from None


def _loads_exact(data: bytes | str) -> Any:
    text = _text(data)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise NotJson(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _split_exact(body: bytes, key: str) -> Envelope:
    with _scanning():
        return _Splitter(_text(body), key).envelope()


@contextlib.contextmanager
def _scanning() -> Iterator[None]:
    """The scanner's errors (StopIteration at a position, ValueError, RecursionError) as NotJson."""
    try:
        yield
    except StopIteration as stop:
        raise NotJson(f"invalid JSON at character {stop.value}") from None
    except NotJson:
        raise
    except (ValueError, RecursionError) as exc:
        raise NotJson(_reason(exc)) from None


class _Splitter:
    """Walks one object's keys; the array under `key` is scanned element by element."""

    def __init__(self, text: str, key: str) -> None:
        self.text, self.key, self.at = text, key, 0

    def envelope(self) -> Envelope:
        fields: dict[str, Any] = {}
        elements: list[Element] | None = None
        self._expect("{")
        if not self._take("}"):
            while True:
                name = self._name()
                if name == self.key and self._peek() == "[":
                    elements = self._array()
                    fields.pop(name, None)
                else:
                    fields[name], self.at = _scan(self.text, self.at)
                    if name == self.key:
                        elements = None  # a later duplicate key wins, as in any parser
                if self._take("}"):
                    break
                self._expect(",")
        self._skip()
        if self.at != len(self.text):
            raise NotJson(f"extra data after the object at character {self.at}")
        return Envelope(fields, elements)

    def member(self) -> bytes | None:
        found: str | None = None
        self._expect("{")
        if not self._take("}"):
            while True:
                name = self._name()
                start = self.at
                _, self.at = _scan(self.text, start)
                if name == self.key:
                    found = self.text[start : self.at]
                if self._take("}"):
                    break
                self._expect(",")
        self._skip()
        if self.at != len(self.text):
            raise NotJson(f"extra data after the object at character {self.at}")
        return None if found is None else found.encode("utf-8")

    def _name(self) -> str:
        self._skip()
        if self.text[self.at : self.at + 1] != '"':
            raise NotJson(f"expected a key at character {self.at}")
        name, self.at = scanstring(self.text, self.at + 1)
        self._expect(":")
        self._skip()
        return str(name)

    def _array(self) -> list[Element]:
        self.at += 1
        elements: list[Element] = []
        if self._take("]"):
            return elements
        while True:
            self._skip()
            start = self.at
            value, self.at = _scan(self.text, start)
            elements.append(Element(value, _line(self.text[start : self.at])))
            if self._take("]"):
                return elements
            self._expect(",")

    def _skip(self) -> None:
        self.at = _SPACE.match(self.text, self.at).end()  # type: ignore[union-attr]

    def _peek(self) -> str:
        self._skip()
        return self.text[self.at : self.at + 1]

    def _take(self, char: str) -> bool:
        if self._peek() == char:
            self.at += 1
            return True
        return False

    def _expect(self, char: str) -> None:
        if not self._take(char):
            raise NotJson(f"expected {char!r} at character {self.at}")


def _line(raw: str) -> bytes:
    """An element's bytes as one line. Raw line breaks cannot occur inside JSON strings,
    so any here sit between tokens, where removing them changes no value."""
    if "\n" in raw or "\r" in raw:
        raw = raw.replace("\r", "").replace("\n", "")
    return raw.encode("utf-8") + b"\n"
