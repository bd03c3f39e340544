"""The media stage on Ray (`harvest media CONFIG --engine ray`): workers fetch, one process records.

The harvest process is the coordinator. It alone opens the state: it builds the
work list from the media ledger (rows left `fetching` or `failed`, and `gone` on
request) and from the committed lines past the scan point (every item of a wanted
type without a row), in line order, and hands it to Ray in tasks of
`task_items` items (`crawler.crawl.media_task.run_task`). At most `workers`
tasks run at once (and no more than `[media] concurrency`: each needs a download
of its own), each under `requests_per_second / workers` of the CDN budget and
`concurrency // workers` downloads, so the cluster as a whole keeps to
`[media]`'s budget (`worker_share`).

A task's items get their rows (`fetching`) before it is handed out, and the scan
point moves past a block of lines only once its items have rows: a coordinator
killed at any instant loses no item, and the next run hands out what is still
`fetching`. When a task finishes, its results are recorded in one transaction;
a result for an item already `done` changes nothing (`MediaLedger.record`), so
an item is recorded once however often it is reported. Ray retries a task whose
worker or node died (`max_retries`); the retry fetches its items again and
writes the same names with the same bytes (object keys are the item's path, and
an upload of an object already there whole sends nothing).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from crawler.archive import media_ledger as ml
from crawler.archive.media_ledger import MediaLedger, MediaRef, MediaResult
from crawler.archive.media_publish import MediaPublisher
from crawler.config import Config, MediaConfig
from crawler.crawl.media import committed_refs
from crawler.crawl.media_task import LocalTarget, StoreTarget, Target, TaskResult, TaskSpec, run_task
from crawler.crawl.pipeline import RunSummary
from crawler.crawl.watch import MediaTally, Progress
from crawler.errors import HarvestError
from crawler.http.gate import Counters

log = logging.getLogger("harvest")

TASK_ITEMS = 2000  # items per Ray task by default
TASK_RETRIES = 3  # Ray's retries of a task whose worker (or node) died
TASK_NAME = "harvest_media"  # what a Ray worker's process title says while it runs a task: ray::<name>
_WAIT = 1.0  # seconds per ray.wait: signals are seen at least this often
RAY_CLIENT = "ray://"  # an address of a Ray Client server: the driver runs there, not here
_CONNECT = 10.0  # seconds to connect to a cluster's head before saying it cannot be reached


class RayEngineError(HarvestError):
    """The Ray engine cannot run (no ray installed, no cluster at the address) or lost tasks."""


@dataclass(frozen=True, slots=True)
class RayOptions:
    """`harvest media --engine ray`'s own options."""

    address: str | None = None  # a running cluster's (host:port or ray://host:port); None: a local Ray
    task_items: int = TASK_ITEMS
    workers: int | None = None  # tasks at once; None: the cluster's CPUs
    max_retries: int = TASK_RETRIES


def worker_share(media: MediaConfig, workers: int) -> tuple[int, MediaConfig]:
    """How many tasks run at once, and one task's part of the CDN budget (its rate, and its
    downloads in flight): together they never exceed `[media]`'s. More workers than downloads
    would each need one of their own, so there are at most `concurrency` of them."""
    at_once = max(1, min(workers, media.concurrency))
    share = replace(
        media,
        requests_per_second=_split(media.requests_per_second, at_once),
        concurrency=media.concurrency // at_once,
    )
    return at_once, share


def _split(total: float, parts: int) -> float:
    """`total / parts`, rounded down where float division rounded it up (then `parts` of them
    would add up to a hair more than `total`); one step down is always enough."""
    share = total / parts
    if Fraction(share) * parts > Fraction(total):
        share = math.nextafter(share, 0.0)
    return share


def target_for(config: Config) -> Target:
    """Where workers put finished files: the object store when `[output] publish` is set (and
    only there: no local copy), else the media dir (this machine's, or a shared file system's)."""
    if config.output.publish is not None:
        return StoreTarget(config.output.publish)
    return LocalTarget(config.media.dir)


