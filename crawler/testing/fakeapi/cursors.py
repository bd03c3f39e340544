"""Opaque `feed:` cursors, as the search feed hands them out since 2026-08 (api-facts).

A cursor packs, base64-encoded, when it was issued, the offset it continues from, the
cursor epoch it was issued in and a short hash of the filters it was issued for: opaque
to a client, which must neither read nor edit it. It dies when it is older than the ttl,
when the test hook `expire_all()` starts a new epoch, or when it is sent with other
filters; the server then answers 400 with one of the two messages below.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
import threading
import time
import zlib

import orjson

from crawler.testing.fakeapi.dataset import ImageQuery

PREFIX = "feed:"
EXPIRED = "This cursor can no longer be continued; start again without it"
MISFIT = "This cursor cannot be continued with these filters"
_LAYOUT = struct.Struct(">QQII")  # issued (ms), offset, epoch, filters hash


class CursorRefused(Exception):
    """A well-formed feed: cursor the server will not continue; str(exc) is the message served."""


def filters_hash(q: ImageQuery) -> int:
    """A short, stable hash of everything that selects or orders a walk's rows."""
    canon = [
        (f.name, sorted(v) if isinstance(v, frozenset) else v)
        for f in dataclasses.fields(q)
        for v in (getattr(q, f.name),)
    ]
    return zlib.crc32(orjson.dumps(canon))


class FeedCursors:
    """Issues and reads feed: cursors; the expiry hooks are safe to call from any thread.

    `expire_all()`: every cursor issued so far is dead (a test kills a run, expires the
    cursors it stored, resumes). `advance(seconds)`: the cursor clock moves on, so a ttl can
    be crossed without sleeping. Both change `version`, which keys the server's body cache,
    so a cached page never hands out a cursor from before the change.
    """

    def __init__(self, ttl: float | None = None, epoch: int = 0) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError("cursor_ttl must be positive (or None: no ttl)")
        if not 0 <= epoch < 2**32:
            raise ValueError("cursor_epoch must fit 32 bits")
        self.ttl = ttl
        self._epoch = epoch
        self._shift = 0.0
        self._version = 0
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def version(self) -> int:
        return self._version

    def now(self) -> float:
        """The cursor clock: wall time (cursors outlive a server restart), plus any advance()."""
        return time.time() + self._shift

    def expire_all(self) -> None:
        """Every cursor issued so far can no longer be continued."""
        with self._lock:
            self._epoch += 1
            self._version += 1

    def advance(self, seconds: float) -> None:
        """Age every cursor by `seconds` (the server's clock jumps ahead)."""
        if seconds < 0:
            raise ValueError("the cursor clock only moves forward")
        with self._lock:
            self._shift += seconds
            self._version += 1

    def issue(self, offset: int, filters: int) -> str:
        packed = _LAYOUT.pack(int(self.now() * 1000), offset, self._epoch, filters)
        return PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    def read(self, cursor: str, filters: int) -> int:
        """The offset `cursor` continues from.

        Raises ValueError when it is not a feed: cursor this server could have issued, and
        CursorRefused when it is one but has expired or belongs to other filters.
        """
        if not cursor.startswith(PREFIX):
            raise ValueError("not a feed: cursor")
        text = cursor[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            issued_ms, offset, epoch, issued_for = _LAYOUT.unpack(raw)
        except (ValueError, struct.error) as exc:  # binascii.Error is a ValueError
            raise ValueError("malformed feed: cursor") from exc
        expired = epoch < self._epoch or (
            self.ttl is not None and self.now() * 1000 - issued_ms > self.ttl * 1000
        )
        if expired:
            raise CursorRefused(EXPIRED)
        if issued_for != filters:
            raise CursorRefused(MISFIT)
        return int(offset)
