"""The fake API on its own event loop in a daemon thread.

For synchronous callers (the `harvest demo` command, tests that run the real CLI
as a subprocess) that must keep the server answering while they block.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from crawler.testing.fakeapi.dataset import Dataset
from crawler.testing.fakeapi.faults import FaultInjector, FaultSpec
from crawler.testing.fakeapi.server import FakeServer, serve


class ServerThread:
    """`with ServerThread(dataset) as api:` serves on 127.0.0.1 until the block ends."""

    def __init__(
        self, dataset: Dataset, faults: FaultSpec | FaultInjector | None = None, **kwargs: Any
    ) -> None:
        self._args = (dataset, faults)
        self._kwargs = kwargs
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fakeapi", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: FakeServer | None = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to the caller by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(*self._args, **self._kwargs) as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self._ready.wait(timeout=60)
        if self.server is None:
            raise RuntimeError(f"the fake API did not start: {self._error!r}")
        return self.server

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
