"""The script a user would write instead of `harvest`: the baseline of scenario 1.

One aiohttp session walks each published version of a model in turn, following
`nextCursor` with modelVersionId queries, and appends every item as one orjson
line to one file. No state, no dedupe, no retries, no fsync, no rate limit.

    python bench/baseline.py BASE_URL MODEL_ID OUT_FILE [--limit 200]

Prints one JSON line: {"items": N, "pages": P, "versions": V}.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import orjson


async def harvest(base_url: str, model_id: int, out_path: str, limit: int) -> dict[str, int]:
    items = pages = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/models/{model_id}") as resp:
            resp.raise_for_status()
            model = orjson.loads(await resp.read())
        versions = [v["id"] for v in model["modelVersions"]]
        with open(out_path, "wb") as out:
            for version in versions:
                params = {
                    "modelVersionId": str(version),
                    "limit": str(limit),
                    "browsingLevel": "31",
                    "withMeta": "true",
                    "sort": "Newest",
                }
                while True:
                    async with session.get(f"{base_url}/images", params=params) as resp:
                        resp.raise_for_status()
                        page = orjson.loads(await resp.read())
                    pages += 1
                    for item in page["items"]:
                        out.write(orjson.dumps(item) + b"\n")
                    items += len(page["items"])
                    cursor = page.get("metadata", {}).get("nextCursor")
                    if cursor is None:
                        break
                    params["cursor"] = str(cursor)
    return {"items": items, "pages": pages, "versions": len(versions)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("model_id", type=int)
    p.add_argument("out")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args()
    result = asyncio.run(harvest(args.base_url, args.model_id, args.out, args.limit))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
