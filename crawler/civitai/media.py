"""Civitai's media CDN: which URL serves the file an item points to, in the form asked for.

An item's `url` is `https://image.civitai.com/<key>/<uuid>/<options>/<name>`, where
`<options>` is `original=true` (since 2025-09) or `width=<w>` (older items). The
same path with `width=<w>` serves a resized form; with `original=true`, the
original. For a video, that URL may answer a still: the video itself is at
`https://image-b2.civitai.com/file/civitai-media-cache/<uuid>/original`, with a
transcode of the original on the CDN as the fallback. The extension in a URL says
nothing of the format (every image is `.jpeg`): the bytes do.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

VIDEO_BASE = "https://image-b2.civitai.com/file/civitai-media-cache"
ORIGINAL = "original"
MEDIA_TYPES: tuple[str, ...] = ("image", "video", "audio")  # the item types with media

_OPTIONS = re.compile(r"[a-z_]+=[^/]*")  # original=true, width=450, transcode=true,quality=100, ...
_TRANSCODE = "transcode=true,original=true,quality=100"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def uuid_of(url: str) -> str | None:
    """The media's uuid: the path segment before the options (or any uuid-shaped segment)."""
    parts = urlsplit(url).path.split("/")
    found = [p for p in parts if _UUID.fullmatch(p)]
    return found[0] if found else None


def with_options(url: str, options: str) -> str:
    """`url` with its options segment (the one before the file name) replaced by `options`;
    a URL without one is returned as it is (it names one form only)."""
    parts = urlsplit(url)
    path = parts.path.split("/")
    if len(path) < 4 or not _OPTIONS.fullmatch(path[-2]):
        return url
    path[-2] = options
    return urlunsplit(parts._replace(path="/".join(path)))


def variant_options(variant: str | int) -> str:
    return "original=true" if variant == ORIGINAL else f"width={variant}"


def candidates(url: str, kind: str, variant: str | int, video_base: str = VIDEO_BASE) -> list[str]:
    """The URLs to try for an item's media (its `url` and `type`), best first: a 404 on one
    moves on to the next. A video is always fetched as the video itself, whatever `variant`."""
    if kind != "video":
        return [with_options(url, variant_options(variant))]
    uuid = uuid_of(url)
    if uuid is None:
        return [url]
    fallback = with_options(url, _TRANSCODE)
    return [f"{video_base.rstrip('/')}/{uuid}/original"] + ([fallback] if fallback != url else [])
