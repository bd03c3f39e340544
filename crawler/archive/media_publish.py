"""Media files to the object store (`[output] publish`): each once, after its record.

A file is published after the media stage has recorded it `done` (so the store
never holds a file the state does not know): uploaded to `media/<path>` under the
store's prefix (the same path as in the media dir), checked there (size, ETag),
then recorded in `published`. A crash before the record means the next start
finds the file done but unpublished (`backlog`) and uploads it again to the same
key, which sends nothing when the object there already is this file. With
`keep_local = false` the local file is deleted once the record is committed
(marked first, so readers and `verify` look in the store).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from crawler.archive import media_ledger as ml
from crawler.archive.fs import describe
from crawler.archive.media_ledger import MediaLedger
from crawler.archive.state import Kind, Publication
from crawler.archive.store import LocalDigest, ObjectStore, StoreUrl, digest_file
from crawler.errors import OutputError

log = logging.getLogger("harvest")
MEDIA_PREFIX = "media"  # media files' keys under the store's prefix: media/<id // 10^6>/...


class MediaPublisher:
    """Uploads recorded media files and records them; blocking work runs in threads."""

    def __init__(self, media_dir: Path, ledger: MediaLedger, root: StoreUrl, keep_local: bool) -> None:
        self.media_dir, self.ledger, self.keep_local = media_dir, ledger, keep_local
        self.store = ObjectStore(root)
        self.published = 0  # files uploaded (or found there) and recorded by this process

    async def publish(self, image_id: int, relative: str, sha256: str) -> None:
        """Put the recorded file `relative` (in the media dir) in the store, and record it."""
        path = self.media_dir / relative
        digest = await asyncio.to_thread(_digest, path)
        if digest.sha256 != sha256:
            raise OutputError(f"{path}: changed since it was recorded (SHA-256); `harvest verify` names it")
        key = f"{MEDIA_PREFIX}/{relative}"
        found = await asyncio.to_thread(self.store.upload, path, key, digest)
        self.ledger.record_published(
            Publication(Kind.MEDIA, str(image_id), relative, found.url, found.size, found.etag, sha256)
        )
        self.published += 1
        if not self.keep_local:
            self.ledger.drop_local(Kind.MEDIA, str(image_id))
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"{path}: cannot delete it: {describe(exc)}") from None

    async def backlog(self, concurrency: int) -> None:
        """Publish every `done` file not recorded as published (and drop what is due to go)."""
        published = self.ledger.publications(Kind.MEDIA)
        for item in published.values():
            if item.local and not self.keep_local:  # keep_local turned false since
                await self._drop(item)
        todo = [row for row in self.ledger.rows(ml.DONE) if str(row.id) not in published]
        if todo:
            log.info("media: publishing %d recorded file(s) not in the store yet", len(todo))
        slots = asyncio.Semaphore(concurrency)

        async def one(image_id: int, relative: str, sha256: str) -> None:
            async with slots:
                await self.publish(image_id, relative, sha256)

        async with asyncio.TaskGroup() as group:
            for row in todo:
                group.create_task(one(row.id, row.path or "", row.sha256 or ""))

    async def _drop(self, item: Publication) -> None:
        self.ledger.drop_local(Kind.MEDIA, item.name)
        path = self.media_dir / item.file
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"{path}: cannot delete it: {describe(exc)}") from None


def _digest(path: Path) -> LocalDigest:
    try:
        return digest_file(path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read it for publishing: {describe(exc)}") from None
