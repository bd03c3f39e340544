"""Server text, cleaned where it comes in (issue 9, items 4, 7, 11): lone surrogates replaced,
terminal escapes and control characters gone, the header values the client sent redacted; then
the same through `classify`, `classify_exception` and the client's parse of a 2xx."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crawler.errors import BadRequestError
from crawler.http.client import HttpClient, HttpSettings, _parsed
from crawler.http.gate import RateGate
from crawler.http.outcomes import Kind, classify, classify_exception
from crawler.http.servertext import MAX_CHARS, REDACTED, ServerText
from crawler.testing.fakehttp import ScriptedTransport, VirtualClock, reply, run_virtual

KEY = "sk-0123456789abcdef"
SENT = {"Authorization": f"Bearer {KEY}"}
HIDE = ServerText.hiding(SENT)


def test_lone_surrogates_become_replacement_characters_and_pairs_are_joined() -> None:
    assert ServerText()("cut \ud83d here \udc00") == "cut \ufffd here \ufffd"
    assert ServerText()("emoji \ud83d\ude00") == "emoji \U0001f600"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("\x1b[31mRED\x1b[0m", "RED"),  # CSI: colours
        ("\x1b[2J\x1b[Hwiped", "wiped"),  # CSI: clear screen, cursor home
        ("\x9b31mRED", "RED"),  # 8-bit CSI
        ("\x1b]0;pwned\x07title", "title"),  # OSC (window title), ended by BEL
        ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC 8 hyperlink, ended by ST
        ("\x1b]unterminated words", "unterminated words"),  # only the introducer goes
        ("\x1bcreset", "reset"),  # ESC c: full reset
        ("\x07bell\x00nul\x7fdel\x90dcs", "bellnuldeldcs"),
        ("one\ntwo\r\nthree\tfour\x85five", "one two three four five"),
        ("zero\u200bwidth \u202eevil", "zerowidth evil"),
    ],
)
def test_escapes_and_control_characters_are_stripped_and_the_words_stay(raw: str, clean: str) -> None:
    assert ServerText()(raw) == clean


@given(st.text())
def test_whatever_comes_in_can_be_encoded_and_printed(raw: str) -> None:
    out = HIDE(raw)
    out.encode("utf-8")  # SQLite, orjson and stderr all encode
    assert orjson.loads(orjson.dumps(out)) == out
    assert len(out) <= MAX_CHARS and "\x1b" not in out and "\n" not in out
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)


def test_the_header_values_sent_are_redacted_whole_and_as_a_bare_token() -> None:
    assert HIDE.secrets == (f"Bearer {KEY}", KEY)
    echoed = f"headers {{'Authorization': 'Bearer {KEY}'}}; token={KEY}"
    assert HIDE(echoed) == f"headers {{'Authorization': '{REDACTED}'}}; token={REDACTED}"


def test_a_key_split_by_escapes_is_redacted_once_they_are_gone() -> None:
    assert KEY not in HIDE(f"{KEY[:5]}\x1b[0m{KEY[5:]}\u200b")


def test_redaction_comes_before_the_cut_so_no_part_of_the_key_survives() -> None:
    text = HIDE("x" * (MAX_CHARS - 5) + KEY)
    assert len(text) == MAX_CHARS and "sk-" not in text and text.endswith(REDACTED[:5])


def test_classify_cleans_and_redacts_the_body_of_an_error() -> None:
    body = orjson.dumps({"message": f"bad \x1b[31mrequest\x1b[0m from Bearer {KEY}"})
    body = body.replace(b"bad", b"\\ud83d bad")
    for status in (400, 404, 500):
        outcome = classify(status, {}, body, has_key=True, text=HIDE)
        assert KEY not in outcome.reason and "\x1b" not in outcome.reason, outcome.reason
        assert "\ufffd bad request from [redacted]" in outcome.reason
        outcome.reason.encode("utf-8")


def test_classify_cleans_even_without_secrets() -> None:
    outcome = classify(400, {}, b'{"error":"x\\ud800\\u0007y"}', has_key=False)
    assert outcome.reason == "HTTP 400 bad request: x\ufffdy"


def test_exceptions_quoting_the_wire_are_cleaned() -> None:
    exc = aiohttp.ClientPayloadError(f"Invalid header \x1b[2J{KEY}\udc80\nsecond line")
    outcome = classify_exception(exc, HIDE)
    assert KEY not in outcome.reason and "\x1b" not in outcome.reason
    outcome.reason.encode("utf-8")


def test_a_parse_error_quoting_the_body_is_cleaned() -> None:
    def refuse(body: bytes) -> None:
        raise ValueError(f"odd cursor \ud83d\x1b[0m {KEY}")

    ok = classify(200, {}, b"{}", has_key=True)
    outcome = _parsed(ok, refuse, HIDE)
    assert outcome.kind is Kind.RETRY and KEY not in outcome.reason and "\x1b" not in outcome.reason
    outcome.reason.encode("utf-8")


def test_the_client_redacts_what_it_sent_from_the_error_it_raises() -> None:
    clock = VirtualClock()
    echo = reply(400, {"message": f"you sent Authorization: Bearer {KEY}"})
    settings = HttpSettings("http://api.test", 5.0, 0, 1.0, 100.0, 1)
    client = HttpClient(
        ScriptedTransport(echo), RateGate(100.0, 1, max_backoff=1.0, clock=clock), settings, SENT
    )
    with pytest.raises(BadRequestError) as raised:
        run_virtual(clock, lambda: client.get("/x", [], lambda body: body))
    assert KEY not in str(raised.value) and REDACTED in str(raised.value)
