"""The media stage: the file of every committed item, on disk once, verified, resumable.

Work comes from two places. First, rows an earlier run left `fetching` (it was
killed mid-file, or between a file's rename and its record) or `failed` (and
`gone`, when asked to). Then the committed lines past the scan point: every item
of a wanted type without a row yet. While `harvest run` walks, the stage follows
the pages it commits; `harvest media` does only this.

Each file is fetched under the CDN's own `RateGate` (its budget, its shared
cooldown), streamed to `<id>.part`, checked (its bytes are an image or a video,
a video where one was due), fsynced, renamed to `<id>.<ext>` and only then
recorded with its size, SHA-256 and content type. The scan point moves past an
item only once its row says how it ended, so a crash at any instant loses no item.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from crawler import exactjson
from crawler.archive import media_ledger as ml
from crawler.archive.media_files import PartFile, finished_files, hash_file
from crawler.archive.media_ledger import MediaLedger, MediaRef, ScanPoint
from crawler.archive.media_publish import MediaPublisher
from crawler.archive.reader import committed_blocks
from crawler.archive.sniff import HEAD_BYTES, sniff
from crawler.archive.state import SegmentRow, State
from crawler.civitai.media import candidates
from crawler.config import Config, MediaConfig
from crawler.crawl.pipeline import RunSummary, first_harvest_error, run_harvest
from crawler.crawl.watch import MediaTally, Progress
from crawler.errors import ApiError, NotFoundError
from crawler.http.client import HttpSettings
from crawler.http.download import Downloader
from crawler.http.gate import RateGate

log = logging.getLogger("harvest")
_Queue = asyncio.Queue[MediaRef | None]  # None: no more work

_GONE_STATUSES = (404, 410)
_BLOCK = 1 << 20  # bytes of committed lines read at a time by the scan
_IDLE = 1.0  # seconds between looks for new pages while a harvest runs


def downloader_for(session: aiohttp.ClientSession, media: MediaConfig, max_wait: float) -> Downloader:
    """The CDN's client: a gate (budget, cooldown) of its own, nothing of the API's headers."""
    settings = HttpSettings(
        base_url="",
        timeout=media.timeout,
        max_retries=media.max_retries,
        max_backoff=media.max_backoff,
        requests_per_second=media.requests_per_second,
        concurrency=media.concurrency,
        max_wait=max_wait,
    )
    gate = RateGate(media.requests_per_second, media.concurrency, max_backoff=media.max_backoff)
    return Downloader(session, gate, settings)


async def run_media(
    config: Config,
    tally: MediaTally,
    *,
    harvest: asyncio.Task[RunSummary] | None = None,
    retry_gone: bool = False,
) -> None:
    """Fetch the media of `config`'s output dir; with `harvest`, follow it until it ends."""
    media = config.media
    # No cookies either: nothing the CDN sets is sent back to it, or anywhere else.
    connector = aiohttp.TCPConnector(limit=media.concurrency)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        downloader = downloader_for(session, media, config.api.max_wait)
        tally.counters = downloader.counters
        with MediaLedger.open(config.output.dir) as ledger:
            publish = config.output.publish
            publisher = (
                MediaPublisher(media.dir, ledger, publish, config.output.keep_local) if publish else None
            )
            stage = MediaStage(media, config.output.dir, ledger, downloader, tally, publisher)
            try:
                await stage.run(harvest, retry_gone=retry_gone)
            except BaseExceptionGroup as error:  # a full disk, say: the error, not its group
                raise first_harvest_error(error) from None


async def harvest_with_media(
    config: Config, state: State, api_key: str | None, progress: Progress, summary: RunSummary
) -> RunSummary:
    """`harvest run` with `[media] download = true`: the media stage follows the harvest's
    commits while it walks, and ends once every committed item's media is settled."""
    tally = summary.media = MediaTally()
    progress.media(tally)
    walking = _KeepShowing(progress)  # the harvest's end does not end the display
    try:
        async with asyncio.TaskGroup() as group:
            harvest = group.create_task(run_harvest(config, state, api_key, walking, summary=summary))
            group.create_task(run_media(config, tally, harvest=harvest))
    except BaseExceptionGroup as error:
        raise first_harvest_error(error) from None
    finally:
        progress.stop()
    return summary


async def media_alone(config: Config, progress: Progress, summary: RunSummary, *, retry_gone: bool) -> None:
    """`harvest media`: only the media stage, over what is committed now."""
    tally = summary.media = MediaTally()
    progress.start([], tally.counters)
    progress.media(tally)
    started = time.monotonic()
    try:
        await run_media(config, tally, retry_gone=retry_gone)
    finally:
        summary.elapsed = time.monotonic() - started
        progress.stop()


