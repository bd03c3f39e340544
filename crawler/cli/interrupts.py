"""SIGINT and SIGTERM at any instant of `harvest run`: one line, and 130 or 143.

One handler is installed as the command starts and stays for its whole life, so
no instant is left to Python's default (a KeyboardInterrupt traceback) or the
kernel's (SIGTERM kills without a word). What a signal does depends on where the
run is:

- starting (taking the lock, opening the state): the start is unwound at once by
  `Interrupted`, which the command turns into its one line;
- starting the loop: the signal is held, and the harvest is not begun. An exception
  raised inside the loop's construction would leave a half-built loop whose
  collection prints a traceback;
- harvesting in the event loop: the harvest task is cancelled from inside the
  loop, so the page being committed is finished first (the loop is woken through
  a wakeup fd, whichever thread the signal landed on);
- finishing (the summary, closing the state): exit at once.

A second signal exits at once wherever the run is, after `last_words(status)`.
Exiting at once is safe: every commit is one SQLite transaction and an uncommitted
tail of the output is cut away on the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, NoReturn

log = logging.getLogger("harvest")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal stopped the run before its harvest began. Like KeyboardInterrupt, not an error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupts:
    """The run's SIGINT/SIGTERM handler, installed on creation, for the rest of the process."""

    def __init__(self, last_words: Callable[[int], None]) -> None:
        self._last_words = last_words
        self.caught: int | None = None  # the first signal handled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._finishing = False
        self._holding = False  # the loop is being built or torn down around the harvest
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)

    def run(self, make: Callable[[], Coroutine[Any, Any, object]]) -> int | None:
        """Run the harvest in an event loop; the number of the signal that stopped it, if one did."""
        self._holding = True
        try:
            asyncio.run(self._guarded(make))
        finally:
            self._holding = False
            self._finishing = True
        return self.caught

    def finish(self) -> None:
        """The run is ending: a signal from now on exits at once."""
        self._finishing = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._loop is not None:  # handled inside the loop, in arrival order
            self._loop.call_soon_threadsafe(self._in_loop, signum)
        elif self.caught is not None or self._finishing:
            self._exit_now(128 + (self.caught or signum))
        elif self._holding:
            self.caught = signum  # `_guarded` sees it before the harvest begins
        else:
            self.caught = signum
            raise Interrupted(signum)

    def _in_loop(self, signum: int) -> None:
        if self.caught is not None:
            self._exit_now(128 + self.caught)
        self.caught = signum
        log.warning("%s: finishing the page being committed, then stopping", signal.Signals(signum).name)
        if self._task is not None:
            self._task.cancel()

    async def _guarded(self, make: Callable[[], Coroutine[Any, Any, object]]) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        wake, woken = socket.socketpair()
        try:
            _watch(loop, wake, woken)
            self._loop = loop
            if self.caught is None:  # else a signal came while the loop was built
                await make()
        except asyncio.CancelledError:
            if self.caught is None:
                raise
        finally:
            self._loop = None
            self._finishing = True
            _unwatch(loop, wake, woken)

    def _exit_now(self, status: int) -> NoReturn:
        self._last_words(status)
        os._exit(status)


def _watch(loop: asyncio.AbstractEventLoop, wake: socket.socket, woken: socket.socket) -> None:
    """Wake the loop on every signal: one landing on another thread would otherwise only be
    handled when the loop next wakes by itself."""
    for end in (wake, woken):
        end.setblocking(False)
    signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    loop.add_reader(woken.fileno(), _drain, woken)


def _unwatch(loop: asyncio.AbstractEventLoop, wake: socket.socket, woken: socket.socket) -> None:
    signal.set_wakeup_fd(-1)
    loop.remove_reader(woken.fileno())
    wake.close()
    woken.close()


def _drain(woken: socket.socket) -> None:
    try:
        while woken.recv(4096):
            pass
    except BlockingIOError:
        pass
