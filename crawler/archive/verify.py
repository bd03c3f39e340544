"""`harvest verify`: does the output say what the state says it holds?

Every line of every segment must parse as an image with an id, no id may appear
twice, each segment must hold the lines and bytes the state committed, and the
total must equal the ids the state has seen. The files must also agree with the
state the way a run requires before it cuts anything (`agreement`): no segment
missing, none the state does not know, no more than one page past a commit.

Run it while no harvest runs on the dir (the CLI holds the output lock): a run's
page in flight would look like a problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crawler.archive import agreement
from crawler.archive.observations import RefreshLedger
from crawler.archive.reader import Line, loads, segment_lines
from crawler.archive.segments import OBSERVATIONS
from crawler.archive.state import Kind, Publication, SegmentRow, State
from crawler.archive.store import store_of
from crawler.errors import StateError, StoreError


@dataclass(slots=True)
class Report:
    lines: int = 0
    segments: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems


def verify(out_dir: Path, state: State) -> Report:
    report = Report()
    seen: set[int] = set()
    segments = state.segments()
    published = state.publications(Kind.SEGMENT)
    report.problems += agreement.disagreements(out_dir, segments, published=published)
    on_disk = agreement.segment_entries(out_dir)
    for segment in segments:
        report.segments += 1
        if segment.name in published:
            report.problems += check_object(published[segment.name])
        remote = published.get(segment.name) if segment.file not in on_disk else None
        if segment.file in on_disk or remote is not None:  # a missing one is among the disagreements
            _check_segment(out_dir, segment, lambda line: _check_line(line, seen), report, remote)
    expected = state.seen_count()
    if len(seen) != expected:
        report.problems.append(f"the files hold {len(seen)} distinct ids, the state {expected}")
    return report


def check_object(published: Publication) -> list[str]:
    """A published object is in the store with the size and ETag recorded."""
    try:
        found = store_of(published.url).head_url(published.url)
    except StoreError as exc:
        return [str(exc)]
    if found is None:
        return [f"{published.url}: missing from the store (the state recorded it published)"]
    if (found.size, found.etag) != (published.size, published.etag):
        return [
            f"{published.url}: {found.size} bytes, ETag {found.etag} in the store; "
            f"recorded {published.size} bytes, ETag {published.etag}"
        ]
    return []


def verify_observations(out_dir: Path, ledger: RefreshLedger) -> Report:
    """The refresh segments against their rows in the state: the same file checks as the item
    segments (a published one checked in the store, and read from there when its local copy
    is gone), every line an observation, no id twice in one pass (passes follow one another in
    the files), and every observed id's latest observation recorded."""
    report = Report()
    segments = ledger.segments()
    published = ledger.publications(Kind.SEGMENT)
    report.problems += agreement.disagreements(out_dir, segments, OBSERVATIONS, published)
    on_disk = agreement.segment_entries(out_dir, OBSERVATIONS)
    passes = _Passes()
    for segment in segments:
        report.segments += 1
        if segment.name in published:
            report.problems += check_object(published[segment.name])
        remote = published.get(segment.name) if segment.file not in on_disk else None
        if segment.file in on_disk or remote is not None:
            _check_segment(out_dir, segment, passes.check, report, remote)
    observed, _ = ledger.observed_count()
    if len(passes.ids) != observed:
        report.problems.append(f"the refresh segments observe {len(passes.ids)} ids, the state {observed}")
    return report


@dataclass(slots=True)
class _Passes:
    ids: set[int] = field(default_factory=set)  # every id observed
    current: int = 0
    in_pass: set[int] = field(default_factory=set)

    def check(self, line: Line) -> str | None:
        if not line.data.endswith(b"\n"):
            return "torn line (no newline)"
        try:
            item = loads(line.data)
        except ValueError:
            return "not JSON"
        image_id = item.get("id") if isinstance(item, dict) else None
        pass_no = item.get("pass") if isinstance(item, dict) else None
        if not isinstance(image_id, int) or not isinstance(pass_no, int) or isinstance(image_id, bool):
            return "not an observation (an integer id and pass)"
        if pass_no < self.current:
            return f"pass {pass_no} after pass {self.current}"
        if pass_no > self.current:
            self.current, self.in_pass = pass_no, set()
        if image_id in self.in_pass:
            return f"id {image_id} observed twice in pass {pass_no}"
        self.in_pass.add(image_id)
        self.ids.add(image_id)
        return None


def _check_segment(
    out_dir: Path,
    segment: SegmentRow,
    check_line: Callable[[Line], str | None],
    report: Report,
    remote: Publication | None,
) -> None:
    count = size = 0
    try:
        for line in segment_lines(out_dir, segment, remote):
            if not line.committed_in(segment) and not segment.closed:
                # Past the commit of the active segment is only an uncommitted tail; in a
                # closed one every line counts, so extra data shows as a count mismatch.
                tail = f"an uncommitted tail past byte {segment.size} (cut by the next run)"
                report.notes.append(f"{segment.file}: {tail}")
                break
            count += 1
            size += len(line.data)
            problem = check_line(line)
            if problem:
                report.problems.append(f"{segment.file}:{line.number}: {problem}")
    except StateError as exc:  # a damaged compressed file: the counts below would only repeat it
        report.problems.append(str(exc))
        report.lines += count
        return
    report.lines += count
    if remote is not None:
        report.notes.append(f"{segment.file}: read from the object store ({remote.url})")
    if count != segment.items:
        report.problems.append(f"{segment.file}: {count} lines, the state committed {segment.items}")
    if size != segment.size:
        report.problems.append(f"{segment.file}: {size} bytes of lines, the state committed {segment.size}")


def _check_line(line: Line, seen: set[int]) -> str | None:
    if not line.data.endswith(b"\n"):
        return "torn line (no newline)"
    try:
        item = loads(line.data)  # as any reader of the archive would
    except ValueError:
        return "not JSON"
    image_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        return "no integer id"
    if image_id in seen:
        return f"id {image_id} appears twice"
    seen.add(image_id)
    return None
