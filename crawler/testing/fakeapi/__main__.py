"""python -m crawler.testing.fakeapi: serve the fake API until SIGTERM/SIGINT.

Prints `listening on http://127.0.0.1:PORT/api/v1` once bound, so a script can start it on
port 0 and read where it went; with --cdn (or any --cdn-* option) a second line follows,
`cdn on http://127.0.0.1:PORT2`, where the image CDN the items' urls point at answers.
SIGUSR1 expires every feed: cursor issued so far (FakeServer.cursors.expire_all()),
for scripts that kill and resume a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from crawler.testing.fakeapi.cdnfiles import CdnFaults, CdnOptions
from crawler.testing.fakeapi.dataset import Dataset, DatasetSpec, default_spec
from crawler.testing.fakeapi.faults import FaultSpec, RateLimit
from crawler.testing.fakeapi.server import Latency, ServerOptions, serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crawler.testing.fakeapi", description="Serve a fake Civitai images API."
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--spec", type=Path, help="dataset spec JSON (default: model 827184, five versions)")
    p.add_argument("--faults", type=Path, help='fault spec JSON, e.g. {"seed": 1, "rates": {"503": 0.05}}')
    p.add_argument("--rate-limit", type=float, help="requests per second before edge 429s")
    p.add_argument("--burst", type=int, default=1, help="token bucket burst for --rate-limit (default 1)")
    p.add_argument(
        "--rate-limit-mode",
        choices=("429", "503", "503_overloaded"),
        default="429",
        help="429 without Retry-After (Cloudflare), or 503 with Retry-After: 2 "
        "(503_overloaded: with the search backend's overload body)",
    )
    p.add_argument("--api-key", help="reject Authorization: Bearer headers carrying any other key")
    new = p.add_argument_group("2025-2026 behaviour (all off by default)")
    new.add_argument(
        "--walk-cap", type=int, metavar="N", help="no nextCursor once a feed walk is N positions deep"
    )
    new.add_argument("--feed-cursors", action="store_true", help='opaque "feed:" cursors that can expire')
    new.add_argument(
        "--cursor-ttl",
        type=float,
        metavar="SECONDS",
        help="feed: cursors expire after this (implies --feed-cursors)",
    )
    new.add_argument(
        "--cursor-epoch",
        type=int,
        default=0,
        metavar="N",
        help="feed: cursors issued by a server with a lower epoch are expired (default 0)",
    )
    new.add_argument(
        "--sfw-only", action="store_true", help="serve only PG and PG-13 items, whatever is asked"
    )
    new.add_argument(
        "--new-error-bodies", action="store_true", help='non-zod 4xx bodies are {"message": ...}'
    )
    new.add_argument(
        "--latency-median", type=float, metavar="SECONDS", help="lognormal delay before each answer"
    )
    new.add_argument(
        "--latency-p95", type=float, metavar="SECONDS", help="its 95th percentile (default: the median)"
    )
    new.add_argument("--latency-seed", type=int, default=0, help="seed of the latency draws (default 0)")
    _cdn_arguments(p.add_argument_group("the image CDN (a second port; any --cdn-* implies --cdn)"))
    return p


def _cdn_arguments(cdn: argparse._ArgumentGroup) -> None:
    cdn.add_argument("--cdn", action="store_true", help="serve the image CDN; items' url point at it")
    cdn.add_argument("--cdn-port", type=int, metavar="PORT", help="its port (default 0: any free port)")
    cdn.add_argument("--cdn-seed", type=int, metavar="N", help="seed of its bytes, gone media, faults")
    cdn.add_argument("--cdn-video-mb", type=float, metavar="MB", help="every video this many MiB")
    cdn.add_argument("--cdn-gone-rate", type=float, metavar="R", help="share of media that 404/410")
    cdn.add_argument(
        "--cdn-old-url-rate", type=float, metavar="R", help="share of items whose url has width=<w>"
    )
    cdn.add_argument(
        "--cdn-cache-miss-rate", type=float, metavar="R", help="share of videos only the fallback serves"
    )
    cdn.add_argument("--cdn-throttle", type=float, metavar="BYTES_PER_S", help="pace of each body")
    cdn.add_argument("--cdn-no-ranges", action="store_true", help="ignore Range: answer 200 whole")
    cdn.add_argument(
        "--cdn-faults", type=Path, metavar="JSON", help='e.g. {"seed": 1, "rates": {"cut": 0.05}}'
    )


_CDN_FIELDS = {
    "cdn_port": "port",
    "cdn_seed": "seed",
    "cdn_video_mb": "video_mb",
    "cdn_gone_rate": "gone_rate",
    "cdn_old_url_rate": "old_url_rate",
    "cdn_cache_miss_rate": "cache_miss_rate",
    "cdn_throttle": "throttle",
}


def _cdn_options(args: argparse.Namespace) -> CdnOptions | None:
    given = {
        field: getattr(args, arg) for arg, field in _CDN_FIELDS.items() if getattr(args, arg) is not None
    }
    if not (args.cdn or given or args.cdn_no_ranges or args.cdn_faults):
        return None
    faults = CdnFaults.from_dict(_load(args.cdn_faults)) if args.cdn_faults else None
    return CdnOptions(**given, ranges=not args.cdn_no_ranges, faults=faults)


def _options(args: argparse.Namespace) -> ServerOptions:
    limit = RateLimit(args.rate_limit, args.burst, args.rate_limit_mode) if args.rate_limit else None
    latency = None
    if args.latency_median is not None:
        p95 = args.latency_p95 if args.latency_p95 is not None else args.latency_median
        latency = Latency(args.latency_median, p95, args.latency_seed)
    elif args.latency_p95 is not None:
        raise ValueError("--latency-p95 needs --latency-median")
    return ServerOptions(
        rate_limit=limit,
        walk_cap=args.walk_cap,
        feed_cursors=args.feed_cursors or args.cursor_ttl is not None,
        cursor_ttl=args.cursor_ttl,
        cursor_epoch=args.cursor_epoch,
        sfw_only=args.sfw_only,
        new_error_bodies=args.new_error_bodies,
        latency=latency,
        cdn=_cdn_options(args),
    )


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


async def _run(args: argparse.Namespace) -> None:
    dataset = Dataset(DatasetSpec.from_dict(_load(args.spec)) if args.spec else default_spec())
    faults = FaultSpec.from_dict(_load(args.faults)) if args.faults else None
    options = _options(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        dataset,
        faults,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        options=options,
    ) as api:
        loop.add_signal_handler(signal.SIGUSR1, api.cursors.expire_all)
        print(f"listening on {api.base_url}", flush=True)
        if api.cdn is not None:
            print(f"cdn on {api.cdn.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except (OSError, ValueError) as exc:  # bad address, unreadable or malformed spec
        print(f"fakeapi: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
