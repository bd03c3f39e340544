"""What the fake CDN saw and is doing: every request with all its headers, and live transfers.

The CDN runs on its own event loop (a ServerThread's, usually) while a test blocks in another
thread, so Transfers is thread-safe: a test can wait until a file is part way through, or pause
it at a byte, then kill the harvest, with no sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class CdnRecord:
    mono: float  # time.monotonic() when the request arrived
    method: str
    path: str  # with the query string, as sent
    headers: tuple[tuple[str, str], ...]  # every request header, in order, as sent
    status: int  # 0: no answer (a reset, or the client went away before the headers)
    sent: int  # body bytes written
    fault: str | None  # the injected fault kind, if any
    uuid: str | None  # the media this path names, if it names one
    complete: bool  # the whole body announced was written
    answered: float  # time.monotonic() when done (or the client went away)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), None when not sent."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class CdnLog:
    """Every request the CDN saw, in order of completion."""

    def __init__(self) -> None:
        self.records: list[CdnRecord] = []

    def append(self, record: CdnRecord) -> None:
        self.records.append(record)

    def __iter__(self) -> Iterator[CdnRecord]:
        return iter(list(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def clear(self) -> None:
        self.records.clear()

    def for_uuid(self, uuid: str) -> list[CdnRecord]:
        return [r for r in self.records if r.uuid == uuid]

    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.records)

    def mentioning(self, text: str) -> list[CdnRecord]:
        """Requests whose path or any header name or value contains `text` (an API key, say)."""
        return [r for r in self if text in r.path or any(text in k or text in v for k, v in r.headers)]


class Transfers:
    """Body bytes sent per uuid, live, and holds that pause a file's bodies at a byte."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sent: Counter[str] = Counter()
        self._holds: dict[str, int] = {}
        self._paused: dict[str, list[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the CDN serves on: release() wakes paused bodies there."""
        self._loop = loop

    def sent(self, uuid: str) -> int:
        """Body bytes sent so far for uuid, over every request and form."""
        with self._cond:
            return self._sent[uuid]

    def wait_sent(self, uuid: str, at_least: int, timeout: float = 30.0) -> bool:
        """Block until `at_least` body bytes of uuid have gone out; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sent[uuid] >= at_least, timeout)

    def hold(self, uuid: str, at: int) -> None:
        """Bodies of uuid that start before byte `at` pause there until release(uuid)."""
        with self._cond:
            self._holds[uuid] = at

    def hold_at(self, uuid: str) -> int | None:
        with self._cond:
            return self._holds.get(uuid)

    def paused(self, uuid: str) -> int:
        """How many bodies of uuid are paused at their hold right now."""
        with self._cond:
            return len(self._paused.get(uuid, ()))

    def wait_paused(self, uuid: str, timeout: float = 30.0) -> bool:
        """Block until a body of uuid is paused at its hold; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._paused.get(uuid)), timeout)

    def release(self, uuid: str) -> None:
        """Drop uuid's hold and let its paused bodies go on."""
        with self._cond:
            self._holds.pop(uuid, None)
            events = self._paused.pop(uuid, [])
        if self._loop is not None:
            for event in events:
                self._loop.call_soon_threadsafe(event.set)

    def release_all(self) -> None:
        with self._cond:
            held = list(self._holds) + list(self._paused)
        for uuid in held:
            self.release(uuid)

    # ---- called on the CDN's loop

    def add(self, uuid: str, n: int) -> None:
        with self._cond:
            self._sent[uuid] += n
            self._cond.notify_all()

    async def pause(self, uuid: str) -> None:
        """Wait at the hold, unless it was released meanwhile."""
        event = asyncio.Event()
        with self._cond:
            if uuid not in self._holds:
                return
            self._paused.setdefault(uuid, []).append(event)
            self._cond.notify_all()
        try:
            await event.wait()
        finally:
            with self._cond:
                waiting = self._paused.get(uuid, [])
                if event in waiting:
                    waiting.remove(event)
