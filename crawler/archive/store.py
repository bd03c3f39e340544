"""The object store an archive is published to: any S3-compatible store, through fsspec/s3fs.

`ObjectStore("s3://bucket/prefix")` puts files under the prefix and reads them back.
Where the store is and who we are come only from the standard AWS environment
variables and config files (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_PROFILE`, `~/.aws/config`, ...),
read by botocore itself: never from the harvest config.

An upload goes straight to its final key (S3 makes an object visible whole or not
at all: a killed single PUT or an unfinished multipart upload leaves no object).
`upload` is idempotent: an object already at the key with the local file's size
and ETag is left alone, anything else is replaced, and the result is checked
against the file (size, and the ETag S3 computes: the MD5 of the bytes, or of the
parts' MD5s for a multipart upload, which `digest_file` computes locally the same
way). So a caller that uploads, then records, and on restart uploads again
whatever it had not recorded, ends with every object once and byte-exact.

Files of `2 * PART_SIZE` or more go up as multipart uploads in parts of
`PART_SIZE` (s3fs), so memory stays at a few parts whatever the file's size.
Every failure is a one-line `StoreError` naming the object; botocore retries
throttling and 5xx answers itself (5 attempts) before that.

s3fs is an optional extra (`pip install 'civitai-harvest[s3]'`): it is imported
when a store is first used, and its absence is a StoreError saying so.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from crawler.errors import StoreError

SCHEME = "s3://"
PART_SIZE = 8 << 20  # bytes per part of a multipart upload (S3's minimum is 5 MiB)
MAX_PARTS = 10_000  # S3's limit: larger files get larger parts
_CHUNK = 1 << 20
# S3's bucket naming rules, loosely: what no store accepts is refused before any request.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,254}")


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """`s3://bucket/prefix`: where an archive's objects go. `prefix` has no leading or
    trailing slash ("" for the bucket's root)."""

    bucket: str
    prefix: str = ""

    def key(self, relative: str) -> str:
        """The object key of `relative` (a path under the prefix, with `/`)."""
        relative = relative.strip("/")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def url(self, relative: str = "") -> str:
        """`s3://bucket/prefix/relative` (the prefix itself for "")."""
        key = self.key(relative) if relative else self.prefix
        return f"{SCHEME}{self.bucket}/{key}" if key else f"{SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url()


def parse_url(text: str) -> StoreUrl:
    """`s3://bucket[/prefix]` as a StoreUrl; ValueError saying what is wrong otherwise."""
    if not isinstance(text, str) or not text.startswith(SCHEME):
        raise ValueError(f'expected an "{SCHEME}bucket/prefix" URL')
    rest = text[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f'"{bucket}" is not a bucket name (lower-case letters, digits, ".", "-")')
    if "@" in bucket or "?" in text or "#" in text:
        raise ValueError(
            "no credentials, query or fragment in the URL (credentials come from AWS_* variables)"
        )
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts) or any(ord(c) < 32 for c in prefix):
        raise ValueError(f'"{prefix}" is not a usable key prefix')
    return StoreUrl(bucket, "/".join(parts))


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """An object in the store as it is now."""

    url: str  # s3://bucket/key
    size: int
    etag: str  # without quotes: an MD5 in hex, or `<md5 of the parts' MD5s>-<parts>`


@dataclass(frozen=True, slots=True)
class LocalDigest:
    """What a local file becomes in the store: its size, the ETag S3 gives it, its SHA-256."""

    size: int
    etag: str
    sha256: str
    part_size: int  # the part size the ETag assumes (multipart from 2 parts on)


def part_size_for(size: int) -> int:
    """The part size `upload` uses for a file of `size` bytes."""
    return max(PART_SIZE, math.ceil(size / MAX_PARTS))


def multipart(size: int, part_size: int) -> bool:
    """Whether s3fs uploads a file of `size` in parts (it does from two parts on)."""
    return size >= 2 * part_size