async def media_on_ray(
    config: Config, progress: Progress, summary: RunSummary, options: RayOptions, *, retry_gone: bool
) -> None:
    """`harvest media --engine ray`: the media stage over what is committed now, on Ray."""
    tally = summary.media = MediaTally()
    progress.start([], tally.counters)
    progress.media(tally)
    started = time.monotonic()
    ray = _import_ray(options.address is None)
    try:
        workers = await asyncio.to_thread(_connect, ray, options)
        try:
            with MediaLedger.open(config.output.dir) as ledger:
                publish = config.output.publish
                if publish is not None:  # files the local engine recorded and did not publish yet
                    publisher = MediaPublisher(config.media.dir, ledger, publish, config.output.keep_local)
                    await publisher.backlog(config.media.concurrency)
                coordinator = _Coordinator(ray, config, ledger, tally, options, workers)
                await coordinator.run(retry_gone)
        finally:
            ray.shutdown()
    finally:
        summary.elapsed = time.monotonic() - started
        progress.stop()


def _import_ray(local: bool) -> Any:
    if local:  # a Ray of this machine only: its processes listen on 127.0.0.1, not the LAN
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise RayEngineError("--engine ray needs the ray extra: pip install 'civitai-harvest[ray]'") from None
    return ray


def _connect(ray: Any, options: RayOptions) -> int:
    """Connect to the cluster (or start a local Ray); how many tasks run at once."""
    # Ray's own notes (no SIGTERM handler off the main thread: the harvest keeps its own
    # signals; token auth on a local cluster) are not the harvest's: errors only.
    logging.getLogger("ray").setLevel(logging.ERROR)
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if options.address is not None:
        _reachable(options.address)
    try:
        if options.address is None:
            cpus = options.workers or os.cpu_count() or 1
            ray.init(num_cpus=cpus, include_dashboard=False, address="local", **quiet)
        else:
            ray.init(address=options.address, **quiet)
    except Exception as error:  # noqa: BLE001 - the boundary: Ray's errors become one line
        where = options.address or "a local Ray"
        text = " ".join(str(error).split())[:300] or type(error).__name__
        raise RayEngineError(f"cannot start or reach {where}: {text}") from None
    if options.workers is not None:
        return options.workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _reachable(address: str) -> None:
    """A `host:port` or `ray://host:port` the harvest cannot connect to is one line now (Ray
    itself would retry for minutes); other forms (`auto`, say) are left to Ray."""
    host, sep, port = address.removeprefix(RAY_CLIENT).rpartition(":")
    if not sep or "://" in host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT).close()
    except OSError as error:
        raise RayEngineError(
            f"cannot reach the Ray cluster at {address}: {error.strerror or error}"
        ) from None


