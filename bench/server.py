"""The bundled fake API plus what the benchmark needs and `python -m crawler.testing.fakeapi` lacks.

    python -m bench.server --port 0 --spec spec.json [--delay 0.2] [--rate-limit R --burst B
                           --rate-limit-mode 429|503]

It builds the very same app (`crawler.testing.fakeapi.make_app`) and adds an outer aiohttp
middleware that (a) sleeps --delay seconds before every response (scenario 4:
latency hiding) and (b) counts every request by status and arrival time, so the
rate-limit scenario can count statuses from the server's side. Prints
`listening on http://127.0.0.1:PORT/api/v1` once bound and, on SIGTERM/SIGINT,
one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from crawler.testing.fakeapi import Dataset, DatasetSpec, RateLimit, ServerOptions, make_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Tally:
    """Statuses and arrival times of every request, from the server's side."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.ok_times: list[float] = []  # arrival of each 200
        self.all_times: list[float] = []

    def as_dict(self) -> dict[str, Any]:
        def span(times: list[float]) -> float:
            return max(times) - min(times) if len(times) > 1 else 0.0

        return {
            "requests": sum(self.statuses.values()),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "span_seconds": span(self.all_times),
            "ok_span_seconds": span(self.ok_times),
            "max_in_1s": _max_in_window(sorted(self.all_times), 1.0),
            "ok_max_in_1s": _max_in_window(sorted(self.ok_times), 1.0),
        }


def _max_in_window(times: list[float], seconds: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - seconds:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _outer(tally: Tally, delay: float) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        arrived = time.monotonic()
        status = 0
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            tally.statuses[status] += 1
            tally.all_times.append(arrived)
            if status == 200:
                tally.ok_times.append(arrived)

    return middleware


async def _run(args: argparse.Namespace) -> Tally:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"loopback only, not {args.host}")
    dataset = Dataset(DatasetSpec.from_dict(json.loads(args.spec.read_text())))
    limit = RateLimit(args.rate_limit, args.burst, args.rate_limit_mode) if args.rate_limit else None
    app = make_app(dataset, None, options=ServerOptions(rate_limit=limit))
    tally = Tally()
    app.middlewares.insert(0, _outer(tally, args.delay))  # outermost: sees edge 429s too
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on http://127.0.0.1:{port}/api/v1", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds added before every response")
    p.add_argument("--rate-limit", type=float)
    p.add_argument("--burst", type=int, default=1)
    p.add_argument("--rate-limit-mode", choices=("429", "503"), default="429")
    args = p.parse_args(argv)
    tally = asyncio.run(_run(args))
    print(json.dumps(tally.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
