"""The images endpoint as one value: its parameters, pages, expansion, partitions, guards, frontier."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crawler import checks
from crawler.civitai.endpoint import Frontier, Page, WireParams
from crawler.civitai.images import IMAGES, LEVEL_BITS, LIST_KEYS, TYPES
from crawler.errors import ForeignItemsError, NotFoundError, OddItemError
from crawler.exactjson import NotJson

# ---------------------------------------------------------------- parameters


def invalid(table: dict[str, Any]) -> checks.Invalid:
    with pytest.raises(checks.Invalid) as caught:
        IMAGES.check_params(table)
    return caught.value


def test_params_come_out_wire_ready_sorted_with_the_default_limit() -> None:
    params = IMAGES.check_params(
        {"sort": "Newest", "postId": [3, 1, 3], "withMeta": True, "tags": " 4, 5 ", "nsfw": "Soft"}
    )
    assert params == (
        ("limit", "200"),
        ("nsfw", "Soft"),
        ("postId", ("3", "1")),
        ("sort", "Newest"),
        ("tags", "4,5"),
        ("withMeta", "true"),
    )
    assert IMAGES.check_params({"limit": 50, "browsingLevel": 31}) == (
        ("browsingLevel", "31"),
        ("limit", "50"),
    )


def test_bad_values_name_their_place() -> None:
    error = invalid({"postId": [1, "x"]})
    assert (error.at, error.reason) == (".postId[2]", 'expected a positive integer, got "x" (string)')
    error = invalid({"limit": 201})
    assert (error.at, error.reason) == (".limit", "expected an integer from 1 to 200, got 201 (integer)")
    assert invalid({"imageId": [1, 2]}).at == ".imageId"  # not a list key
    assert invalid({"postId": []}).reason == "expected a non-empty list, got [] (array)"
    assert 'did you mean "Newest"?' in invalid({"sort": "newest"}).reason


def test_refused_unknown_and_second_list() -> None:
    for key in ("page", "cursor"):
        error = invalid({key: 2})
        assert (error.at, error.reason) == (f".{key}", "the harvester walks cursors itself; remove it")
    error = invalid({"modelid": 1})
    assert (error.at, error.reason) == ("", 'unknown key "modelid"; did you mean "modelId"?')
    error = invalid({"postId": [1], "userId": [2, 3]})
    assert error.at == "" and error.reason.startswith('"postId" and "userId" are both lists')
    assert IMAGES.list_keys == LIST_KEYS and LIST_KEYS <= IMAGES.params.keys()


def test_each_listed_value_gets_its_own_parameter_set() -> None:
    params = IMAGES.check_params({"postId": [3, 1], "sort": "Oldest"})
    assert IMAGES.each_listed(params) == [
        (("limit", "200"), ("sort", "Oldest"), ("postId", "3")),
        (("limit", "200"), ("sort", "Oldest"), ("postId", "1")),
    ]
    assert IMAGES.each_listed((("limit", "200"),)) == [(("limit", "200"),)]


# ---------------------------------------------------------------- pages


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"items": None},
        {"items": [{"id": "1"}]},
        {"items": [{"id": True}]},
        {"items": [{"no": 1}]},
        {"items": [], "metadata": []},
        {"items": [], "metadata": {"nextCursor": 1.5}},
        {"items": [], "metadata": {"nextCursor": False}},
        {"error": "Service Unavailable"},
    ],
)
def test_malformed_pages_are_refused(body: Any) -> None:
    if not isinstance(body, dict):
        with pytest.raises(NotJson):  # not even an object: a failed attempt all the same
            IMAGES.parse_page(orjson.dumps(body))
        return
    assert IMAGES.parse_page(orjson.dumps(body)) is None


def parse(body: Any) -> Page:
    page = IMAGES.parse_page(orjson.dumps(body))
    assert page is not None
    return page


def test_pages_keep_items_and_string_or_number_cursors() -> None:
    page = parse({"items": [{"id": 1, "x": None}], "metadata": {"nextCursor": "200|17"}})
    assert page.items == [{"id": 1, "x": None}] and page.next_cursor == "200|17"
    assert page.lines == [b'{"id":1,"x":null}\n'] and page.ids == [1]
    end = parse({"items": [], "metadata": {}})
    assert end.items == [] and end.next_cursor is None
    assert parse({"items": [], "metadata": {"nextCursor": None}}) == end
    legacy = parse({"items": [{"id": 9}], "metadata": {"nextCursor": 8}})
    assert legacy.next_cursor == 8


def test_a_cursor_that_cannot_be_sent_back_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be sent back"):
        IMAGES.parse_page(b'{"items":[],"metadata":{"nextCursor":"\\ud83d"}}')


def test_an_id_beyond_63_bits_stops_the_shard() -> None:
    page = parse({"items": [{"id": 2**63}], "metadata": {}})
    with pytest.raises(OddItemError, match=str(2**63)):
        IMAGES.check_items((("modelVersionId", "5"),), page)


# ---------------------------------------------------------------- expansion


class FakeLister:
    def __init__(self, versions: dict[str, list[int]]) -> None:
        self.versions = versions
        self.asked: list[str] = []

    async def __call__(self, model_id: str) -> list[int]:
        self.asked.append(model_id)
        if model_id not in self.versions:
            raise NotFoundError(f"/models/{model_id}: No model with id {model_id}")
        return self.versions[model_id]


async def test_a_model_becomes_one_parameter_set_per_version() -> None:
    lister = FakeLister({"500": [5001, 5002]})
    params = (("limit", "200"), ("modelId", "500"), ("sort", "Newest"))
    assert IMAGES.expansion is not None
    assert await IMAGES.expansion.expand(params, lister) == [
        (("limit", "200"), ("sort", "Newest"), ("modelVersionId", "5001")),
        (("limit", "200"), ("sort", "Newest"), ("modelVersionId", "5002")),
    ]
    assert lister.asked == ["500"]


async def test_expansion_only_where_needed_and_errors_go_up() -> None:
    expansion = IMAGES.expansion
    assert expansion is not None
    lister = FakeLister({"500": []})
    for narrower in (("modelVersionId", "7"), ("imageId", "9")):
        params = (("modelId", "500"), narrower)
        assert expansion.source(params) is None and await expansion.expand(params, lister) == [params]
    assert await expansion.expand((("userId", "3"),), lister) == [(("userId", "3"),)]
    assert lister.asked == []
    assert await expansion.expand((("modelId", "500"),), lister) == []
    with pytest.raises(NotFoundError):
        await expansion.expand((("modelId", "404"),), lister)
    assert expansion.source((("modelId", "500"),)) == "500" and expansion.path.format(500) == "/models/500"
    assert expansion.nothing.format(500) == "model 500 lists no published versions"


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        ({"id": 1, "modelVersions": [{"id": 11}, {"id": 12}]}, [11, 12]),
        ({"modelVersions": [{"id": 11}, {"id": "12"}, {"id": True}, {"id": "x1"}, 3, {}]}, [11, 12]),
        ({"modelVersions": []}, []),
        ({"modelVersions": None}, None),
        ({"error": "No model with id 4"}, None),
        ([], None),
    ],
)
def test_model_bodies_give_version_ids(body: Any, ids: list[int] | None) -> None:
    assert IMAGES.expansion is not None and IMAGES.expansion.parse(body) == ids


# ---------------------------------------------------------------- partitions


def selects(params: WireParams, level: int, kind: str) -> bool:
    """Whether an image of one browsing level and one type is in what `params` select."""
    values = dict(params)
    return int(values.get("browsingLevel", "31")) & level != 0 and values.get("type", kind) == kind


@given(st.integers(1, 31), st.sampled_from((None, *TYPES)))
def test_partitions_cover_exactly_all_the_way_down(levels: int, kind: str | None) -> None:
    params: WireParams = (("modelVersionId", "1"), ("browsingLevel", str(levels)), ("limit", "200"))
    params += (("type", kind),) if kind else ()
    pending, leaves = [params], []
    while pending:
        shard = pending.pop()
        children = IMAGES.split(shard)
        for child in children:  # one partition key set or replaced; everything else kept
            assert {k for k, _ in set(child) ^ set(shard)} in ({"browsingLevel"}, {"type"})
        pending += children
        leaves += [] if children else [shard]
    for level, media in itertools.product(LEVEL_BITS, TYPES):
        assert sum(selects(leaf, level, media) for leaf in leaves) == selects(params, level, media)
    assert all(len(dict(leaf)) == len(leaf) for leaf in leaves)  # no parameter twice


def test_split_by_level_bits_then_type_and_never_without_explicit_levels() -> None:
    shard = (("modelVersionId", "1"), ("browsingLevel", "13"), ("limit", "200"))
    assert [dict(c)["browsingLevel"] for c in IMAGES.split(shard)] == ["1", "4", "8"]
    one_level = (("modelVersionId", "1"), ("browsingLevel", "4"))
    assert [dict(c)["type"] for c in IMAGES.split(one_level)] == ["image", "video", "audio"]
    assert IMAGES.split((*one_level, ("type", "video"))) == []
    assert IMAGES.split((("modelVersionId", "1"),)) == []  # the server picks the levels: no exact cover


# ---------------------------------------------------------------- guards


def test_items_must_match_the_guarded_parameters() -> None:
    items = parse({"items": [{"id": 1, "postId": 7, "username": "Ajuro"}, {"id": 2}]})
    IMAGES.check_items((("postId", "7"), ("username", "ajuro")), items)  # case-insensitive; absent is fine
    IMAGES.check_items((("modelVersionId", "5"),), items)  # nothing to guard
    with pytest.raises(ForeignItemsError, match=r"postId=8: the API served image 1 with postId=7"):
        IMAGES.check_items((("postId", "8"),), items)
    with pytest.raises(
        ForeignItemsError, match="username=someone: the API served image 1 with username='Ajuro'"
    ):
        IMAGES.check_items((("username", "someone"),), items)


# ---------------------------------------------------------------- frontier


@pytest.mark.parametrize(
    ("sort", "frontier"),
    [
        ("Newest", Frontier.STOP_WHEN_KNOWN),
        ("Oldest", Frontier.CONTINUE_FROM_TAIL),
        ("Most Reactions", Frontier.WALK_ALL),
        ("Random", Frontier.WALK_ALL),
        (None, Frontier.WALK_ALL),
    ],
)
def test_frontier_of_each_sort(sort: str | None, frontier: Frontier) -> None:
    params = (("modelVersionId", "1"),) + ((("sort", sort),) if sort else ())
    assert IMAGES.frontier(params) is frontier


@pytest.mark.parametrize(
    "message",
    [
        "/images: HTTP 400 bad request: This cursor can no longer be continued; start again without it",
        "/images: HTTP 400 bad request: This cursor cannot be continued with these filters",
        "/images: HTTP 400 bad request: Cursor 4294967296 is out of range: it must fit a 32-bit integer",
    ],
)
def test_a_dead_cursor_is_told_from_a_bad_parameter(message: str) -> None:
    assert IMAGES.cursor_gone(message)
    assert not IMAGES.cursor_gone("/images: HTTP 400 bad request: limit: Number must be <= 200")


def test_cursors_say_how_deep_they_point() -> None:
    assert IMAGES.cursor_offset("49800|1700000000000") == 49800
    assert IMAGES.cursor_offset("feed:AAAA") is None and IMAGES.cursor_offset(123) is None


def test_a_query_has_two_ends() -> None:
    newest, oldest = IMAGES.from_ends((("modelVersionId", "5"), ("sort", "Most Reactions")))
    assert dict(newest)["sort"] == "Newest" and dict(oldest)["sort"] == "Oldest"
    assert dict(newest)["modelVersionId"] == "5"
