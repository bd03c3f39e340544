"""`harvest run CONFIG`: harvest a config into its output dir; rerun the same command to resume.

Once the output dir is ours (its lock taken), every way out writes `last-run.json`
with what the run did so far and how it ended (`exit_code`, `ok`): after the run
(0, 3), on an error (1), on a signal (130, 143), even on a second signal that
exits at once. A `kill -9` is the one exception: nothing runs after it.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crawler.archive.lock import OutputLock
from crawler.archive.state import State
from crawler.cli import logs
from crawler.cli.interrupts import Interrupted, Interrupts
from crawler.cli.report import write_summary
from crawler.config import Config
from crawler.crawl.media import harvest_with_media
from crawler.crawl.pipeline import RunSummary, run_harvest
from crawler.crawl.watch import Progress
from crawler.errors import DisagreementError, ExitCode, HarvestError, OutputError

log = logging.getLogger("harvest")

# The statuses of a run that got to its end: its summary is part of what it promises.
_FINISHED = (ExitCode.OK, ExitCode.SHARDS_FAILED)


# The work of a locked command, given the open state and the summary to fill in.
Work = Callable[[State, RunSummary], Coroutine[Any, Any, object]]


def cmd_run(config: Config, key: str | None, progress: Progress) -> int:
    def work(state: State, summary: RunSummary) -> Coroutine[Any, Any, object]:
        if config.media.download:
            return harvest_with_media(config, state, key, progress, summary)
        return run_harvest(config, state, key, progress, summary=summary)

    return run_locked(config, work, RunSummary())


def run_locked(config: Config, work: Work, summary: RunSummary, *, create: bool = True) -> int:
    """Run `work` on the output dir under its lock, with the signals and `last-run.json` of a run.

    `create`: make the state if there is none (`harvest run`); otherwise there must be one.
    """
    last = _LastRun(config.output.dir, summary)
    interrupts = Interrupts(last.write)  # first: a signal at any instant from here is one line
    try:
        _tune_gc()
        lock = OutputLock(config.output.dir)  # exit 4 here: the dir, and its last-run.json, are another run's
        last.closed = False
        try:
            return _run_locked(config, work, last, interrupts, create)
        finally:
            last.closed = True  # a signal from here on exits without writing: the dir is no longer ours
            lock.release()
    except Interrupted as stop:
        return _interrupted(config, 128 + stop.signum, summary.command)
    finally:
        interrupts.finish()


def _run_locked(config: Config, work: Work, last: _LastRun, interrupts: Interrupts, create: bool) -> int:
    try:
        code = _harvest(config, work, last, interrupts, create)
    except BaseException as exc:
        last.write(_exit_code_of(exc))  # quietly: `main` reports the error itself
        raise
    last.write(code, strict=code in _FINISHED)
    if code in _FINISHED:
        logs.log_summary(last.summary, config, code)  # in json mode a record with every figure as a field
        return code
    return _interrupted(config, code, last.summary.command)


def _interrupted(config: Config, code: int, command: str) -> int:
    name = signal.Signals(code - 128).name
    resume = f"harvest {command} {config.path}"
    print(f"harvest: interrupted by {name}; committed work is kept. Resume with: {resume}", file=sys.stderr)
    return code


def _harvest(config: Config, work: Work, last: _LastRun, interrupts: Interrupts, create: bool) -> int:
    """The run itself: 0 or 3 when it got to the end, 128 + N when signal N stopped it."""
    state = State.open(config.output.dir, create=create)
    try:
        signum = interrupts.run(lambda: work(state, last.summary))
    except DisagreementError as exc:
        hint = f"to rebuild the state from the files: harvest repair {config.path}"
        raise DisagreementError(f"{exc}; {hint}") from None
    finally:
        state.close()
    if signum is not None:
        return 128 + signum
    return ExitCode.OK if last.summary.ok else ExitCode.SHARDS_FAILED


def _exit_code_of(exc: BaseException) -> int:
    """The status `main` (or Python, for Ctrl-C outside the run) exits with for `exc`."""
    if isinstance(exc, HarvestError):
        return exc.exit_code
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.SIGINT
    return ExitCode.ERROR


@dataclass(slots=True)
class _LastRun:
    """`last-run.json` of one run: the summary the pipeline fills in, and how the run ended."""

    out_dir: Path
    summary: RunSummary
    started: float = field(default_factory=time.monotonic)
    closed: bool = True  # unset while the lock is held: the dir, and this file, are ours

    def write(self, exit_code: int, *, strict: bool = False) -> None:
        """Record the ending. `strict`: a failure to write is an OutputError (a run that did its
        work but cannot say so fails); otherwise a warning, and the ending keeps its status."""
        if self.closed:
            return
        if not self.summary.elapsed:  # cut short before the pipeline timed itself
            self.summary.elapsed = time.monotonic() - self.started
        try:
            write_summary(self.out_dir, self.summary, exit_code)
        except OutputError as exc:
            if strict:
                raise
            log.warning("%s", exc)


def _tune_gc() -> None:
    """Collect rarely: pages are parsed into many small, acyclic containers whose
    allocation would trigger a young collection several times per page, for nothing
    (measured by `make bench`: ~1 µs of CPU per image). Startup objects are frozen
    out of collections altogether."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
