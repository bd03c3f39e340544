"""What the fake image CDN holds: every uuid's bytes, for every URL form, as pure functions.

A file is a format's real header, filler drawn from one pseudo-random pool, and the format's
trailer; every choice (format, size, which items are gone) comes from a hash of the uuid and
the seed, so `CdnFiles(dataset, options).expected(url)` is exactly what the CDN serves for
`url`, and a 100 MB video is produced in slices of the pool, never whole in memory.
URL forms, as on image.civitai.com (api-facts "Media"):

    /<key>/<uuid>/original=true/<name>      the original (a video's still, as JPEG)
    /<key>/<uuid>/width=<w>/<name>          the resized variant (widths snap to the ladder)
    /<key>/<uuid>/transcode=true,original=true,quality=100/<name>   a video itself (fallback)
    /file/civitai-media-cache/<uuid>/original                       a video itself (image-b2)
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from crawler.testing.fakeapi.dataset import TYPES, Dataset, mix64

LADDER = (96, 320, 450, 512, 800, 1200, 1600, 2200)
WIDTH_CAP = 1800  # the ladder's top (2200) is never served: the CDN caps widths here
CACHE_PREFIX = "/file/civitai-media-cache/"
_M64 = (1 << 64) - 1
_CHUNK = 64 * 1024  # filler is served in slices of the pool this long
_POOL = 1 << 20
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class CdnOptions:
    """The fake CDN (a second port of the fake API): its files, its faults and how it serves."""

    seed: int = 0  # of formats, sizes, bytes, gone media and faults
    port: int = 0  # 0: any free port
    gone_rate: float = 0.02  # share of uuids deleted from the CDN: 404 on every form (1 in 4: 410)
    old_url_rate: float = 0.25  # share of items whose `url` carries width=<w>, not original=true
    cache_miss_rate: float = 0.05  # share of videos whose image-b2 form 404s (the fallback serves)
    video_mb: float | None = None  # every video's size in MiB; None: 1 to 4 MB, from the hash
    ranges: bool = True  # False: ignore Range (and send no Accept-Ranges), answer 200 whole
    throttle: float | None = None  # bytes per second per response body; None: as fast as it goes
    faults: CdnFaults | None = None

    def __post_init__(self) -> None:
        for name in ("gone_rate", "old_url_rate", "cache_miss_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"CdnOptions.{name} must be between 0 and 1")
        if self.video_mb is not None and self.video_mb <= 0:
            raise ValueError("CdnOptions.video_mb must be positive")
        if self.throttle is not None and self.throttle <= 0:
            raise ValueError("CdnOptions.throttle must be positive (bytes per second)")


CDN_KINDS = ("429", "503", "500", "502", "504", "reset", "cut", "challenge", "slow")


@dataclass(frozen=True)
class CdnFaults:
    """Rates per kind (CDN_KINDS, summing to at most 1), drawn per request from the seed.

    429 and 503 carry Retry-After; reset drops the connection before the headers; cut announces
    the whole Content-Length and closes half way; challenge is Cloudflare's HTML page with 200;
    slow waits `slow_seconds` before the first byte.
    """

    seed: int = 0
    rates: tuple[tuple[str, float], ...] = ()
    retry_after: int = 1
    slow_seconds: float = 35.0

    def __post_init__(self) -> None:
        unknown = [k for k, _ in self.rates if k not in CDN_KINDS]
        if unknown:
            raise ValueError(f"unknown CDN fault kinds {unknown}; known: {', '.join(CDN_KINDS)}")
        if sum(r for _, r in self.rates) > 1:
            raise ValueError("CDN fault rates sum to more than 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CdnFaults:
        """{"seed": 1, "rates": {"cut": 0.05}, "retry_after": 1, "slow_seconds": 35}."""
        rates = tuple((str(k), float(v)) for k, v in dict(d.get("rates", {})).items())
        options = {k: d[k] for k in ("seed", "retry_after", "slow_seconds") if k in d}
        return cls(rates=rates, **options)


# ---------------------------------------------------------------- formats


def _le32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _be32(n: int) -> bytes:
    return n.to_bytes(4, "big")


_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_WEBM_HEAD = bytes.fromhex("1a45dfa39f4286810142f7810142f2810442f381084282847765626d4287810442858102")


def _header(fmt: str, size: int) -> bytes:
    if fmt == "jpeg":
        return _JPEG_HEAD
    if fmt == "png":
        return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    if fmt == "webp":
        return b"RIFF" + _le32(size - 8) + b"WEBPVP8 "
    if fmt == "gif":
        return b"GIF89a"
    if fmt == "avif":
        return _be32(28) + b"ftypavif" + _be32(0) + b"avifmif1miaf"
    if fmt == "mp4":
        return _be32(32) + b"ftypisom" + _be32(0x200) + b"isomiso2avc1mp41"
    if fmt == "mp4-mp42":
        return _be32(24) + b"ftypmp42" + _be32(0) + b"mp42isom"
    if fmt == "webm":
        return _WEBM_HEAD
    return b"ID3\x04\x00\x00\x00\x00\x00\x00"  # mp3


_TRAILER = {"jpeg": b"\xff\xd9", "png": b"\x00\x00\x00\x00IEND\xaeB`\x82", "gif": b";"}
CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
    "mp4": "video/mp4",
    "mp4-mp42": "video/mp4",
    "webm": "video/webm",
    "mp3": "audio/mpeg",
}
# (format, weight): how often each real format sits behind a URL
_IMAGE_FORMATS = (("jpeg", 45), ("png", 25), ("webp", 15), ("avif", 10), ("gif", 5))
_VIDEO_FORMATS = (("mp4", 50), ("mp4-mp42", 25), ("webm", 25))


def _pick(h: int, weighted: tuple[tuple[str, int], ...]) -> str:
    r = h % sum(w for _, w in weighted)
    for fmt, w in weighted:
        if r < w:
            return fmt
        r -= w
    raise AssertionError("unreachable")


def snap_width(width: int) -> int:
    """The width the CDN serves for a width=<w> request: the ladder step at or above w, capped."""
    i = bisect.bisect_left(LADDER, width)
    return min(LADDER[min(i, len(LADDER) - 1)], WIDTH_CAP)


def unmix64(y: int) -> int:
    """The inverse of dataset.mix64 (splitmix64's finaliser is a bijection)."""
    y = y ^ (y >> 31) ^ (y >> 62)
    y = (y * pow(0x94D049BB133111EB, -1, 1 << 64)) & _M64
    y = y ^ (y >> 27) ^ (y >> 54)
    y = (y * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & _M64
    y = y ^ (y >> 30) ^ (y >> 60)
    return (y - 0x9E3779B97F4A7C15) & _M64


# ---------------------------------------------------------------- one file


@dataclass(frozen=True)
class MediaFile:
    """One body the CDN serves: a uuid in one form (original, resized, a video's still...)."""

    uuid: str
    kind: str  # "image", "still" (of a video), "video" or "audio"
    width: int | None  # the snapped width of a resized form; None: the original size
    format: str  # "jpeg", "png", "webp", "gif", "avif", "mp4", "mp4-mp42", "webm", "mp3"
    size: int
    key: int  # picks the filler: every form of every uuid has its own bytes
    pool: memoryview = field(repr=False, compare=False)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def etag(self) -> str:
        return f'"{self.key:016x}-{self.size:x}"'

    def chunks(self, start: int = 0, stop: int | None = None) -> Iterator[memoryview]:
        """Bytes [start, stop) in slices of at most 64 KiB, none of them copied."""
        stop = self.size if stop is None else min(stop, self.size)
        head = memoryview(_header(self.format, self.size))
        tail = memoryview(_TRAILER.get(self.format, b""))
        fill_end = self.size - len(tail)
        if start < len(head):
            yield head[start : min(stop, len(head))]
            start = len(head)
        while start < min(stop, fill_end):
            q = start - len(head)
            k, r = divmod(q, _CHUNK)
            n = min(_CHUNK - r, stop - start, fill_end - start)
            off = mix64(self.key + k) % _POOL + r
            yield self.pool[off : off + n]
            start += n
        if start < stop:
            yield tail[start - fill_end : stop - fill_end]

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        """The bytes [start, stop) in memory: for tests, on files of test size."""
        return b"".join(self.chunks(start, stop))

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for piece in self.chunks():
            digest.update(piece)
        return digest.hexdigest()


# ---------------------------------------------------------------- the CDN's holdings


class CdnFiles:
    """Every file of the fake CDN for one dataset: URL forms, bytes, gone media. Pure."""

    def __init__(self, dataset: Dataset, options: CdnOptions | None = None) -> None:
        self.dataset = dataset
        self.options = options or CdnOptions()
        pool = random.Random(self.options.seed ^ 0xCD2).randbytes(_POOL + _CHUNK)
        self._pool = memoryview(pool)
        self._salt = mix64(self.options.seed ^ 0xC1F1)

    # -------------------------------------------------------- per uuid

    def _hash(self, uuid: str) -> int:
        return mix64(int(uuid.replace("-", "")[:16], 16) ^ self._salt)

    def _share(self, uuid: str, shift: int, rate: float) -> bool:
        return (self._hash(uuid) >> shift) % 10_000 < rate * 10_000

    def kind(self, uuid: str) -> str | None:
        """ "image", "video" or "audio" for a uuid of the dataset's items; None for any other."""
        x = uuid.replace("-", "")
        if len(uuid) != 36 or len(x) != 32 or not set(x) <= _HEX:
            return None
        for nibble in "0123456789abcdef":  # the uuid hides one nibble of the item's hash
            h = int(x[:12] + nibble + x[13:16], 16)
            if f"{mix64(h):016x}"[1:] == x[17:]:
                i = self.dataset.index_of(unmix64(h) ^ self.dataset.spec.seed)
                return None if i is None else TYPES[self.dataset.cols.type[i]]
        return None

    def gone(self, uuid: str) -> int | None:
        """404 or 410 for media deleted from the CDN, None for media it serves."""
        if not self._share(uuid, 0, self.options.gone_rate):
            return None
        return 410 if (self._hash(uuid) >> 14) % 4 == 0 else 404

    def cache_miss(self, uuid: str) -> bool:
        """True for a video whose image-b2 form 404s: only the transcode fallback serves it."""
        return self._share(uuid, 16, self.options.cache_miss_rate)

    def old_style(self, uuid: str) -> bool:
        """True for an (older) item whose `url` carries width=<w> instead of original=true."""
        return self._share(uuid, 32, self.options.old_url_rate)

    # -------------------------------------------------------- URLs

    def item_url(self, base: str, url: str) -> str:
        """An item's `url` as served with the CDN on at `base` (http://127.0.0.1:PORT).

        `url` is the item's url with the CDN off: https://image.civitai.com/<key>/<uuid>/width=<w>/<name>.
        """
        key, uuid, segment, name = urlsplit(url).path.lstrip("/").split("/", 3)
        form = segment if self.old_style(uuid) else "original=true"
        return f"{base}/{key}/{uuid}/{form}/{name}"

    def fetch_url(self, base: str, item: Mapping[str, Any], variant: str | int = "original") -> str:
        """The URL a correct downloader fetches for a served item: its image (original or resized),
        its video itself (image-b2, or the transcode fallback for a cache miss), its audio."""
        key, uuid, _, name = urlsplit(str(item["url"])).path.lstrip("/").split("/", 3)
        if item["type"] == "video":
            if self.cache_miss(uuid):
                return f"{base}/{key}/{uuid}/transcode=true,original=true,quality=100/{name}"
            return f"{base}{CACHE_PREFIX}{uuid}/original"
        form = "original=true" if variant == "original" or item["type"] == "audio" else f"width={variant}"
        return f"{base}/{key}/{uuid}/{form}/{name}"

    # -------------------------------------------------------- bodies

    def resolve(self, path: str) -> MediaFile | int:
        """The file the CDN serves at `path` (no query), or the status it answers instead
        (400 malformed, 404 unknown or gone or a cache miss, 410 gone)."""
        if path.startswith(CACHE_PREFIX):
            uuid, _, rest = path[len(CACHE_PREFIX) :].partition("/")
            kind = self.kind(uuid)
            if rest != "original" or kind is None:
                return 404
            if kind == "video" and self.cache_miss(uuid):
                return self.gone(uuid) or 404
            return self.gone(uuid) or self._file(uuid, kind, None)
        parts = path.lstrip("/").split("/")
        if len(parts) != 4 or not all(parts):
            return 404
        _, uuid, segment, _ = parts
        kind = self.kind(uuid)
        if kind is None:
            return 404
        opts = dict(p.partition("=")[::2] for p in segment.split(","))
        width = opts.get("width")
        if width is not None and not (width.isascii() and width.isdigit() and int(width) > 0):
            return 400
        return self.gone(uuid) or self._form(uuid, kind, opts, width)

    def _form(self, uuid: str, kind: str, opts: Mapping[str, str], width: str | None) -> MediaFile:
        resized = None if opts.get("original") == "true" or width is None else snap_width(int(width))
        if kind == "video":  # without transcode=true the CDN answers a still
            return self._file(uuid, "video" if opts.get("transcode") == "true" else "still", resized)
        return self._file(uuid, kind, None if kind == "audio" else resized)

    def _file(self, uuid: str, kind: str, width: int | None) -> MediaFile:
        h = mix64(self._hash(uuid) ^ {"image": 1, "still": 2, "video": 3, "audio": 4}[kind])
        if kind == "image":
            fmt, size = _pick(h >> 8, _IMAGE_FORMATS), 10_000 + h % 290_000
        elif kind == "still":
            fmt, size = "jpeg", 20_000 + h % 180_000
        elif kind == "video":
            fmt, size = _pick(h >> 8, _VIDEO_FORMATS), self._video_size(h)
        else:
            fmt, size = "mp3", 200_000 + h % 1_800_000
        if width is not None:
            size = max(2_000, size * width // 2_400)
        return MediaFile(uuid, kind, width, fmt, size, mix64(h ^ (width or 0) << 20), self._pool)

    def _video_size(self, h: int) -> int:
        if self.options.video_mb is not None:
            return int(self.options.video_mb * (1 << 20)) + h % 4096
        return 1_000_000 + h % 3_000_000

    def file(self, url: str) -> MediaFile:
        """The file served at `url` (any URL form); LookupError naming the status when none is."""
        found = self.resolve(urlsplit(url).path)
        if isinstance(found, int):
            raise LookupError(f"the fake CDN answers {found} for {url}")
        return found

    def expected(self, url: str) -> bytes:
        """The exact bytes a 200 for `url` carries (built in memory: for files of test size)."""
        return self.file(url).read()

    def for_item(self, item: Mapping[str, Any], variant: str | int = "original") -> MediaFile:
        """What a correct downloader stores for a served item: see fetch_url."""
        return self.file(self.fetch_url("http://cdn", item, variant))
