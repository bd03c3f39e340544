"""`harvest run CONFIG`: harvest a config into its output dir; rerun the same command to resume."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from crawler.archive.lock import OutputLock
from crawler.archive.state import State
from crawler.cli import logs
from crawler.cli.report import write_summary
from crawler.config import Config
from crawler.crawl.pipeline import RunSummary, run_harvest
from crawler.crawl.watch import Progress
from crawler.errors import ExitCode

log = logging.getLogger("harvest")


def cmd_run(config: Config, key: str | None, progress: Progress) -> int:
    _tune_gc()
    lock = OutputLock(config.output.dir)
    state = State.open(config.output.dir)
    try:
        summary, signum = _run_interruptibly(lambda: run_harvest(config, state, key, progress))
        if signum is not None:
            name = signal.Signals(signum).name
            print(
                f"harvest: interrupted by {name}; committed work is kept. "
                f"Resume with: harvest run {config.path}",
                file=sys.stderr,
            )
            return 128 + signum
        assert summary is not None
        write_summary(config.output.dir, summary)
        logs.log_summary(summary, config)  # in json mode a record with every figure as a field
        return ExitCode.OK if summary.ok else ExitCode.SHARDS_FAILED
    finally:
        state.close()
        lock.release()


def _run_interruptibly(
    make: Callable[[], object],
) -> tuple[RunSummary | None, int | None]:
    """Run the harvest; the first SIGINT/SIGTERM cancels it cleanly, a second exits at once.

    Exiting at once is safe: every commit is one SQLite transaction and an
    uncommitted tail of the output is cut away on the next start.
    """
    caught: list[int] = []

    async def guarded() -> RunSummary | None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if caught:
                os._exit(128 + caught[0])
            caught.append(signum)
            log.warning("%s: finishing the page being committed, then stopping", signal.Signals(signum).name)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await make()  # type: ignore[no-any-return, misc]
        except asyncio.CancelledError:
            if caught:
                return None
            raise

    summary = asyncio.run(guarded())
    # The loop and its handlers are gone; a signal during the last steps (summary,
    # closing the state) still exits cleanly and at once, with the status it asks for.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda got, _frame: os._exit(128 + (caught[0] if caught else got)))
    return summary, (caught[0] if caught else None)


def _tune_gc() -> None:
    """Collect rarely: pages are parsed into many small, acyclic containers whose
    allocation would trigger a young collection several times per page, for nothing
    (measured by `make bench`: ~1 µs of CPU per image). Startup objects are frozen
    out of collections altogether."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
