"""The server ceiling: fetch the same pages as `harvest` and throw the bodies away.

One task per published version walks its cursors (the same query parameters, in
the same order, as harvest sends), at most CONCURRENCY requests in flight. The
body is never parsed: the next cursor is cut from its tail and items are counted
by a key every item carries once, so nearly all the time goes to the server.

    python bench/ceiling.py BASE_URL MODEL_ID [--limit 200] [--concurrency N]

N defaults to the number of versions. Prints {"items": N, "pages": P, "versions": V, "concurrency": C}.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

import aiohttp
import orjson

_CURSOR = re.compile(rb'"nextCursor":(?:"([^"]*)"|(-?\d+))')
_ITEM_KEY = b'"nsfwLevel":'  # once per item, never inside meta


async def walk(
    session: aiohttp.ClientSession, slots: asyncio.Semaphore, base_url: str, version: int, limit: int
) -> tuple[int, int]:
    params = [
        ("browsingLevel", "31"),
        ("limit", str(limit)),
        ("modelVersionId", str(version)),
        ("sort", "Newest"),
        ("withMeta", "true"),
    ]
    cursor: str | None = None
    items = pages = 0
    while True:
        query = params + ([("cursor", cursor)] if cursor is not None else [])
        async with slots, session.get(f"{base_url}/images", params=query) as resp:
            resp.raise_for_status()
            body = await resp.read()
        pages += 1
        items += body.count(_ITEM_KEY)
        tail = body.rfind(b'"metadata":')
        match = _CURSOR.search(body, tail if tail >= 0 else 0)
        if match is None:
            return items, pages
        cursor = (match.group(1) or match.group(2)).decode()


async def run(base_url: str, model_id: int, limit: int, concurrency: int | None) -> dict[str, int]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{base_url}/models/{model_id}") as resp:
            resp.raise_for_status()
            versions = [v["id"] for v in orjson.loads(await resp.read())["modelVersions"]]
        n = concurrency or len(versions)
        slots = asyncio.Semaphore(n)
        done = await asyncio.gather(*(walk(session, slots, base_url, v, limit) for v in versions))
    return {
        "items": sum(i for i, _ in done),
        "pages": sum(p for _, p in done),
        "versions": len(versions),
        "concurrency": n,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("model_id", type=int)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--concurrency", type=int)
    args = p.parse_args()
    result = asyncio.run(run(args.base_url, args.model_id, args.limit, args.concurrency))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
