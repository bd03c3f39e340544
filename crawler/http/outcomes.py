"""Every way a request can end, classified in one place.

The client asks `classify` what a response means and `classify_exception` what a
transport failure means; nothing else in the code inspects statuses. Both are
pure: the same status, headers and body always give the same `Outcome` (an
HTTP-date `Retry-After` is read against `now`, the wall clock unless given).

| answer                                               | kind                          |
|------------------------------------------------------|-------------------------------|
| 2xx                                                  | OK: the caller parses the body|
| 2xx the caller cannot parse (HTML, empty, cut, ...)  | RETRY: `not_json`, `malformed`|
| 429 JSON "too many pages" (the `page` cap)           | SHARD_FATAL, never retried    |
| any other 429, with or without Retry-After           | RATE_LIMITED                  |
| 503 with Retry-After                                 | RATE_LIMITED                  |
| 408, 5xx (503 without Retry-After), 520-524          | RETRY                         |
| 403 HTML (a Cloudflare challenge)                    | RETRY                         |
| 401, or 403 JSON, when a key was sent                | RUN_FATAL: the key is rejected|
| 401 / 403 JSON without a key                         | SHARD_FATAL: access denied    |
| 451                                                  | RUN_FATAL: region blocked     |
| 400 (zod issues spelt out: parameter and reason)     | SHARD_FATAL                   |
| 404 and every other status                           | SHARD_FATAL                   |
| timeout, reset, refused, cut body                    | RETRY                         |
| a body larger than max_page_mb (decompressed)        | RETRY: `too-large`            |

A RETRY that carries a `Retry-After` (e.g. a 502 with one) keeps it: the client
honours it like any other, without calling it a rate limit. A `Retry-After`
longer than the client's `max_wait` turns any of these into SHARD_FATAL
(`refuse_long_pause`): the shard stops, saying when a rerun may go.

Every piece of server text in a reason (an error body's message, a zod issue,
an exception quoting the wire) passes through one `ServerText` first: lone
surrogates replaced, terminal escapes and control characters stripped, the
header values the client sent redacted, cut to one line. Nothing downstream
(state, summary, logs, terminal) sees the server's own characters.

A transport failure that got no answer at all says why in `unreachable`
("connection refused", "DNS", "timed out", ...), so a run that cannot reach the
host can say so on every retry instead of staying silent until it gives up.
"""

from __future__ import annotations

import enum
import errno
import json
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from crawler import exactjson
from crawler.http.clock import seconds_text
from crawler.http.servertext import ServerText
from crawler.http.transport import BodyTooLarge


class Kind(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # transient: back off and try again
    RATE_LIMITED = "rate_limited"  # slow down: every worker pauses
    SHARD_FATAL = "shard_fatal"  # this shard cannot go on
    RUN_FATAL = "run_fatal"  # no shard can go on


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    reason: str  # one line for a person
    body: Any = None
    retry_after: float | None = None  # seconds, from a parseable Retry-After header
    status: int | None = None
    tag: str = ""  # short and stable, for counting: "503", "429", "html-200", "timeout", ...
    unreachable: str | None = None  # no answer came, and why: "connection refused", "DNS", "timed out"

    @property
    def timed_out(self) -> bool:
        """The request outlasted a timeout: ours, or a gateway's (504, Cloudflare's 524)."""
        return self.tag == "timeout" or self.status in _TIMEOUT_STATUSES

    @property
    def key(self) -> str:
        """What the run summary counts this failed attempt under."""
        return self.tag or (str(self.status) if self.status is not None else self.reason)


_PAGE_CAP = "too many pages"
_TIMEOUT_STATUSES = frozenset({504, 524})
_RETRY_STATUSES = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524})
# About 300 years: longer values are clamped, so a demanded pause always has a time to rerun after
# (a datetime ends at the year 9999; a float of 400 digits is inf). `max_wait` refuses far less.
MAX_RETRY_AFTER = 1e10
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def classify(
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    *,
    has_key: bool,
    now: float | None = None,
    text: ServerText = ServerText(),
) -> Outcome:
    """What one complete HTTP response means for the harvest; `text` cleans what the body says."""
    lowered = _lower(headers)
    if 200 <= status < 300:
        # The caller's parse judges the body; the label may lie either way.
        return Outcome(Kind.OK, "ok", body=raw, status=status)
    body, is_json = _parse(raw)
    message = text(_error_text(body)) if is_json else _non_json(raw)
    retry_after = parse_retry_after(lowered.get("retry-after"), now)
    if status == 429:
        if is_json and _PAGE_CAP in message.casefold():
            return Outcome(
                Kind.SHARD_FATAL,
                f"HTTP 429 page cap (not a rate limit): {message}",
                status=status,
                tag="429-page-cap",
            )
        return _rate_limited(status, retry_after, "HTTP 429 too many requests")
    if status == 503 and "retry-after" in lowered:
        return _rate_limited(status, retry_after, "HTTP 503 service unavailable")
    if status in _RETRY_STATUSES or 500 <= status < 600:
        return Outcome(Kind.RETRY, f"HTTP {status}: {message}", retry_after=retry_after, status=status)
    return _client_error(status, message, is_json, has_key=has_key)


