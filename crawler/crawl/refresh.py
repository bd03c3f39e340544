"""`harvest refresh`: observe known images again, in `ids=` batches, under the run's rate gate.

Stats, levels and existence change after an image is first seen. A refresh pass
asks the API for every id it holds (or, with `older_than`, those whose latest
observation, or first sight, is older than that), at most LOOKUP_MAX ids a request.
The answer is a subset: an id absent from it is hidden or deleted (`gone`). Each
batch becomes one observation per id, appended and committed by `ObservationLog`,
exactly once per pass; a killed pass is resumed by the next start.

Requests go through the same `HttpClient` and `RateGate` as a harvest: one budget,
the shared cooldown, the retry loop. A batch that fails for good (its retries spent,
a 400) stops the pass from taking new batches; what was committed stays, and a rerun
resumes with the ids left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from crawler import exactjson
from crawler.archive.checkpoint import ArchiveSpec
from crawler.archive.observations import Observation, ObservationLog, RefreshLedger, RefreshPass
from crawler.civitai.endpoint import Page
from crawler.civitai.images import LOOKUP_MAX, OBSERVED
from crawler.config import Config
from crawler.crawl.api import CivitaiApi, make_api, max_in_flight
from crawler.crawl.pipeline import RunSummary, first_harvest_error, uncancellable
from crawler.crawl.watch import NoProgress, Progress, RefreshTally, ShardView
from crawler.errors import ShardError

log = logging.getLogger("harvest")
KEY = "refresh"  # the one row a progress display shows for a refresh
_STOP = object()


@dataclass(frozen=True, slots=True)
class _Answered:
    ids: Sequence[int]
    page: Page
    at: float  # when the answer came (epoch seconds)


def observations(ids: Sequence[int], page: Page) -> list[Observation]:
    """One observation per asked id: its OBSERVED fields as served, or gone when it is absent.

    Items the server added that were not asked for are ignored; of an id served twice, the
    first item counts.
    """
    served: dict[int, bytes] = {}
    for item_id, line in zip(page.ids, page.lines, strict=True):
        served.setdefault(item_id, line)
    items = dict(zip(page.ids, page.items, strict=True))
    absent = tuple((name, b"null") for name in OBSERVED)
    result = []
    for item_id in ids:
        found = served.get(item_id)
        if found is None:
            result.append(Observation(item_id, True, absent))
        else:
            item = items[item_id]
            result.append(Observation(item_id, False, tuple((n, _served(found, item, n)) for n in OBSERVED)))
    return result


def _served(line: bytes, item: dict[str, Any], name: str) -> bytes:
    """The bytes of `item[name]` as the line holds them (`null` when absent)."""
    if name not in item:
        return b"null"
    try:
        raw = orjson.dumps(item[name])
    except (TypeError, orjson.JSONEncodeError):
        raw = b""
    if raw and (b'"%s":%s' % (name.encode(), raw)) in line:
        return raw  # the compact spelling the API uses: what the line holds
    return exactjson.member_bytes(line, name) or b"null"


async def run_refresh(
    config: Config,
    api_key: str | None,
    progress: Progress | None = None,
    *,
    summary: RunSummary,
    older_than: float | None = None,
    clock: Callable[[], float] = time.time,
) -> RunSummary:
    """One refresh pass of `config`'s output dir (resumed if one is open); see the module doc."""
    started = time.monotonic()
    tally = summary.refresh = RefreshTally()
    out = config.output
    ledger = RefreshLedger.open(out.dir, create=False)
    try:
        spec = ArchiveSpec(
            out.dir, out.segment_items, out.segment_mb, out.compress, out.publish, out.keep_local
        )
        sink = ObservationLog(spec, ledger)  # closed segments take the item segments' steps (publish too)
        try:
            current = ledger.begin_refresh(None if older_than is None else clock() - older_than)
            tally.pass_no, tally.resumed, tally.due = current.number, current.resumed, current.todo
            _announce(current, older_than)
            todo = ledger.todo() if current.open else []
            batches: list[Sequence[int]] = [todo[i : i + LOOKUP_MAX] for i in range(0, len(todo), LOOKUP_MAX)]
            await _observe(config, api_key, batches, sink, current.number, summary, progress or NoProgress())
            tally.complete = not ledger.refresh_pass().open
        finally:
            sink.close()
    finally:
        ledger.close()
        summary.elapsed = time.monotonic() - started
    return summary


def _announce(current: RefreshPass, older_than: float | None) -> None:
    if current.resumed:
        log.info("refresh pass %d: resumed, %d ids left to observe", current.number, current.todo)
        if older_than is not None:
            log.info("refresh: --older-than applies to the next pass; this one resumes as it began")
    elif current.open:
        log.info("refresh pass %d: %d ids to observe", current.number, current.todo)
    else:
        log.info("refresh: nothing is due (no id observed or first seen longer ago than asked)")


async def _observe(
    config: Config,
    api_key: str | None,
    batches: list[Sequence[int]],
    sink: ObservationLog,
    pass_no: int,
    summary: RunSummary,
    progress: Progress,
) -> None:
    workers = min(max_in_flight(config.api), max(len(batches), 1))
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = make_api(session, config.api, api_key)
        summary.counters = client.counters
        summary.shards = 1
        progress.start([ShardView(KEY, f"refresh pass {pass_no}", "active", 0, 0)], client.counters)
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * workers)
        fetch = _Fetcher(client, iter(batches), queue, summary)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(fetch.all(workers))
                group.create_task(_commit_all(queue, sink, pass_no, summary, progress))
        except BaseExceptionGroup as group_error:
            raise first_harvest_error(group_error) from None
        finally:
            progress.stop()
    if not summary.failures:
        summary.shards_done = 1


class _Fetcher:
    """Workers that take the next batch, ask for it and queue the answer; the first batch that
    fails for good stops them taking more."""

    def __init__(self, client: CivitaiApi, batches: Any, queue: asyncio.Queue[Any], summary: RunSummary):
        self._client, self._batches, self._queue, self._summary = client, batches, queue, summary

    async def all(self, workers: int) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(self._work())
        await self._queue.put(_STOP)

    async def _work(self) -> None:
        for ids in self._batches:  # shared by the workers: each batch is taken once
            if self._summary.failures:
                return
            try:
                page = await self._client.lookup(ids)
            except ShardError as exc:
                line = f"refresh: ids {ids[0]}..{ids[-1]} ({len(ids)}): {exc}"
                self._summary.failures.append(line)
                log.error("%s", line)
                return
            await self._queue.put(_Answered(ids, page, time.time()))


async def _commit_all(
    queue: asyncio.Queue[Any], sink: ObservationLog, pass_no: int, summary: RunSummary, progress: Progress
) -> None:
    tally = summary.refresh
    assert tally is not None
    while (answered := await queue.get()) is not _STOP:
        found = observations(answered.ids, answered.page)
        work = asyncio.to_thread(sink.commit, pass_no, found, answered.at)

        def account(_: bool, found: list[Observation] = found) -> None:
            gone = sum(o.gone for o in found)
            tally.observed += len(found)
            tally.gone += gone
            tally.batches += 1
            summary.pages += 1
            summary.new_items += len(found)
            progress.page(KEY, len(found) - gone, len(found))

        await uncancellable(work, account)
    if summary.failures:
        progress.shard_failed(KEY, summary.failures[0])
    else:
        progress.shard_done(KEY)
