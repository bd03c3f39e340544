"""Every way a request can end, classified in one place.

The client asks `classify` what a response means and `classify_exception` what a
transport failure means; nothing else in the code inspects statuses.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson


class Kind(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # transient: back off and try again
    RATE_LIMITED = "rate_limited"  # slow down: every worker pauses
    SHARD_FATAL = "shard_fatal"  # this shard cannot go on
    RUN_FATAL = "run_fatal"  # no shard can go on


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    reason: str
    body: Any = None
    retry_after: float | None = None
    status: int | None = None


_PAGE_CAP = "too many pages"
_RETRY_STATUSES = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524})


def classify(status: int, headers: Mapping[str, str], raw: bytes, *, has_key: bool) -> Outcome:
    """What one complete HTTP response means for the harvest."""
    body, is_json = _parse(raw, headers)
    if status == 200:
        if not is_json:
            return Outcome(Kind.RETRY, "200 without a JSON body (challenge page?)", status=status)
        return Outcome(Kind.OK, "ok", body=body, status=status)
    message = _error_text(body) if is_json else "non-JSON body"
    if status == 429:
        if is_json and _PAGE_CAP in message:
            return Outcome(Kind.SHARD_FATAL, f"429 page cap: {message}", status=status)
        return _rate_limited(status, headers, "429 too many requests")
    if status == 503 and "retry-after" in _lower(headers):
        return _rate_limited(status, headers, "503 service unavailable")
    if status in _RETRY_STATUSES or status >= 500:
        return Outcome(Kind.RETRY, f"HTTP {status}: {message}", status=status)
    return _client_error(status, message, is_json, has_key=has_key)


def _client_error(status: int, message: str, is_json: bool, *, has_key: bool) -> Outcome:
    if status in (401, 403) and not is_json:
        return Outcome(Kind.RETRY, f"HTTP {status} challenge page", status=status)
    if status in (401, 403):
        who = "the API key (CIVITAI_API_KEY) was rejected" if has_key else "access denied"
        return Outcome(Kind.RUN_FATAL, f"HTTP {status}: {who}: {message}", status=status)
    if status == 451:
        return Outcome(Kind.RUN_FATAL, "HTTP 451: the API is blocked in this region", status=status)
    if status == 400:
        return Outcome(Kind.SHARD_FATAL, f"HTTP 400 bad request: {message}", status=status)
    return Outcome(Kind.SHARD_FATAL, f"HTTP {status}: {message}", status=status)


def classify_exception(exc: BaseException) -> Outcome:
    """Timeouts, resets and cut bodies are all transient."""
    name = type(exc).__name__
    detail = str(exc).splitlines()[0] if str(exc) else name
    if isinstance(exc, TimeoutError):
        return Outcome(Kind.RETRY, "request timed out")
    return Outcome(Kind.RETRY, f"connection failed ({name}: {detail})")


def _rate_limited(status: int, headers: Mapping[str, str], what: str) -> Outcome:
    delay = parse_retry_after(_lower(headers).get("retry-after"))
    suffix = f", Retry-After {delay:g}s" if delay is not None else ""
    return Outcome(Kind.RATE_LIMITED, what + suffix, retry_after=delay, status=status)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _parse(raw: bytes, headers: Mapping[str, str]) -> tuple[Any, bool]:
    if "html" in _lower(headers).get("content-type", ""):
        return None, False
    try:
        return orjson.loads(raw), True
    except orjson.JSONDecodeError:
        pass
    try:
        # orjson refuses lone surrogates and huge integers; the API may still send them.
        return json.loads(raw), True
    except (ValueError, UnicodeDecodeError):
        return None, False


def _error_text(body: Any) -> str:
    """The one-line reason from `{"error": ...}` bodies, zod issues spelt out."""
    error = body.get("error") if isinstance(body, dict) else body
    if isinstance(error, dict):
        return _zod_text(error) or str(error.get("message") or error)
    return " ".join(str(error).split()) if error is not None else "no detail"


def _zod_text(error: dict[str, Any]) -> str | None:
    try:
        issues = json.loads(error.get("message", ""))
        parts = [
            f"{'.'.join(str(p) for p in issue.get('path', [])) or '?'}: {issue.get('message')}"
            for issue in issues
        ]
    except (ValueError, TypeError, AttributeError):
        return None
    return "; ".join(parts) or None
