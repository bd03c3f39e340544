"""python -m crawler.testing.fakeapi: serve the fake API until SIGTERM/SIGINT.

Prints exactly one line, `listening on http://127.0.0.1:PORT/api/v1`, once bound,
so a script can start it on port 0 and read where it went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from crawler.testing.fakeapi.dataset import Dataset, DatasetSpec, default_spec
from crawler.testing.fakeapi.faults import FaultSpec, RateLimit
from crawler.testing.fakeapi.server import ServerOptions, serve


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
        choices=("429", "503"),
        default="429",
        help="429 without Retry-After (Cloudflare) or 503 with Retry-After: 2",
    )
    p.add_argument("--api-key", help="reject Authorization: Bearer headers carrying any other key")
    return p


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


async def _run(args: argparse.Namespace) -> None:
    dataset = Dataset(DatasetSpec.from_dict(_load(args.spec)) if args.spec else default_spec())
    faults = FaultSpec.from_dict(_load(args.faults)) if args.faults else None
    limit = RateLimit(args.rate_limit, args.burst, args.rate_limit_mode) if args.rate_limit else None
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
        options=ServerOptions(rate_limit=limit),
    ) as api:
        print(f"listening on {api.base_url}", flush=True)
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
