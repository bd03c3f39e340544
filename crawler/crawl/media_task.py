"""One task of the Ray media engine: a batch of items' files fetched and put where they belong.

It runs in a Ray worker process, on any node of the cluster, and knows nothing of
Ray or of the state: it gets the items (id, URL, type), the media settings with
this worker's share of the CDN budget, and where files go; it returns how each
item ended (`MediaResult`: key, size, SHA-256, content type, or why not) and its
gate's counters. The coordinator records the results (`crawler.crawl.media_ray`).

The same steps as the single-process stage (`crawler.crawl.media`): the URLs an
item's type calls for, streamed to a `.part` under the worker's own `RateGate`,
checked (an image or a video, a video where one was due), fsynced and renamed to
its deterministic name `<millions>/<thousands>/<id>.<ext>`, then handed to the
target. A task may run more than once (Ray retries a task whose worker died): each
attempt starts every file afresh, and writes the same name with the same bytes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from crawler.archive import media_ledger as ml
from crawler.archive.fs import describe
from crawler.archive.media_files import PartFile, Stored, finished_files, hash_file
from crawler.archive.media_ledger import MediaRef, MediaResult
from crawler.archive.media_publish import MEDIA_PREFIX
from crawler.archive.sniff import HEAD_BYTES, sniff
from crawler.archive.store import ObjectStore, StoreUrl, digest_file
from crawler.civitai.media import candidates
from crawler.config import MediaConfig
from crawler.crawl.media import Expected, downloader_for, is_gone
from crawler.crawl.pipeline import first_harvest_error
from crawler.errors import ApiError, OutputError
from crawler.http.download import Downloader
from crawler.http.gate import Counters


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a finished file ended up: its path under the media dir (the key under the store's
    `media/` prefix), and the object's URL and ETag when it went to the store."""

    path: str
    url: str | None = None
    etag: str | None = None


class Target(Protocol):
    """Where a worker's finished files go (pickled to the worker with the task)."""

    def opened(self) -> OpenTarget:
        """The target as one task attempt uses it, on the worker."""
        ...


class OpenTarget(Protocol):
    def part_root(self) -> Path:
        """The folder `.part` files grow in (and finished files are renamed into, before `put`)."""
        ...

    def already(self, image_id: int) -> Path | None:
        """A finished file of `image_id` an earlier attempt left (renamed, never reported)."""
        ...

    async def put(self, stored: Stored) -> Placed:
        """Make the finished file at `part_root()/stored.path` the target's."""
        ...

    def close(self) -> None:
        """The attempt is over (its scratch space, if any, goes)."""
        ...


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """The media dir itself (every worker sees it: one machine, or a shared file system)."""

    dir: Path

    def opened(self) -> LocalTarget:
        return self

    def part_root(self) -> Path:
        return self.dir

    def already(self, image_id: int) -> Path | None:
        found = finished_files(self.dir, image_id)
        return found[0] if found else None

    async def put(self, stored: Stored) -> Placed:
        return Placed(stored.path)  # renamed into place already

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class StoreTarget:
    """The object store (`[output] publish`): each attempt fetches into a scratch folder of its
    own on the worker, uploads a finished file to `media/<path>` under the store's prefix (the
    key the single-process stage publishes it at), checks it there and deletes it locally.
    Credentials and endpoint come from the worker's own AWS environment."""

    root: StoreUrl

    def opened(self) -> _OpenStore:
        _sweep_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH}{os.getpid()}-"))
        return _OpenStore(ObjectStore(self.root), scratch)


_SCRATCH = "harvest-media-"  # <tmp>/harvest-media-<pid>-<random>: one task attempt's scratch folder


def _sweep_scratch() -> None:
    """Remove the scratch folders of workers that are dead (killed mid-task: nothing cleaned up)."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{_SCRATCH}*-*"):
        pid = folder.name.removeprefix(_SCRATCH).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


class _OpenStore:
    def __init__(self, store: ObjectStore, scratch: Path) -> None:
        self.store, self.scratch = store, scratch

    def part_root(self) -> Path:
        return self.scratch

    def already(self, image_id: int) -> Path | None:
        return None  # the scratch folder is new: an earlier attempt's files are not here

    async def put(self, stored: Stored) -> Placed:
        path = self.scratch / stored.path
        try:
            digest = await asyncio.to_thread(digest_file, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot read it for publishing: {describe(exc)}") from None
        # The same key whatever the attempt: an object there already whole is not sent again.
        found = await asyncio.to_thread(self.store.upload, path, f"{MEDIA_PREFIX}/{stored.path}", digest)
        path.unlink(missing_ok=True)
        return Placed(stored.path, found.url, found.etag)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What one Ray task fetches, and how: `media` carries this worker's share of the budget."""

    refs: tuple[MediaRef, ...]
    media: MediaConfig
    target: Target
    max_wait: float


