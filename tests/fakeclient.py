"""Talking to the fake API directly, as a client would: the fake API's own tests share these."""

from __future__ import annotations

from typing import Any

import aiohttp


async def get(http: aiohttp.ClientSession, url: str, **params: Any) -> tuple[int, Any]:
    async with http.get(url, params={k: str(v) for k, v in params.items()}) as resp:
        return resp.status, await resp.json(content_type=None)


async def walk(http: aiohttp.ClientSession, url: str, **params: Any) -> list[dict[str, Any]]:
    """Follow nextCursor to the end; every page's body, in order."""
    pages, cursor = [], None
    for _ in range(1000):
        status, body = await get(http, url, **params, **({"cursor": cursor} if cursor is not None else {}))
        assert status == 200, body
        pages.append(body)
        cursor = body["metadata"].get("nextCursor")
        if cursor is None:
            return pages
    raise AssertionError("walk did not end")


def ids_of(pages: list[dict[str, Any]]) -> list[int]:
    return [item["id"] for page in pages for item in page["items"]]
