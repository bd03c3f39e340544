"""The run: one cursor-walking producer per shard, one bounded queue, one committer.

Producers (`walker`) fetch pages under the client's shared limiter and
concurrency cap and put them on a bounded queue (backpressure: a slow disk slows
the fetching). A single committer takes them in order and checkpoints them, so a
shard's pages are committed in the order they were walked and the state has one
writer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp

from crawler.archive.checkpoint import ArchiveSpec, Checkpointer, PageResult, WalkNote
from crawler.archive.state import ShardStatus, State
from crawler.config import Config
from crawler.crawl.api import CivitaiApi, make_api, max_in_flight
from crawler.crawl.coverage import capped_lines, leaves_of, other_end, sfw_warnings
from crawler.crawl.plan import WalkPlan, plan_walk
from crawler.crawl.shards import PlanFailure, Shard, describe, plan_shards
from crawler.crawl.walker import Ends, Failed, Fetched, Split, Walker, walk_all
from crawler.crawl.watch import MediaTally, NoProgress, Progress, RefreshTally, ShardView
from crawler.errors import HarvestError
from crawler.http.gate import Counters

log = logging.getLogger("harvest")
T = TypeVar("T")
_STOP = object()


@dataclass(slots=True)
class RunSummary:
    """What one run did; the CLI prints it and picks the exit status from it."""

    shards: int = 0
    shards_done: int = 0
    failures: list[str] = field(default_factory=list)
    new_items: int = 0
    pages: int = 0
    elapsed: float = 0.0
    counters: Counters = field(default_factory=Counters)
    capped: list[str] = field(default_factory=list)  # one line per shard with images out of reach
    levels: dict[str, dict[int, int]] = field(default_factory=dict)  # served this run: shard -> level -> n
    warnings: list[str] = field(default_factory=list)  # said at the end of the run (the SFW host)
    command: str = "run"  # the subcommand: "run", or "media" (the media stage alone)
    media: MediaTally | None = None  # what the media stage did, when it ran
    refresh: RefreshTally | None = None  # what `harvest refresh` did (command "refresh")

    @property
    def ok(self) -> bool:
        media_failed = self.media is not None and self.media.failed > 0
        return not self.failures and not self.capped and not media_failed


async def run_harvest(
    config: Config,
    state: State,
    api_key: str | None,
    progress: Progress | None = None,
    *,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Walk every shard of `config` into its output dir; resumable at any instant.

    Pass your own `summary` to read what the run did even when it raises or is cancelled.
    """
    started = time.monotonic()
    summary = RunSummary() if summary is None else summary
    out = config.output
    # Opened first: it refuses files that disagree with the state before any request.
    sink = Checkpointer(
        ArchiveSpec(out.dir, out.segment_items, out.segment_mb, out.compress, out.publish, out.keep_local),
        state,
    )
    try:
        connector = aiohttp.TCPConnector(limit=max_in_flight(config.api))
        async with aiohttp.ClientSession(connector=connector) as session:
            client = make_api(session, config.api, api_key)
            summary.counters = client.counters
            planned, plan_failures = await plan_shards(config.queries, client)
            summary.failures += [f"{f.query} [{f.what}]: {f.error}" for f in plan_failures]
            state.begin_pass((s.key, s.query) for s in planned)
            shards = list(leaves_of(planned, state))
            await _walk_all(shards, state, client, sink, config, summary, progress or NoProgress())
            _close_pass(state, shards, plan_failures)
            summary.capped = capped_lines(state, shards)
            summary.warnings = sfw_warnings(state, shards)
            for line in summary.warnings:
                log.warning("%s", line)
    finally:
        summary.elapsed = time.monotonic() - started
        sink.close()
    return summary


def _close_pass(state: State, shards: Sequence[Shard], failures: Sequence[PlanFailure]) -> None:
    if not failures:
        state.finish_pass_if_complete(s.key for s in shards)


async def _walk_all(
    shards: list[Shard],
    state: State,
    client: CivitaiApi,
    sink: Checkpointer,
    config: Config,
    summary: RunSummary,
    progress: Progress,
) -> None:
    rows = {s.key: state.shard(s.key) for s in shards}
    plans = {s.key: plan_walk(s, rows[s.key], other_end(s, rows[s.key])) for s in shards}
    for shard in shards:
        if rows[shard.key].status not in ShardStatus.FINISHED and plans[shard.key].skip:
            rows[shard.key] = replace(rows[shard.key], status=state.finish_unwalked(shard.key))
    todo = [s for s in shards if rows[s.key].status not in ShardStatus.FINISHED]
    # Longest work first: what a previous pass found a shard to hold; unknown ones keep config order.
    todo.sort(key=lambda s: -rows[s.key].items)
    summary.shards = len(shards)
    summary.shards_done = len(shards) - len(todo)
    log.info("%d shards, %d to walk", len(shards), len(todo))
    progress.start([_view(s, rows[s.key]) for s in shards], client.counters)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * max_in_flight(config.api))
    committer = _Committer(sink, state, summary, progress, shards)
    try:
        async with asyncio.TaskGroup() as group:
            walker = Walker(client, queue, config.api.walk_cap, config.api.max_pages_without_new)
            group.create_task(_produce(todo, [plans[s.key] for s in todo], walker))
            group.create_task(committer.consume(queue))
    except BaseExceptionGroup as group_error:
        raise first_harvest_error(group_error) from None
    finally:
        progress.stop()