class _KeepShowing:
    """A progress display whose `stop` waits for the media stage: every other hook passes."""

    def __init__(self, inner: Progress) -> None:
        self.start, self.page, self.media = inner.start, inner.page, inner.media
        self.shard_done, self.shard_failed = inner.shard_done, inner.shard_failed

    def stop(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Spot:
    """Where an item's line starts: the scan point may not pass it until its row is final."""

    segment: str
    offset: int


class MediaStage:
    """One pass over the media work of an output dir, `media.concurrency` downloads at a time."""

    def __init__(
        self,
        media: MediaConfig,
        out_dir: Path,
        ledger: MediaLedger,
        downloader: Downloader,
        tally: MediaTally,
        publisher: MediaPublisher | None = None,
    ) -> None:
        self.media, self.out_dir, self.ledger = media, out_dir, ledger
        self.downloader, self.tally = downloader, tally
        self.publisher = publisher  # `[output] publish`: each file goes to the store once recorded
        self._pending: set[int] = set()  # queued or downloading: never queued twice
        self._open: OrderedDict[int, _Spot] = OrderedDict()  # scanned items not ended, in line order
        self._point = ScanPoint(tuple(sorted(media.types)))
        self._scanned: _Spot | None = None  # the end of what the scan has read

    async def run(self, harvest: asyncio.Task[RunSummary] | None, *, retry_gone: bool = False) -> None:
        queue: _Queue = asyncio.Queue(maxsize=2 * self.media.concurrency)
        if self.publisher is not None:  # files recorded but not published (a crash, or publish is new)
            await self.publisher.backlog(self.media.concurrency)
        async with asyncio.TaskGroup() as group:
            workers = [group.create_task(self._work(queue)) for _ in range(self.media.concurrency)]
            await self._produce(queue, harvest, retry_gone)
            for _ in workers:
                await queue.put(None)
        self._save_point()

    # -- what to fetch ----------------------------------------------------------------

    async def _produce(
        self,
        queue: _Queue,
        harvest: asyncio.Task[RunSummary] | None,
        retry_gone: bool,
    ) -> None:
        statuses = [ml.FETCHING, ml.FAILED] + ([ml.GONE] if retry_gone else [])
        for ref in self.ledger.refs(statuses, self.media.types):
            self._pending.add(ref.id)
            await queue.put(ref)
        self._point = self.ledger.scan_point(self.media.types)
        while harvest is not None and not harvest.done():
            await self._scan(queue)
            await asyncio.wait([harvest], timeout=_IDLE)
        await self._scan(queue)  # after the harvest's last page (or alone: once)

    async def _scan(self, queue: _Queue) -> None:
        """Queue every wanted item committed past the scan point that has no row yet."""
        for segment in self.ledger.segments():
            if segment.name < self._point.segment:
                continue
            start = self._point.offset if segment.name == self._point.segment else 0
            for block_start, block in _blocks(self.out_dir, self.ledger, segment, start):
                await self._take(queue, segment.name, block_start, block)
                self._save_point()

    async def _take(self, queue: _Queue, segment: str, offset: int, block: bytes) -> None:
        lines = list(_refs(block, offset))
        known = self.ledger.statuses([ref.id for _, ref in lines if ref is not None])
        for spot, ref in lines:
            if ref is None or ref.type not in self.media.types or ref.id in known or ref.id in self._pending:
                continue
            self._pending.add(ref.id)
            self._open[ref.id] = _Spot(segment, spot)
            await queue.put(ref)
        self._scanned = _Spot(segment, offset + len(block))

    def _save_point(self) -> None:
        """Move the scan point to the first item still open (or the end of what was scanned)."""
        if self._scanned is None:
            return
        spot = next(iter(self._open.values()), self._scanned)
        point = ScanPoint(self._point.types, spot.segment, spot.offset)
        if point != self._point:
            self.ledger.set_scan_point(point)
            self._point = point

    # -- fetching ---------------------------------------------------------------------

    async def _work(self, queue: _Queue) -> None:
        while (ref := await queue.get()) is not None:
            try:
                await self._fetch(ref)
            finally:
                self._pending.discard(ref.id)
                self._open.pop(ref.id, None)

    async def _fetch(self, ref: MediaRef) -> None:
        source = self.ledger.source(ref.id)
        self.ledger.begin(ref)
        found = finished_files(self.media.dir, ref.id)
        if found:  # renamed by a run that died before recording it
            await self._adopt(ref, found[0])
            return
        part = PartFile(self.media.dir, ref.id)
        gone: list[str] = []
        failed: list[str] = []
        for url in candidates(ref.url, ref.type, self.media.variant, self.media.video_base):
            if source != url:
                part.discard()  # bytes of another URL cannot be continued from this one
                self.ledger.trying(ref.id, url)
                source = url
            try:
                await self.downloader.fetch(url, Expected(part, ref.type))
            except ApiError as error:
                if is_gone(error):
                    part.discard()
                    gone.append(str(error))
                else:
                    part.close()  # kept: the next attempt continues it
                    failed.append(str(error))
                continue
            await self._finish(ref, part, url)
            return
        self._ended(ref, gone, failed)

    async def _finish(self, ref: MediaRef, part: PartFile, url: str) -> None:
        fmt = sniff(part.head)
        assert fmt is not None, "the sink refuses what is not media"
        stored = await asyncio.to_thread(part.finish, fmt.ext)  # fsync and rename: off the loop
        self.ledger.done(ref.id, stored.path, stored.size, stored.sha256, fmt.content_type)
        if self.publisher is not None:
            await self.publisher.publish(ref.id, stored.path, stored.sha256)
        self.tally.file_done(stored.size)
        log.debug("media %d: %s, %d bytes from %s", ref.id, fmt.content_type, stored.size, url)

    async def _adopt(self, ref: MediaRef, path: Path) -> None:
        stored = await asyncio.to_thread(hash_file, path)
        with path.open("rb") as stream:
            fmt = sniff(stream.read(HEAD_BYTES))  # renamed only after the sink's check: it is media
        content_type = fmt.content_type if fmt is not None else "application/octet-stream"
        relative = path.relative_to(self.media.dir).as_posix()
        self.ledger.done(ref.id, relative, stored.size, stored.sha256, content_type)
        PartFile(self.media.dir, ref.id).discard()
        if self.publisher is not None:
            await self.publisher.publish(ref.id, relative, stored.sha256)
        self.tally.file_done(stored.size)

    def _ended(self, ref: MediaRef, gone: list[str], failed: list[str]) -> None:
        if gone and not failed:
            self.ledger.ended(ref.id, ml.GONE, gone[-1])
            self.tally.gone += 1
            log.info("media %d is gone: %s", ref.id, gone[-1])
            return
        why = failed[-1]
        self.ledger.ended(ref.id, ml.FAILED, why)
        self.tally.failed_with(f"media {ref.id}: {why}")
        log.warning("media %d failed: %s", ref.id, why)


def is_gone(error: ApiError) -> bool:
    status = error.outcome.status if error.outcome is not None else None
    return isinstance(error, NotFoundError) or status in _GONE_STATUSES


class Expected:
    """The sink of one attempt: the `.part` file, and what the item's type says it must hold."""

    def __init__(self, part: PartFile, kind: str) -> None:
        self.part, self.kind = part, kind
        self.held, self.begin, self.write = part.held, part.begin, part.write

    def refuse(self, content_type: str) -> str | None:
        fmt = sniff(self.part.head)
        why = None
        if fmt is None:
            what = "an HTML page" if self.part.head.lstrip()[:1] == b"<" else content_type or "bytes"
            why = f"{what} where the {self.kind} was due"
        elif self.kind == "video" and fmt.kind != "video":
            why = f"a still ({fmt.content_type}) where the video was due"
        if why is not None:
            self.part.discard()  # never continued: the next attempt starts over
        return why


def committed_refs(
    out_dir: Path, ledger: MediaLedger, point: ScanPoint
) -> Iterator[tuple[ScanPoint, list[MediaRef]]]:
    """Per block of committed lines past `point`: the point at the block's end, and what
    every line of it says of its media (of any type: the caller picks)."""
    for segment in ledger.segments():
        if segment.name < point.segment:
            continue
        start = point.offset if segment.name == point.segment else 0
        for block_start, block in _blocks(out_dir, ledger, segment, start):
            refs = [ref for _, ref in _refs(block, block_start) if ref is not None]
            yield ScanPoint(point.types, segment.name, block_start + len(block)), refs


def _blocks(
    out_dir: Path, ledger: MediaLedger, segment: SegmentRow, start: int
) -> Iterator[tuple[int, bytes]]:
    """(where it starts, bytes) of each block of whole committed lines of `segment` from `start`."""
    offset = start
    for block in committed_blocks(out_dir, ledger, segment, start, block=_BLOCK):
        yield offset, block
        offset += len(block)


def _refs(block: bytes, offset: int) -> Iterator[tuple[int, MediaRef | None]]:
    """(where the line starts, what it says of its media) for every line of a block."""
    for line in block.splitlines(keepends=True):
        yield offset, _ref_of(line)
        offset += len(line)


def _ref_of(line: bytes) -> MediaRef | None:
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            item = exactjson.loads(line)  # lone surrogates, integers beyond 64 bits
        except exactjson.NotJson:
            return None
    if not isinstance(item, dict):
        return None
    image_id, url, kind = item.get("id"), item.get("url"), item.get("type", "image")
    if not isinstance(image_id, int) or not isinstance(url, str) or not url:
        return None
    return MediaRef(image_id, url, kind if isinstance(kind, str) else "image")