def _client_error(status: int, message: str, is_json: bool, *, has_key: bool) -> Outcome:
    if status == 403 and not is_json:
        return Outcome(Kind.RETRY, f"HTTP 403 {message} (challenge page?)", status=status, tag="html-403")
    if status in (401, 403) and has_key:
        # Never the key itself: only the name of the variable it came from.
        return Outcome(
            Kind.RUN_FATAL,
            f"HTTP {status}: the API key (CIVITAI_API_KEY) was rejected: {message}",
            status=status,
        )
    if status in (401, 403):
        return Outcome(
            Kind.SHARD_FATAL,
            f"HTTP {status}: access denied ({message}); no API key was sent: "
            "set CIVITAI_API_KEY if this content needs one",
            status=status,
        )
    if status == 451:
        return Outcome(
            Kind.RUN_FATAL,
            "HTTP 451: the API is blocked in this region (unavailable for "
            "legal reasons); a rerun from here cannot help",
            status=status,
        )
    if status == 400:
        return Outcome(Kind.SHARD_FATAL, f"HTTP 400 bad request: {message}", status=status)
    if status == 404:
        return Outcome(Kind.SHARD_FATAL, f"HTTP 404 not found: {message}", status=status)
    return Outcome(Kind.SHARD_FATAL, f"HTTP {status}: {message}", status=status)


def classify_exception(exc: BaseException, text: ServerText = ServerText()) -> Outcome:
    """Timeouts, resets, refusals and cut bodies are all transient; `text` cleans what
    the exception quotes (a bad status line or header is the server's text)."""
    name = type(exc).__name__
    if isinstance(exc, BodyTooLarge):
        return too_large(exc.status, exc.limit)
    if isinstance(exc, TimeoutError):
        # Our timeout covers the whole request, so a slow answer and an unreachable
        # host look alike here; either way nothing came back in time.
        return Outcome(Kind.RETRY, "request timed out", tag="timeout", unreachable="timed out")
    said = str(exc)
    detail = text(said.splitlines()[0]) if said.strip() else name
    return Outcome(
        Kind.RETRY, f"connection failed ({name}: {detail})", tag=name, unreachable=_unreachable(exc)
    )


_NO_CONNECTION = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
}
# aiohttp >= 3.11 names DNS failures; before, they came as a connector error around a gaierror.
_DNS_ERROR: type[BaseException] = getattr(aiohttp, "ClientConnectorDNSError", socket.gaierror)


