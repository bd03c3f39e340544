"""`harvest verify`, for media: is every recorded file still there, with the bytes recorded?

Each `done` file is hashed again: one missing, of another size or another SHA-256
than its record is a problem (named, with what differs). A published file is also
looked up in the object store (its size and ETag as recorded); one whose local copy
was dropped (`keep_local = false`) is checked there only. `fetching` rows are a run
that was stopped part way: a note, not a problem (the next run reconciles them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crawler.archive import media_ledger as ml
from crawler.archive.media_files import hash_file
from crawler.archive.media_ledger import MediaLedger, MediaRow
from crawler.archive.state import Kind, Publication
from crawler.archive.verify import check_object


@dataclass(slots=True)
class MediaReport:
    files: int = 0  # recorded files checked
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_media(media_dir: Path, ledger: MediaLedger) -> MediaReport:
    report = MediaReport()
    published = ledger.publications(Kind.MEDIA)
    for row in ledger.rows(ml.DONE):
        report.files += 1
        remote = published.get(str(row.id))
        problems = [] if remote is None else _check_published(row, remote)
        if remote is None or remote.local:  # kept locally: the file must be there, unchanged
            local = _check(media_dir, row)
            problems += [local] if local is not None else []
        for problem in problems:
            report.problems.append(f"media {row.id}: {problem}")
        if not problems:
            report.bytes += row.size or 0
    fetching = ledger.counts().fetching
    if fetching:
        report.notes.append(f"{fetching} media download(s) were stopped part way (the next run resumes them)")
    return report


def _check_published(row: MediaRow, remote: Publication) -> list[str]:
    """The object is in the store as recorded, and it is the file the media row records."""
    problems = check_object(remote)
    if (remote.size, remote.sha256) != (row.size, row.sha256):
        problems.append(f"{remote.url}: published as another file than the one recorded")
    return problems


def _check(media_dir: Path, row: MediaRow) -> str | None:
    path = media_dir / (row.path or "")
    try:
        found = hash_file(path)
    except FileNotFoundError:
        return f"{path}: missing (recorded {row.size} bytes)"
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    if found.size != row.size:
        return f"{path}: {found.size} bytes, recorded {row.size}"
    if found.sha256 != row.sha256:
        recorded = (row.sha256 or "")[:16]
        return f"{path}: the file changed (SHA-256 {found.sha256[:16]}..., recorded {recorded}...)"
    return None
