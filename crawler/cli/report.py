"""What a person or a cron wrapper reads: the run summary and the shard table."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import orjson

from crawler.archive import agreement
from crawler.archive.fs import create_new
from crawler.archive.media_ledger import MediaCounts, MediaLedger
from crawler.archive.observations import RefreshLedger
from crawler.archive.state import Kind, ShardStatus, State
from crawler.config import Config
from crawler.crawl.pipeline import RunSummary
from crawler.crawl.watch import MediaTally
from crawler.errors import ExitCode, OutputError
from crawler.http.gate import Counters

SUMMARY_FILE = "last-run.json"


def summary_dict(summary: RunSummary, exit_code: int) -> dict[str, Any]:
    """How the run ended (its exit status; `ok` only for 0), then every figure: the pipeline's,
    then all of the client's counters."""
    counters = _counters(summary.counters)
    return {
        "exit_code": exit_code,
        "ok": exit_code == ExitCode.OK,
        "command": summary.command,
        "new_items": summary.new_items,
        "pages": summary.pages,
        **counters,
        "shards": summary.shards,
        "shards_done": summary.shards_done,
        "failures": summary.failures,
        "capped": summary.capped,
        "warnings": summary.warnings,
        "levels_served": {key: _levels(counts) for key, counts in summary.levels.items()},
        "elapsed_seconds": round(summary.elapsed, 3),
        **({"media": media_dict(summary.media)} if summary.media is not None else {}),
        **({"refresh": asdict(summary.refresh)} if summary.refresh is not None else {}),
    }


def _counters(counters: Counters) -> dict[str, Any]:
    """A gate's counters as the summary spells them."""
    fields = asdict(counters)
    fields["cooldown_seconds"] = round(fields["cooldown_seconds"], 3)
    fields["failed_attempts"] = fields.pop("by_reason")
    return fields


def media_dict(media: MediaTally) -> dict[str, Any]:
    """The media stage's figures: files, bytes and rates, then its own gate's counters."""
    files, mb = media.rates()
    counters = _counters(media.counters)
    return {
        "done": media.done,
        "gone": media.gone,
        "failed": media.failed,
        "bytes": media.bytes,
        "files_per_second": round(files, 2),
        "mb_per_second": round(mb, 2),
        **counters,
        "failures": media.failures,
    }


def _levels(counts: dict[int, int]) -> dict[str, int]:
    return {str(level): counts[level] for level in sorted(counts)}