def digest_file(path: Path) -> LocalDigest:
    """Size, S3 ETag and SHA-256 of a local file, in one read; OSError when it cannot be read."""
    size = path.stat().st_size
    part = part_size_for(size)
    whole, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    parts: list[bytes] = []
    current, in_part = hashlib.md5(usedforsecurity=False), 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            whole.update(chunk)
            sha.update(chunk)
            while chunk:
                take = chunk[: part - in_part]
                current.update(take)
                in_part += len(take)
                chunk = chunk[len(take) :]
                if in_part == part:
                    parts.append(current.digest())
                    current, in_part = hashlib.md5(usedforsecurity=False), 0
    if in_part:
        parts.append(current.digest())
    if multipart(size, part):
        etag = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}"
    else:
        etag = whole.hexdigest()
    return LocalDigest(size, etag, sha.hexdigest(), part)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Any failure of the client (botocore, aiohttp, OSError) as one StoreError line."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: every client error becomes one line
        raise StoreError(f"{what}: {_one_line(exc)}") from None


def _filesystem() -> Any:
    try:
        import s3fs
    except ImportError:
        raise StoreError(
            "publishing to s3:// needs the s3 extra: pip install 'civitai-harvest[s3]'"
        ) from None
    # One client per store, its own (no instance cache shared with other code), no
    # cached listings (an object's state is asked of the store every time), at most
    # two parts in flight per upload (memory: 2 x PART_SIZE).
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, max_concurrency=2)


