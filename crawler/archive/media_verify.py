"""`harvest verify`, for media: is every recorded file still there, with the bytes recorded?

Each `done` file is hashed again: one missing, of another size or another SHA-256
than its record is a problem (named, with what differs). `fetching` rows are a run
that was stopped part way: a note, not a problem (the next run reconciles them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crawler.archive import media_ledger as ml
from crawler.archive.media_files import hash_file
from crawler.archive.media_ledger import MediaLedger, MediaRow


@dataclass(slots=True)
class MediaReport:
    files: int = 0  # recorded files checked
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_media(media_dir: Path, ledger: MediaLedger) -> MediaReport:
    report = MediaReport()
    for row in ledger.rows(ml.DONE):
        report.files += 1
        problem = _check(media_dir, row)
        if problem is not None:
            report.problems.append(f"media {row.id}: {problem}")
        else:
            report.bytes += row.size or 0
    fetching = ledger.counts().fetching
    if fetching:
        report.notes.append(f"{fetching} media download(s) were stopped part way (the next run resumes them)")
    return report


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