def write_summary(out_dir: Path, summary: RunSummary, exit_code: int) -> None:
    """Atomically replace the output dir's summary, for dashboards and cron wrappers.

    The temporary file is created new (O_EXCL|O_NOFOLLOW): a symlink planted under
    its name is refused, never written through; the rename replaces a symlink at
    the summary's own name, not its target.
    """
    target = out_dir / SUMMARY_FILE
    temp = target.with_suffix(".tmp")
    data = orjson.dumps(summary_dict(summary, exit_code), option=orjson.OPT_INDENT_2) + b"\n"
    try:
        with create_new(temp) as out:
            out.write(data)
        os.replace(temp, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write the run summary: {exc.strerror or exc}") from None


def print_summary(summary: RunSummary, config: Config, out: TextIO | None = None) -> None:
    out = out or sys.stderr  # looked up now: json logging replaces sys.stderr after import
    if summary.command == "run":
        _print_harvest(summary, config, out)
    if summary.media is not None:
        _print_media(summary.media, config, out)
    if summary.refresh is not None:
        _print_refresh(summary, config, out)


def _print_refresh(summary: RunSummary, config: Config, out: TextIO) -> None:
    tally, c = summary.refresh, summary.counters
    assert tally is not None
    state = "complete" if tally.complete else "in progress"
    if not tally.due:
        passes = f"{tally.pass_no} passes so far"
        print(f"harvest: refresh: nothing is due; {passes} -> {config.output.dir}", file=out)
        return
    print(
        f"harvest: refresh pass {tally.pass_no} ({'resumed, ' if tally.resumed else ''}{state}): "
        f"{tally.observed} of {tally.due} ids observed, {tally.gone} gone; {tally.batches} batches, "
        f"{c.requests} requests, {c.retries} retries, {c.rate_limited} rate-limited; "
        f"{summary.elapsed:.1f} s -> {config.output.dir}",
        file=out,
    )
    for failure in summary.failures:
        print(f"harvest: failed: {failure}", file=out)
    if not tally.complete:
        print(f"harvest: rerun `harvest refresh {config.path}` to finish the pass", file=out)


def _print_media(media: MediaTally, config: Config, out: TextIO) -> None:
    files, mb = media.rates()
    c = media.counters
    print(
        f"harvest: media: {media.done} files, {media.bytes / 1e6:.1f} MB ({files:.1f} files/s, "
        f"{mb:.1f} MB/s), {media.gone} gone, {media.failed} failed; {c.requests} requests, "
        f"{c.retries} retries, {c.rate_limited} rate-limited -> {config.media.dir}",
        file=out,
    )
    for failure in media.failures:
        print(f"harvest: failed: {failure}", file=out)
    if media.failed > len(media.failures):
        print(f"harvest: ... and {media.failed - len(media.failures)} more media failed", file=out)
    if media.failed:
        print(f"harvest: rerun `harvest media {config.path}` (or `harvest run`) to retry them", file=out)


def _print_harvest(summary: RunSummary, config: Config, out: TextIO) -> None:
    c = summary.counters
    print(
        f"harvest: {summary.new_items} new images in {summary.pages} pages; "
        f"{c.requests} requests, {c.retries} retries, {c.rate_limited} rate-limited"
        f"{f' (rate lowered to {c.lowest_rps:g}/s)' if c.rate_decreases else ''}; "
        f"{summary.shards_done}/{summary.shards} shards done; {summary.elapsed:.1f} s "
        f"-> {config.output.dir}",
        file=out,
    )
    for failure in summary.failures:
        print(f"harvest: failed: {failure}", file=out)
    for capped in summary.capped:
        print(f"harvest: {capped}", file=out)
    if summary.failures:
        print(f"harvest: rerun `harvest run {config.path}` to resume", file=out)


def _shown(levels: dict[int, int]) -> str:
    """`1:120 2:30 4:0`, by browsing level (1 PG, 2 PG-13, 4 R, 8 X, 16 XXX); `-` before any."""
    return " ".join(f"{level}:{levels[level]}" for level in sorted(levels)) or "-"


def print_status(state: MediaLedger, config: Config, out: TextIO = sys.stdout) -> None:
    shards = state.shards()
    rows = [("STATUS", "IMAGES", "PAGES", "LEVELS SERVED", "QUERY", "SHARD")]
    rows += [
        (s.status, str(s.items), str(s.pages), _shown(state.levels(s.key)), s.query, s.key) for s in shards
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5], file=out)
    for shard in shards:
        if shard.error:
            print(f"{shard.query} [{shard.key}]: {shard.error}", file=out)
        if shard.status == ShardStatus.CAPPED:
            print(f"{shard.query} [{shard.key}]: capped: holds {shard.items} images; more exist", file=out)
    segments = state.segments()
    pass_no = state.get_meta("pass") or "0"
    open_ = "in progress" if state.get_meta("pass_open") == "1" else "complete"
    for line in _missing_segments(state, config):
        print(line, file=out)
    print(
        f"{state.seen_count()} images in {len(segments)} file(s) under {config.output.dir}; "
        f"pass {pass_no} {open_}",
        file=out,
    )
    refresh = state.sharing(RefreshLedger)
    current = refresh.refresh_pass()
    if current.number:
        observed, gone = refresh.observed_count()
        where = f"in progress, {current.todo} ids left" if current.open else "complete"
        print(
            f"refresh: pass {current.number} {where}; {observed} ids observed, {gone} gone when last seen",
            file=out,
        )
    media = state.counts()
    if media != MediaCounts() or config.media.download:
        stopped = f", {media.fetching} stopped part way" if media.fetching else ""
        print(
            f"media: {media.done} done ({media.bytes / 1e6:.1f} MB), {media.gone} gone, "
            f"{media.failed} failed{stopped} under {config.media.dir}",
            file=out,
        )
    _print_published(state, config, out)


def _print_published(state: State, config: Config, out: TextIO) -> None:
    """`published: N segments (X MB, D only in the store), M media files (...) -> s3://...`."""
    counts = state.published_counts()
    if not counts and config.output.publish is None:
        return
    parts = []
    for kind, label in ((Kind.SEGMENT, "segments"), (Kind.MEDIA, "media files")):
        n, size, dropped = counts.get(kind, (0, 0, 0))
        parts.append(f"{n} {label} ({size / 1e6:.1f} MB, {dropped} only in the store)")
    where = f" -> {config.output.publish}" if config.output.publish is not None else ""
    print(f"published: {', '.join(parts)}{where}", file=out)


def _missing_segments(state: State, config: Config) -> list[str]:
    """Segments whose file is gone. Asked twice: a run may compress a segment (and remove its
    plain file) between reading the state and looking at the files; then the second asking,
    with the state read again, finds the compressed file."""
    published = state.publications(Kind.SEGMENT)
    found = agreement.missing(config.output.dir, state.segments(), published)
    if found:
        found = agreement.missing(config.output.dir, state.segments(), state.publications(Kind.SEGMENT))
    hint = f"to rebuild the state from the files: harvest repair {config.path}"
    return found + ([hint] if found else [])
