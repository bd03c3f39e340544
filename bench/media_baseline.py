"""The media downloader a user would write instead of `harvest media`: the baseline of the media scenario.

A list of URLs, one aiohttp session, a semaphore of N, each body streamed to its own file in a
1 MiB chunk loop. No retries, no state, no verification, no fsync, no rate limit.

    python bench/media_baseline.py URLS_FILE DEST_DIR [--concurrency 8]

URLS_FILE holds one URL a line (write it with media_urls()). Prints one JSON line:
{"files": N, "bytes": B, "seconds": S, "failed": F}.

The helpers give the bench the same files `harvest media` fetches from the fake CDN:
cdn_flags() turns CdnOptions into `python -m crawler.testing.fakeapi` flags, cdn_url_of()
reads the `cdn on ...` line a started bench Server prints second, and media_files() lists,
from the dataset spec alone, the URL and expected file of every item a full harvest holds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import queue
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from crawler.testing.fakeapi import CdnFiles, CdnOptions, Dataset, DatasetSpec, ImageQuery, MediaFile

CHUNK = 1 << 20


@dataclass(frozen=True)
class BaselineResult:
    files: int  # bodies written whole
    bytes: int
    seconds: float  # wall time of the downloads alone
    failed: int  # non-200 answers and broken transfers (never retried)


async def download(urls: Sequence[str], dest: Path, concurrency: int = 8) -> BaselineResult:
    """Fetch every URL into dest/<n>, `concurrency` at a time."""
    dest.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(concurrency)
    done = total = failed = 0

    async def one(session: aiohttp.ClientSession, n: int, url: str) -> None:
        nonlocal done, total, failed
        async with gate:
            try:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        failed += 1
                        return
                    with open(dest / str(n), "wb") as out:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            out.write(chunk)
                            total += len(chunk)
                done += 1
            except (TimeoutError, aiohttp.ClientError):
                failed += 1

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, n, url) for n, url in enumerate(urls)))
    return BaselineResult(done, total, time.perf_counter() - started, failed)


def run(urls: Sequence[str], dest: Path, concurrency: int = 8) -> BaselineResult:
    """download() from synchronous code."""
    return asyncio.run(download(urls, dest, concurrency))


# ---------------------------------------------------------------- what the bench needs around it


def media_files(
    spec: Mapping[str, Any],
    cdn_url: str,
    options: CdnOptions | None = None,
    *,
    variant: str | int = "original",
    types: Sequence[str] = ("image", "video"),
) -> list[tuple[str, MediaFile]]:
    """(URL, expected file) of the media of every item a complete harvest of the spec's
    dataset holds (every level, hidden rows left out), gone media left out; `options` must be
    the server's (cdn_flags)."""
    dataset = Dataset(DatasetSpec.from_dict(spec))
    files = CdnFiles(dataset, options)
    out = []
    for image_id in dataset.walk_ids(ImageQuery(levels=31, sort="Oldest")):
        i = dataset.index_of(image_id)
        assert i is not None
        item = dataset.item(i)
        if item["type"] not in types:
            continue
        item["url"] = files.item_url(cdn_url, item["url"])
        url = files.fetch_url(cdn_url, item, variant)
        found = files.resolve(url[len(cdn_url) :])
        if not isinstance(found, int):
            out.append((url, found))
    return out


def media_urls(
    spec: Mapping[str, Any], cdn_url: str, options: CdnOptions | None = None, **kw: Any
) -> list[str]:
    return [url for url, _ in media_files(spec, cdn_url, options, **kw)]


_FLAGS = {
    "port": "--cdn-port",
    "seed": "--cdn-seed",
    "video_mb": "--cdn-video-mb",
    "gone_rate": "--cdn-gone-rate",
    "old_url_rate": "--cdn-old-url-rate",
    "cache_miss_rate": "--cdn-cache-miss-rate",
    "throttle": "--cdn-throttle",
}


def cdn_flags(options: CdnOptions) -> list[str]:
    """`python -m crawler.testing.fakeapi` flags serving the CDN with these options (no faults:
    write those to a file and add --cdn-faults FILE)."""
    flags = ["--cdn"]
    for name, flag in _FLAGS.items():
        value = getattr(options, name)
        if value is not None and value != getattr(CdnOptions(), name):
            flags += [flag, str(value)]
    if not options.ranges:
        flags.append("--cdn-no-ranges")
    return flags


def faults_json(options: CdnOptions) -> str:
    """The --cdn-faults file's text for options.faults."""
    assert options.faults is not None
    d = dataclasses.asdict(options.faults)
    d["rates"] = dict(options.faults.rates)
    return json.dumps(d)


def cdn_url_of(server: Any, timeout: float = 60) -> str:
    """The CDN's address from a started bench.harness.Server run with --cdn (its second line)."""
    lines: queue.Queue[str] = queue.Queue()
    stdout = server.proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    prefix = "cdn on "
    if not line.startswith(prefix) or not line[len(prefix) :].startswith("http://127.0.0.1:"):
        raise RuntimeError(f"the fake API printed no CDN address: {line!r}")
    return line[len(prefix) :].strip()


def main() -> int:
    p = argparse.ArgumentParser(prog="python bench/media_baseline.py")
    p.add_argument("urls", type=Path, help="a file of URLs, one a line")
    p.add_argument("dest", type=Path)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    urls = [u for u in args.urls.read_text().splitlines() if u]
    result = run(urls, args.dest, args.concurrency)
    sys.stdout.write(json.dumps(dataclasses.asdict(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
