"""Property tests: items are kept exactly as served, and no bytes crash the reader."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crawler.exactjson import NotJson, loads, member_bytes, split_object

LONE_SURROGATES = st.sampled_from(["\ud83d", "\udc00", "a\ud83dz"])
TEXT = st.one_of(st.text(max_size=20), LONE_SURROGATES, st.just('\x00\n\u2028"\\'))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=30,
)
ITEM = st.builds(lambda i, rest: {"id": i, "rest": rest}, st.integers(1, 2**62), VALUES)
ITEMS = st.lists(ITEM, max_size=5)


def node_stringify(value: Any) -> bytes:
    """What JSON.stringify sends: compact, lone surrogates as \\u escapes, integers as literals."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()


def served(items: list[Any], style: str) -> bytes:
    envelope = {"items": items, "metadata": {"nextCursor": "200|1"}}
    if style == "orjson":
        try:
            return orjson.dumps(envelope)
        except (TypeError, orjson.JSONEncodeError):
            return node_stringify(envelope)
    if style == "pretty":
        return json.dumps(envelope, ensure_ascii=True, indent=2).encode()
    return node_stringify(envelope)


@settings(max_examples=300, deadline=None)
@given(ITEMS, st.sampled_from(["node", "orjson", "pretty"]))
def test_every_item_round_trips_value_exact(items: list[Any], style: str) -> None:
    envelope = split_object(served(items, style), "items")
    assert envelope.elements is not None
    assert [json.loads(e.line) for e in envelope.elements] == items
    assert [e.value for e in envelope.elements] == items
    assert all(e.line.count(b"\n") == 1 and e.line.endswith(b"\n") for e in envelope.elements)
    assert envelope.fields == {"metadata": {"nextCursor": "200|1"}}
    assert [loads(e.line) for e in envelope.elements] == items


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        split_object(data, "items")
    except NotJson as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize(
    "body",
    [
        b'{"items":[{"id":1,"seed":18446744073709552000}]}',
        b'{"items":[{"id":1,"seed":123456789012345678901234567890}]}',
        b'{"items":[{"id":1,"prompt":"cut \\ud83d"}]}',
    ],
)
def test_node_literals_are_written_as_served(body: bytes) -> None:
    envelope = split_object(body, "items")
    assert envelope.elements is not None
    assert envelope.elements[0].line == body[len(b'{"items":[') : -2] + b"\n"


def test_deep_nesting_is_refused_not_crashed() -> None:
    with pytest.raises(NotJson, match="deeply"):
        split_object(b'{"items":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "items")


@settings(max_examples=300, deadline=None)
@given(VALUES, VALUES, st.sampled_from(["node", "pretty"]))
def test_member_bytes_are_the_value_as_written(meta: Any, other: Any, style: str) -> None:
    item = {"id": 1, "other": other, "meta": meta, "after": [other]}
    text = node_stringify(item) if style == "node" else json.dumps(item, ensure_ascii=True, indent=1).encode()
    raw = member_bytes(text, "meta")
    assert raw is not None and json.loads(raw) == meta
    assert raw in text  # a slice of what was written, not a re-serialisation
    assert member_bytes(text, "absent") is None


def test_member_bytes_keep_node_literals_and_take_the_last_duplicate() -> None:
    line = b'{"id":1, "meta" : { "seed": 18446744073709552000, "p":"\\ud83d" } ,"x":2}\n'
    assert member_bytes(line, "meta") == b'{ "seed": 18446744073709552000, "p":"\\ud83d" }'
    assert member_bytes(b'{"meta":1,"meta":[2]}', "meta") == b"[2]"
    for bad in (b"[1]", b'{"meta":1', b'{"meta":1} x', b"\xff"):
        with pytest.raises(NotJson):
            member_bytes(bad, "meta")