@dataclass(frozen=True, slots=True)
class TaskResult:
    """How each item of a task ended, and what the task's CDN gate counted."""

    results: tuple[MediaResult, ...]
    counters: Counters = field(default_factory=Counters)
    worker: str = ""  # host:pid, for the coordinator's debug log


def run_task(spec: TaskSpec) -> TaskResult:
    """Fetch every item of `spec` (the body of a Ray task: synchronous, its own event loop)."""
    target = spec.target.opened()
    try:
        return asyncio.run(_run(spec, target))
    except BaseExceptionGroup as error:  # a full disk, the store failing: that error, not its group
        raise first_harvest_error(error) from None
    finally:
        target.close()


async def _run(spec: TaskSpec, target: OpenTarget) -> TaskResult:
    media = spec.media
    connector = aiohttp.TCPConnector(limit=media.concurrency)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        downloader = downloader_for(session, media, spec.max_wait)
        fetcher = _Fetcher(media, target, downloader)
        results = await _each(fetcher, spec.refs, media.concurrency)
        return TaskResult(tuple(results), downloader.counters, f"{socket.gethostname()}:{os.getpid()}")


async def _each(fetcher: _Fetcher, refs: Sequence[MediaRef], concurrency: int) -> list[MediaResult]:
    """`fetcher.fetch` over `refs`, `concurrency` at a time, results in the order of `refs`."""
    results: list[MediaResult | None] = [None] * len(refs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(refs)):
        queue.put_nowait(index)

    async def work() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            results[index] = await fetcher.fetch(refs[index])

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(refs))):
            group.create_task(work())
    return [r for r in results if r is not None]


class _Fetcher:
    def __init__(self, media: MediaConfig, target: OpenTarget, downloader: Downloader) -> None:
        self.media, self.target, self.downloader = media, target, downloader

    async def fetch(self, ref: MediaRef) -> MediaResult:
        found = self.target.already(ref.id)
        if found is not None:
            return await self._adopt(ref, found)
        part = PartFile(self.target.part_root(), ref.id)
        gone: list[str] = []
        failed: list[str] = []
        for url in candidates(ref.url, ref.type, self.media.variant, self.media.video_base):
            part.discard()  # afresh: what another attempt (or URL) left is not known to be this one's
            try:
                await self.downloader.fetch(url, Expected(part, ref.type))
            except ApiError as error:
                (gone if is_gone(error) else failed).append(str(error))
                part.discard()
                continue
            return await self._finish(ref, part, url)
        if gone and not failed:
            return MediaResult(ref.id, ml.GONE, error=gone[-1])
        return MediaResult(ref.id, ml.FAILED, error=failed[-1])

    async def _finish(self, ref: MediaRef, part: PartFile, url: str) -> MediaResult:
        fmt = sniff(part.head)
        assert fmt is not None, "the sink refuses what is not media"
        stored = await asyncio.to_thread(part.finish, fmt.ext)  # fsync and rename: off the loop
        placed = await self.target.put(stored)
        return _done(ref, placed, stored, fmt.content_type, url)

    async def _adopt(self, ref: MediaRef, path: Path) -> MediaResult:
        stored = await asyncio.to_thread(hash_file, path)
        with path.open("rb") as stream:
            fmt = sniff(stream.read(HEAD_BYTES))  # renamed only after the sink's check: it is media
        content_type = fmt.content_type if fmt is not None else "application/octet-stream"
        relative = path.relative_to(self.target.part_root()).as_posix()
        placed = await self.target.put(Stored(relative, stored.size, stored.sha256))
        return _done(ref, placed, stored, content_type, None)


def _done(ref: MediaRef, placed: Placed, stored: Stored, content_type: str, url: str | None) -> MediaResult:
    return MediaResult(
        ref.id,
        ml.DONE,
        placed.path,
        stored.size,
        stored.sha256,
        content_type,
        source=url,
        url=placed.url,
        etag=placed.etag,
    )
