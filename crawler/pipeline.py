"""The run: one cursor-walking producer per shard, one bounded queue, one committer.

Producers fetch pages under the client's shared limiter and concurrency cap and
put them on a bounded queue (backpressure: a slow disk slows the fetching). A
single committer takes pages in order and checkpoints them, so a shard's pages
are committed in the order they were walked and the state has one writer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from crawler.checkpoint import Checkpointer, PageResult
from crawler.client import ApiClient, Counters, Page
from crawler.config import Config
from crawler.errors import CursorLoopError, HarvestError, ShardError
from crawler.incremental import WalkPlan, plan_walk
from crawler.progress import NoProgress, Progress, ShardView
from crawler.shards import PlanFailure, Shard, check_items, describe, plan_shards
from crawler.state import Cursor, ShardStatus, State

log = logging.getLogger("harvest")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Fetched:
    shard: Shard
    cursor: Cursor | None
    page: Page
    # Set for incremental walks: the walker waits for the commit to learn
    # whether the page was all known, so it never fetches past the frontier.
    committed: asyncio.Future[PageResult] | None = None


@dataclass(frozen=True, slots=True)
class _Failed:
    shard: Shard
    error: str


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
    config: Config, state: State, api_key: str | None, progress: Progress | None = None
) -> RunSummary:
    """Walk every shard of `config` into its output dir; resumable at any instant."""
    started = time.monotonic()
    summary = RunSummary()
    connector = aiohttp.TCPConnector(limit=config.api.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = ApiClient(session, config.api, api_key)
        summary.counters = client.counters
        try:
            shards, plan_failures = await plan_shards(config.queries, client)
            summary.failures += [f"{f.query} [{f.what}]: {f.error}" for f in plan_failures]
            await _walk_all(shards, state, client, config, summary, progress or NoProgress())
            _close_pass(state, shards, plan_failures)
        finally:
            summary.elapsed = time.monotonic() - started
    return summary


def _close_pass(state: State, shards: Sequence[Shard], failures: Sequence[PlanFailure]) -> None:
    if not failures:
        state.finish_pass_if_complete(s.key for s in shards)


async def _walk_all(
    shards: Sequence[Shard],
    state: State,
    client: ApiClient,
    config: Config,
    summary: RunSummary,
    progress: Progress,
) -> None:
    state.begin_pass((s.key, s.query) for s in shards)
    rows = {s.key: state.shard(s.key) for s in shards}
    todo = [s for s in shards if rows[s.key].status != ShardStatus.DONE]
    summary.shards = len(shards)
    summary.shards_done = len(shards) - len(todo)
    log.info("%d shards, %d to walk", len(shards), len(todo))
    progress.start([_view(s, rows[s.key]) for s in shards], client.counters)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * config.api.concurrency)
    sink = Checkpointer(config.output, state)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_produce(todo, rows, client, queue))
            group.create_task(_consume(queue, sink, state, summary, progress))
    except BaseExceptionGroup as group_error:
        raise _first_harvest_error(group_error) from None
    finally:
        progress.stop()
        sink.close()


def _view(shard: Shard, row: Any) -> ShardView:
    return ShardView(shard.key, shard.query, row.status, row.items, row.pages)


def _first_harvest_error(group: BaseExceptionGroup) -> BaseException:
    """Report the error that stopped the run, not the cancellations it caused."""
    leaves = list(_leaves(group))
    return next((e for e in leaves if isinstance(e, HarvestError)), leaves[0])


def _leaves(error: BaseException) -> Any:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


async def _produce(
    shards: Sequence[Shard], rows: dict[str, Any], client: ApiClient, queue: asyncio.Queue[Any]
) -> None:
    async with asyncio.TaskGroup() as walkers:
        for shard in shards:
            walkers.create_task(_walk(shard, plan_walk(shard, rows[shard.key]), client, queue))
    await queue.put(_STOP)


async def _walk(shard: Shard, plan: WalkPlan, client: ApiClient, queue: asyncio.Queue[Any]) -> None:
    """Follow one shard's cursors until `nextCursor` is absent, never on a short page."""
    cursor = plan.start
    used: set[str] = set()
    try:
        while True:
            used.add(repr(cursor))
            page = await client.images(shard.params, cursor)
            check_items(shard, page.items)
            if page.next_cursor is not None and repr(page.next_cursor) in used:
                raise CursorLoopError(
                    f"the cursor looped: {page.next_cursor!r} was already followed in this walk"
                )
            committed = asyncio.get_running_loop().create_future() if plan.stop_when_known else None
            await queue.put(_Fetched(shard, cursor, page, committed))
            if page.next_cursor is None or (committed is not None and (await committed).done):
                return
            cursor = page.next_cursor
    except ShardError as exc:
        await queue.put(_Failed(shard, str(exc)))


async def _consume(
    queue: asyncio.Queue[Any],
    sink: Checkpointer,
    state: State,
    summary: RunSummary,
    progress: Progress,
) -> None:
    while (message := await queue.get()) is not _STOP:
        if isinstance(message, _Failed):
            state.mark_failed(message.shard.key, message.error)
            summary.failures.append(f"{describe(message.shard)}: {message.error}")
            log.error("shard %s failed: %s", describe(message.shard), message.error)
            progress.shard_failed(message.shard.key, message.error)
            continue
        page = message.page
        result = await _uncancellable(
            asyncio.to_thread(
                sink.commit,
                message.shard.key,
                message.cursor,
                page.items,
                page.next_cursor,
                message.committed is not None,
            )
        )
        if message.committed is not None:
            message.committed.set_result(result)
        summary.pages += 1
        summary.new_items += result.new_items
        progress.page(message.shard.key, result.new_items, len(page.items))
        log.debug("%s: %d new of %d", describe(message.shard), result.new_items, len(page.items))
        if result.done:
            summary.shards_done += 1
            progress.shard_done(message.shard.key)
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