def _view(shard: Shard, row: Any) -> ShardView:
    return ShardView(shard.key, shard.query, row.status, row.items, row.pages)


def first_harvest_error(group: BaseExceptionGroup) -> BaseException:
    """Report the error that stopped the run, not the cancellations it caused."""
    leaves = list(_errors(group))
    return next((e for e in leaves if isinstance(e, HarvestError)), leaves[0])


def _errors(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _errors(inner)
    else:
        yield error


async def _produce(shards: Sequence[Shard], plans: Sequence[WalkPlan], walker: Walker) -> None:
    await walk_all(shards, plans, walker)
    await walker.queue.put(_STOP)


class _Committer:
    """Takes the queue's messages in order; the only writer of the state during a run."""

    def __init__(
        self, sink: Checkpointer, state: State, summary: RunSummary, progress: Progress, shards: list[Shard]
    ) -> None:
        self._sink, self._state, self._summary, self._progress = sink, state, summary, progress
        self._shards = shards  # grows when a shard is split
        self._done: set[str] = set()

    async def consume(self, queue: asyncio.Queue[Any]) -> None:
        while (message := await queue.get()) is not _STOP:
            if isinstance(message, Failed):
                self._failed(message)
            elif isinstance(message, Split):
                self._split(message)
            elif isinstance(message, Ends):
                self._ends(message)
            else:
                await self._commit(message)

    def _failed(self, message: Failed) -> None:
        self._state.mark_failed(message.shard.key, message.error)
        self._summary.failures.append(f"{describe(message.shard)}: {message.error}")
        log.error("shard %s failed: %s", describe(message.shard), message.error)
        self._progress.shard_failed(message.shard.key, message.error)

    def _split(self, message: Split) -> None:
        children = [(c.key, c.query) for c in message.children]
        self._state.record_split(message.shard.key, children, ends=message.ends)
        self._shards.remove(message.shard)
        self._shards.extend(message.children)
        self._summary.shards += len(message.children) - 1

    def _ends(self, message: Ends) -> None:
        self._state.record_ends(message.shard.key, (message.other.key, message.other.query), message.deepest)
        self._shards.append(message.other)
        self._summary.shards += 1

    async def _commit(self, message: Fetched) -> None:
        page = message.page
        note = WalkNote(
            message.stop_when_known,
            message.depth,
            message.capped,
            message.other_end,
            message.levels(),
            message.may_meet,
        )
        work = asyncio.to_thread(
            self._sink.commit, message.shard.key, message.cursor, page, page.next_cursor, note
        )
        await uncancellable(work, lambda result: self._account(message, note, result))

    def _account(self, message: Fetched, note: WalkNote, result: PageResult) -> None:
        """What a committed page changed, in the summary and the display (also when cancelled)."""
        page = message.page
        if message.committed is not None and not message.committed.done():  # its walker may be gone
            message.committed.set_result(result)
        self._summary.pages += 1
        self._summary.new_items += result.new_items
        served = self._summary.levels.setdefault(message.shard.key, {})
        for level, n in note.levels.items():
            served[level] = served.get(level, 0) + n
        self._progress.page(message.shard.key, result.new_items, len(page.items))
        log.debug("%s: %d new of %d", describe(message.shard), result.new_items, len(page.items))
        if result.done:
            self._shard_done(message.shard)
        if result.met:  # the other end is done with this one
            other = next((s for s in self._shards if s.key == message.other_end), None)
            if other is not None:
                self._shard_done(other)

    def _shard_done(self, shard: Shard) -> None:
        if shard.key in self._done:
            return
        self._done.add(shard.key)
        self._summary.shards_done += 1
        self._progress.shard_done(shard.key)
        log.info("shard %s done", describe(shard))


async def uncancellable(work: Awaitable[T], then: Callable[[T], None]) -> None:
    """Let a commit that has started finish, and be counted by `then`, even if the run is
    being cancelled.

    The commit runs in a thread; abandoning it would let the state be closed
    under it. Cancellation is re-raised once it is over and counted.
    """
    task = asyncio.ensure_future(work)
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        then(await task)
        raise
    then(result)