class ObjectStore:
    """The objects under one `s3://bucket/prefix`. Blocking calls: from async code, run them
    in a thread (`asyncio.to_thread`). Safe to use from several threads."""

    def __init__(self, root: StoreUrl | str) -> None:
        self.root = root if isinstance(root, StoreUrl) else parse_url(root)
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (s3fs), made on first use."""
        if self._fs is None:
            self._fs = _filesystem()
        return self._fs

    def _path(self, relative: str) -> str:
        return f"{self.root.bucket}/{self.root.key(relative)}"

    def url(self, relative: str) -> str:
        return self.root.url(relative)

    # -- reading ------------------------------------------------------------------

    def head(self, relative: str) -> ObjectInfo | None:
        """The object at `relative` as the store has it now, or None if there is none."""
        return self.head_url(self.url(relative))

    def head_url(self, url: str) -> ObjectInfo | None:
        """`head` of a full `s3://` URL (as recorded), which may lie under another prefix."""
        path = url.removeprefix(SCHEME)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - the boundary
            raise StoreError(f"{url}: cannot look it up: {_one_line(exc)}") from None
        if info.get("type") != "file":
            return None
        return ObjectInfo(url, int(info["size"]), str(info.get("ETag", "")).strip('"'))

    def open_url(self, url: str) -> BinaryIO:
        """A recorded object (full `s3://` URL), open for reading its bytes from the start."""
        with _mapped(f"{url}: cannot read it"):
            stream: BinaryIO = self.fs.open(url.removeprefix(SCHEME), "rb", block_size=PART_SIZE)
        return stream

    def read_bytes(self, relative: str) -> bytes:
        with _mapped(f"{self.url(relative)}: cannot read it"):
            return bytes(self.fs.cat_file(self._path(relative)))

    def download(self, relative: str, local: Path) -> None:
        with _mapped(f"{self.url(relative)}: cannot download it to {local}"):
            self.fs.get_file(self._path(relative), str(local))

    def sizes(self, under: str = "") -> dict[str, int]:
        """Every object under `under` (relative to the prefix), by relative key: its size."""
        base = self._path(under).rstrip("/")
        start = f"{self.root.bucket}/{self.root.prefix}/" if self.root.prefix else f"{self.root.bucket}/"
        with _mapped(f"{self.url(under)}: cannot list it"):
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        return {path.removeprefix(start): int(info["size"]) for path, info in found.items()}

    # -- writing ------------------------------------------------------------------

    def upload(self, local: Path, relative: str, digest: LocalDigest | None = None) -> ObjectInfo:
        """Put `local` at `relative`, unless an object with its size and ETag is there already;
        return the object, checked against the file. Safe to repeat after a crash at any point."""
        url = self.url(relative)
        if digest is None:
            with _mapped(f"{local}: cannot read it for publishing"):
                digest = digest_file(local)
        found = self.head(relative)
        if found is not None and found.size == digest.size and found.etag == digest.etag:
            return found  # an earlier attempt got it there; nothing is uploaded twice
        if multipart(digest.size, digest.part_size):  # a single PUT leaves nothing when killed
            self._abort_unfinished(relative)  # what a killed multipart upload of this key left
        with _mapped(f"{url}: upload failed"):
            self.fs.put_file(str(local), self._path(relative), chunksize=digest.part_size)
        return self._checked(relative, digest)

    def put_bytes(self, relative: str, data: bytes) -> ObjectInfo:
        """Put a small object whole (one PUT), checked like `upload`."""
        url = self.url(relative)
        with _mapped(f"{url}: upload failed"):
            self.fs.pipe_file(self._path(relative), data)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        digest = LocalDigest(len(data), md5, hashlib.sha256(data).hexdigest(), part_size_for(len(data)))
        return self._checked(relative, digest)

    @contextmanager
    def writer(self, relative: str) -> Iterator[BinaryIO]:
        """A stream written to `relative` in parts of PART_SIZE (one PUT when it stays smaller);
        the object appears when the block ends without error, and not at all otherwise."""
        url = self.url(relative)
        with _mapped(f"{url}: upload failed"):
            stream = self.fs.open(self._path(relative), "wb", block_size=PART_SIZE)
        try:
            yield stream
        except BaseException:
            with _mapped(f"{url}: cannot abort the upload"):
                stream.discard()  # aborts a multipart upload begun; nothing is committed
                stream.closed = True  # and nothing is flushed when it is collected
            raise
        with _mapped(f"{url}: upload failed"):
            stream.close()

    def remove(self, relative: str) -> None:
        with _mapped(f"{self.url(relative)}: cannot remove it"):
            try:
                self.fs.rm_file(self._path(relative))
            except FileNotFoundError:
                pass

    def _checked(self, relative: str, digest: LocalDigest) -> ObjectInfo:
        found = self.head(relative)
        url = self.url(relative)
        if found is None:
            raise StoreError(f"{url}: the store accepted the upload but has no such object")
        if found.size != digest.size:
            raise StoreError(f"{url}: the store holds {found.size} bytes, {digest.size} were sent")
        if found.etag != digest.etag:
            raise StoreError(
                f"{url}: the store's ETag {found.etag} is not the MD5 of the bytes sent ({digest.etag}); "
                "stores whose ETag is not an MD5 (SSE-KMS) are not supported"
            )
        return found

    def _abort_unfinished(self, relative: str) -> None:
        """Abort the multipart uploads of this key an interrupted run left (they hold parts,
        invisibly, until aborted). One key has one uploader: the harvest holding the output dir."""
        key = self.root.key(relative)
        with _mapped(f"{self.url(relative)}: cannot list unfinished uploads"):
            answer = self.fs.call_s3("list_multipart_uploads", Bucket=self.root.bucket, Prefix=key)
            for upload in answer.get("Uploads", []):
                if upload.get("Key") == key:
                    self.fs.call_s3(
                        "abort_multipart_upload",
                        Bucket=self.root.bucket,
                        Key=key,
                        UploadId=upload["UploadId"],
                    )


@functools.lru_cache(maxsize=16)
def _store_of(bucket: str, endpoint: str | None) -> ObjectStore:
    return ObjectStore(StoreUrl(bucket))


def store_of(url: str) -> ObjectStore:
    """A store for reading a recorded `s3://bucket/key` URL (one client per bucket, kept)."""
    bucket = url.removeprefix(SCHEME).split("/", 1)[0]
    return _store_of(bucket, os.environ.get("AWS_ENDPOINT_URL"))


def open_object(url: str) -> BinaryIO:
    """A recorded object, open for reading (a StoreError naming it when it cannot be)."""
    return store_of(url).open_url(url)