class _Coordinator:
    """Hands out tasks (at most `workers` at once) and records each finished one's results."""

    def __init__(
        self,
        ray: Any,
        config: Config,
        ledger: MediaLedger,
        tally: MediaTally,
        options: RayOptions,
        workers: int,
    ) -> None:
        self.ray, self.config, self.ledger, self.tally = ray, config, ledger, tally
        self.options = options
        self.media = config.media
        self.workers, share = worker_share(config.media, workers)
        self._spec = TaskSpec((), share, target_for(config), config.api.max_wait)
        self._remote = ray.remote(run_task).options(
            name=TASK_NAME, num_cpus=1, max_retries=options.max_retries, retry_exceptions=False
        )
        self._in_flight: dict[Any, int] = {}  # Ray's ObjectRef -> items in the task
        self.lost = 0  # items of tasks Ray gave up on (they stay `fetching`)
        tally.counters.effective_rps = config.media.requests_per_second  # the cluster's budget

    async def run(self, retry_gone: bool) -> None:
        log.info(
            "media on Ray: %d worker(s), %.3g requests/s and %d download(s) each, tasks of %d items",
            self.workers,
            self._spec.media.requests_per_second,
            self._spec.media.concurrency,
            self.options.task_items,
        )
        for refs in self._tasks(retry_gone):
            while len(self._in_flight) >= self.workers:
                await self._collect()
            ref = self._remote.remote(replace(self._spec, refs=tuple(refs)))
            self._in_flight[ref] = len(refs)
        while self._in_flight:
            await self._collect()
        if self.lost:
            raise RayEngineError(
                f"{self.lost} item(s) of tasks Ray gave up on (a worker died {self.options.max_retries + 1} "
                f"times); they are kept as fetching: rerun `harvest media {self.config.path}` to fetch them"
            )

    # -- the work list ----------------------------------------------------------------

    def _tasks(self, retry_gone: bool) -> Iterator[list[MediaRef]]:
        """The work list in tasks of `task_items`: ledger rows to retry, then new committed items."""
        size = self.options.task_items
        buffer: list[MediaRef] = []
        for ref in self._work(retry_gone):
            buffer.append(ref)
            if len(buffer) >= size:
                yield buffer
                buffer = []
        if buffer:
            yield buffer

    def _work(self, retry_gone: bool) -> Iterator[MediaRef]:
        statuses = [ml.FETCHING, ml.FAILED] + ([ml.GONE] if retry_gone else [])
        again = self.ledger.refs(statuses, self.media.types)
        self.ledger.begin_many(again)
        seen = {ref.id for ref in again}
        yield from again
        point = self.ledger.scan_point(self.media.types)
        for end, block in committed_refs(self.config.output.dir, self.ledger, point):
            known = self.ledger.statuses([ref.id for ref in block])
            new = [r for r in block if r.type in self.media.types and r.id not in known and r.id not in seen]
            if new:
                self.ledger.begin_many(new)  # rows first: past the scan point, an item has a row
                seen.update(r.id for r in new)
            self.ledger.set_scan_point(end)
            yield from new

    # -- results ----------------------------------------------------------------------

    async def _collect(self) -> None:
        """Wait for a task to end, and record its results (or count its items lost)."""
        ready: list[Any] = []
        while not ready:
            ready, _ = await asyncio.to_thread(
                self.ray.wait, list(self._in_flight), num_returns=1, timeout=_WAIT
            )
        for ref in ready:
            items = self._in_flight.pop(ref)
            try:
                result: TaskResult = await asyncio.to_thread(self.ray.get, ref)
            except self.ray.exceptions.RayTaskError as error:
                cause = error.cause
                if isinstance(cause, HarvestError):
                    raise type(cause)(*cause.args) from None  # a full disk, the store refusing: one line
                raise RayEngineError(f"a media task failed: {_one_line(cause or error)}") from None
            except self.ray.exceptions.RayError as error:  # the worker died more than Ray retries
                log.warning("media: a task of %d item(s) was lost: %s", items, _one_line(error))
                self.lost += items
                continue
            self._record(result)

    def _record(self, result: TaskResult) -> None:
        recorded = self.ledger.record(result.results)
        for r in recorded:
            self._count(r)
        _add(self.tally.counters, result.counters)
        log.debug(
            "media: a task of %d item(s) on %s: %d recorded, %d already done",
            len(result.results),
            result.worker,
            len(recorded),
            len(result.results) - len(recorded),
        )

    def _count(self, r: MediaResult) -> None:
        if r.status == ml.DONE:
            self.tally.file_done(r.size or 0)
        elif r.status == ml.GONE:
            self.tally.gone += 1
            log.info("media %d is gone: %s", r.id, r.error)
        else:
            self.tally.failed_with(f"media {r.id}: {r.error}")
            log.warning("media %d failed: %s", r.id, r.error)


def _add(total: Counters, part: Counters) -> None:
    """A task's gate counters into the run's (the rates stay the cluster's budget)."""
    total.requests += part.requests
    total.retries += part.retries
    total.rate_limited += part.rate_limited
    total.cooldown_seconds += part.cooldown_seconds
    total.rate_decreases += part.rate_decreases
    total.rate_increases += part.rate_increases
    for reason, count in part.by_reason.items():
        total.by_reason[reason] = total.by_reason.get(reason, 0) + count


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