def _unreachable(exc: BaseException) -> str | None:
    """Why no connection could be made; None when one was and broke later (reset, cut body)."""
    connector = isinstance(exc, aiohttp.ClientConnectorError)
    cause: BaseException = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(exc, _DNS_ERROR) or isinstance(cause, socket.gaierror):
        return "DNS"
    if not isinstance(cause, OSError):
        return None
    if cause.errno in _NO_CONNECTION:
        return _NO_CONNECTION[cause.errno]
    if connector:  # TLS and the like: still never connected
        return (cause.strerror or str(cause) or type(cause).__name__).splitlines()[0][:120]
    return None


TOO_LARGE = "too-large"


def too_large(status: int, limit: int) -> Outcome:
    """An answer cut off at the body cap: a failed attempt (a server can serve a sane page next)."""
    return Outcome(
        Kind.RETRY,
        f"HTTP {status}: the answer is larger than max_page_mb ({limit / 2**20:g} MiB); "
        "the rest was not read",
        status=status,
        tag=TOO_LARGE,
    )


def refuse_long_pause(outcome: Outcome, max_wait: float, now: float | None = None) -> Outcome:
    """SHARD_FATAL instead of `outcome` when it demands a pause longer than `max_wait` seconds.

    Waiting would hold every worker back for that long, without a word; the shard
    stops instead, saying when (UTC, from the wall clock `now`) a rerun may go.
    """
    pause = outcome.retry_after
    if pause is None or pause <= max_wait:
        return outcome
    wall = time.time() if now is None else now
    until = datetime.fromtimestamp(wall + pause, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return Outcome(
        Kind.SHARD_FATAL,
        f"the server asked for a pause of {seconds_text(pause)} s; rerun after {until} "
        f"(HTTP {outcome.status}; longer than max_wait, {seconds_text(max_wait)} s)",
        status=outcome.status,
        tag="long-pause",
    )


def _rate_limited(status: int, delay: float | None, what: str) -> Outcome:
    suffix = f", Retry-After {seconds_text(delay)} s" if delay is not None else ", no Retry-After"
    return Outcome(Kind.RATE_LIMITED, what + suffix, retry_after=delay, status=status)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date.

    `now` is the wall clock (time.time()) the date is measured from. A date in the
    past means 0; a value that is neither form means None (the caller backs off).
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delay), MAX_RETRY_AFTER)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _parse(raw: bytes) -> tuple[Any, bool]:
    """(body, True) for JSON, (None, False) for anything else, whatever the content-type says."""
    try:
        return exactjson.loads(raw), True
    except exactjson.NotJson:
        return None, False


def not_json(status: int, raw: bytes) -> Outcome:
    """A 2xx whose body is not JSON at all (a challenge page, an empty or cut body)."""
    what = _non_json(raw)
    tag = f"{'html' if 'HTML' in what else 'non-json'}-{status}"
    return Outcome(Kind.RETRY, f"HTTP {status} with {what} where JSON was due", status=status, tag=tag)


def malformed(status: int, why: str | None, text: ServerText = ServerText()) -> Outcome:
    """A 2xx whose JSON is not the shape the caller expects; `why` may quote the body."""
    detail = f" ({text(why)})" if why else ""
    return Outcome(
        Kind.RETRY, f"HTTP {status}: malformed JSON response{detail}", status=status, tag="malformed"
    )


def _non_json(raw: bytes) -> str:
    head = raw[:512].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<")):
        return "an HTML page"
    return "an empty body" if not raw.strip() else "a non-JSON body"


def _error_text(body: Any) -> str:
    """The reason from `{"error": ...}` or `{"message": ...}` bodies, zod issues spelt out;
    raw server text, for `ServerText` to clean and cut."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return _zod_text(error) or str(error.get("message") or error)
    return str(error) if error is not None else "no detail"


def _zod_text(error: dict[str, Any]) -> str | None:
    """`limit: Number must be less than or equal to 200; sort: Invalid enum value. ...`"""
    try:
        issues = json.loads(error.get("message", ""))
        parts = [
            f"{'.'.join(str(p) for p in issue.get('path', [])) or '?'}: {issue.get('message')}"
            for issue in issues
        ]
    except (ValueError, TypeError, AttributeError):
        return None
    return "; ".join(parts) or None
