"""What becomes of a segment once it is closed: an ordered list of named, recorded steps.

Each step's completion is recorded in the state (`segment_steps`), so after a crash
at any instant the next start runs, for every closed segment, the steps not yet
recorded, in order. A crash inside a step means that step runs again, so a step
must resume from whatever it left half done. Adding a step (publishing to object
storage, say) is one more class in the list; the others do not change.

A step with nothing to do under the current options (`wanted` is false) is not
recorded, so a later run that wants it still does it: closed segments left plain
are compressed once compression is turned on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from crawler.archive.compression import compress
from crawler.archive.fs import describe, fsync_dir
from crawler.archive.state import Kind, Publication, SegmentRow, State
from crawler.archive.store import ObjectStore, digest_file
from crawler.errors import OutputError


class SegmentStep(Protocol):
    """One piece of work on a closed segment, safe to run again after a crash part way."""

    @property
    def name(self) -> str:
        """Recorded in the state: a released step is never renamed."""
        ...

    def wanted(self, segment: SegmentRow) -> bool:
        """Whether this step has work to do on `segment` under the current options."""
        ...

    def run(self, segment: SegmentRow, out_dir: Path, state: State) -> None:
        """Do the work, picking up where an interrupted run of it stopped."""
        ...


@dataclass(frozen=True, slots=True)
class Compress:
    """Replace the plain file by its compressed form.

    Write `.part`, fsync, rename (fs.write_atomic), record `segments.file`, then
    remove the plain file: a crash before the record leaves the plain file
    authoritative (compressed again), after it only the removal is left to do.
    """

    codec: str  # "zstd", "gzip" or "none"
    name: ClassVar[str] = "compress"

    def wanted(self, segment: SegmentRow) -> bool:
        # With compression off, only a compression a crash interrupted has work left.
        return self.codec != "none" or segment.file != segment.name

    def run(self, segment: SegmentRow, out_dir: Path, state: State) -> None:
        plain = out_dir / segment.name
        if not plain.exists() and state.publication(Kind.SEGMENT, segment.name) is not None:
            return  # published plain and its local copy dropped: it stays as published
        if segment.file == segment.name:
            try:
                packed = compress(plain, self.codec)
            except OSError as exc:
                raise OutputError(f"{plain}: compression failed: {exc.strerror}") from None
            state.set_segment_file(segment.name, packed.name)
        plain.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Publish:
    """Upload the segment's file (compressed, once `Compress` is done) to the object store,
    check it there (size, ETag), then record it (`published`).

    The upload goes to the final key: after a crash before the record, the next start
    uploads again to the same key, and `ObjectStore.upload` sends nothing when the object
    there already is this file. So the store holds every segment once, whole.
    """

    store: ObjectStore
    name: ClassVar[str] = "publish"

    def wanted(self, segment: SegmentRow) -> bool:
        return True

    def run(self, segment: SegmentRow, out_dir: Path, state: State) -> None:
        done = state.publication(Kind.SEGMENT, segment.name)
        if done is not None and done.file == segment.file:
            return
        path = out_dir / segment.file
        try:
            digest = digest_file(path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot read it for publishing: {describe(exc)}") from None
        found = self.store.upload(path, segment.file, digest)
        state.record_published(
            Publication(
                Kind.SEGMENT, segment.name, segment.file, found.url, found.size, found.etag, digest.sha256
            )
        )


@dataclass(frozen=True, slots=True)
class DropLocal:
    """`keep_local = false`: delete the local copy of a published segment, once its record is
    committed. The record is marked first (`local = 0`), so readers go to the store whenever
    the file is absent; a crash before the deletion leaves the file, deleted on the next start.
    """

    keep_local: bool
    name: ClassVar[str] = "drop-local"

    def wanted(self, segment: SegmentRow) -> bool:
        return not self.keep_local

    def run(self, segment: SegmentRow, out_dir: Path, state: State) -> None:
        done = state.publication(Kind.SEGMENT, segment.name)
        if done is None:  # Publish runs first: this would be a bug, and the file stays
            raise OutputError(f"{out_dir / segment.file}: not published, so its local copy is kept")
        if done.local:
            state.drop_local(Kind.SEGMENT, segment.name)
        for file in {done.file, segment.file}:
            try:
                (out_dir / file).unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"{out_dir / file}: cannot delete it: {describe(exc)}") from None
        fsync_dir(out_dir)


def finish_closed(
    segments: Iterable[SegmentRow], out_dir: Path, state: State, steps: Sequence[SegmentStep]
) -> None:
    """Run, for each closed segment, the steps it has not completed yet, in order."""
    for segment in segments:
        done = state.done_steps(segment.name)
        for step in steps:
            if step.name in done or not step.wanted(segment):
                continue
            step.run(segment, out_dir, state)
            state.record_step(segment.name, step.name)
            segment = state.segment(segment.name)  # as the step left it (its file, say)
