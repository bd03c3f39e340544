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
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from crawler.archive.checkpoint import ArchiveSpec, Checkpointer
from crawler.archive.state import ShardStatus, State
from crawler.config import Config
from crawler.crawl.api import CivitaiApi, make_api
from crawler.crawl.plan import plan_walk
from crawler.crawl.shards import PlanFailure, Shard, describe, plan_shards, split
from crawler.crawl.walker import Failed, Fetched, Split, walk
from crawler.crawl.watch import NoProgress, Progress, ShardView
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

    @property
    def ok(self) -> bool:
        return not self.failures


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
    sink = Checkpointer(ArchiveSpec(out.dir, out.segment_items, out.segment_mb, out.compress), state)
    try:
        connector = aiohttp.TCPConnector(limit=config.api.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = make_api(session, config.api, api_key)
            summary.counters = client.counters
            planned, plan_failures = await plan_shards(config.queries, client)
            summary.failures += [f"{f.query} [{f.what}]: {f.error}" for f in plan_failures]
            state.begin_pass((s.key, s.query) for s in planned)
            shards = list(_leaves_of(planned, state))
            await _walk_all(shards, state, client, sink, config, summary, progress or NoProgress())
            _close_pass(state, shards, plan_failures)
    finally:
        summary.elapsed = time.monotonic() - started
        sink.close()
    return summary


def _leaves_of(shards: Sequence[Shard], state: State) -> Iterator[Shard]:
    """The shards to walk: a shard split in an earlier run is walked as its children."""
    for shard in shards:
        if state.shard(shard.key).status != ShardStatus.SPLIT:
            yield shard
            continue
        children = split(shard)
        state.enrol((c.key, c.query) for c in children)
        yield from _leaves_of(children, state)


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
    todo = [s for s in shards if rows[s.key].status != ShardStatus.DONE]
    summary.shards = len(shards)
    summary.shards_done = len(shards) - len(todo)
    log.info("%d shards, %d to walk", len(shards), len(todo))
    progress.start([_view(s, rows[s.key]) for s in shards], client.counters)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * config.api.concurrency)
    committer = _Committer(sink, state, summary, progress, shards)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_produce(todo, rows, client, queue))
            group.create_task(committer.consume(queue))
    except BaseExceptionGroup as group_error:
        raise _first_harvest_error(group_error) from None
    finally:
        progress.stop()


def _view(shard: Shard, row: Any) -> ShardView:
    return ShardView(shard.key, shard.query, row.status, row.items, row.pages)


def _first_harvest_error(group: BaseExceptionGroup) -> BaseException:
    """Report the error that stopped the run, not the cancellations it caused."""
    leaves = list(_errors(group))
    return next((e for e in leaves if isinstance(e, HarvestError)), leaves[0])


def _errors(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _errors(inner)
    else:
        yield error


async def _produce(
    shards: Sequence[Shard], rows: dict[str, Any], client: CivitaiApi, queue: asyncio.Queue[Any]
) -> None:
    async with asyncio.TaskGroup() as walkers:
        for shard in shards:
            walkers.create_task(walk(shard, plan_walk(shard, rows[shard.key]), client, queue))
    await queue.put(_STOP)


class _Committer:
    """Takes the queue's messages in order; the only writer of the state during a run."""

    def __init__(
        self, sink: Checkpointer, state: State, summary: RunSummary, progress: Progress, shards: list[Shard]
    ) -> None:
        self._sink, self._state, self._summary, self._progress = sink, state, summary, progress
        self._shards = shards  # grows when a shard is split

    async def consume(self, queue: asyncio.Queue[Any]) -> None:
        while (message := await queue.get()) is not _STOP:
            if isinstance(message, Failed):
                self._failed(message)
            elif isinstance(message, Split):
                self._split(message)
            else:
                await self._commit(message)

    def _failed(self, message: Failed) -> None:
        self._state.mark_failed(message.shard.key, message.error)
        self._summary.failures.append(f"{describe(message.shard)}: {message.error}")
        log.error("shard %s failed: %s", describe(message.shard), message.error)
        self._progress.shard_failed(message.shard.key, message.error)

    def _split(self, message: Split) -> None:
        self._state.record_split(message.shard.key, [(c.key, c.query) for c in message.children])
        self._shards.remove(message.shard)
        self._shards.extend(message.children)
        self._summary.shards += len(message.children) - 1

    async def _commit(self, message: Fetched) -> None:
        page = message.page
        incremental = message.committed is not None
        result = await _uncancellable(
            asyncio.to_thread(
                self._sink.commit,
                message.shard.key,
                message.cursor,
                page,
                page.next_cursor,
                incremental,
            )
        )
        if message.committed is not None:
            message.committed.set_result(result)
        self._summary.pages += 1
        self._summary.new_items += result.new_items
        self._progress.page(message.shard.key, result.new_items, len(page.items))
        log.debug("%s: %d new of %d", describe(message.shard), result.new_items, len(page.items))
        if result.done:
            self._summary.shards_done += 1
            self._progress.shard_done(message.shard.key)
            log.info("shard %s done", describe(message.shard))


async def _uncancellable(work: Awaitable[T]) -> T:
    """Let a commit that has started finish even if the run is being cancelled.

    The commit runs in a thread; abandoning it would let the state be closed
    under it. Cancellation is re-raised once it is over.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
