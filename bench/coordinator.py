"""Scenario 10, the media coordinator's ledger: how fast results are recorded, and the state's
size, with 10,000,000 media rows already in it (1,000,000 with --quick).

The Ray engine's one coordinator writes the state for the whole cluster: a task's items are
begun (`MediaLedger.begin_many`, as the work list hands them out) and its results recorded
(`MediaLedger.record`: one transaction per task, each file straight to the object store, so
a `published` row each too). This measures those two calls, in this process, for tasks of
2,000 items, on an empty ledger and again on one preloaded to the full size; the preload is
made by SQLite itself (a recursive CTE, rows shaped like the engine's), because recording 10 M
rows through the calls would take minutes and measure nothing more. The size per million rows
is the growth of the state file over the measured tasks, through the real calls.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crawler.archive.media_ledger import DONE, MediaLedger, MediaRef, MediaResult
from crawler.archive.state import STATE_FILE, Kind

TASK_ITEMS = 2_000  # the engine's default task size
TASKS = 50  # measured on each ledger
TARGET_RESULTS_PER_S = 5_000.0  # a cluster fetching 5,000 files/s is recorded as fast as it fetches

_URL = "https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/{:032x}/original=true/{}.jpeg"
_PRELOAD_MEDIA = """
WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
INSERT INTO media (id, type, url, status, source, path, size, sha256, content_type, tries, error, updated)
SELECT i, 'image',
       printf('https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/%032x/original=true/%d.jpeg', i, i),
       'done',
       printf('https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/%032x/original=true/%d.jpeg', i, i),
       printf('%03d/%03d/%d.jpeg', i / 1000000, i / 1000 % 1000, i), 480000, printf('%064x', i),
       'image/jpeg', 1, NULL, 1.7e9
FROM n
"""
_PRELOAD_PUBLISHED = """
WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
INSERT INTO published (kind, name, file, url, size, etag, sha256, local, at)
SELECT ?3, CAST(i AS TEXT), printf('%03d/%03d/%d.jpeg', i / 1000000, i / 1000 % 1000, i),
       printf('s3://bucket/archive/media/%03d/%03d/%d.jpeg', i / 1000000, i / 1000 % 1000, i),
       480000, printf('"%032x"', i), printf('%064x', i), 0, 1.7e9
FROM n
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _task(first: int) -> tuple[list[MediaRef], list[MediaResult]]:
    """One task's items and their results, as a worker reports files put in the store."""
    refs = [MediaRef(i, _URL.format(i, i), "image") for i in range(first, first + TASK_ITEMS)]
    results = [
        MediaResult(
            r.id,
            DONE,
            f"{r.id // 1_000_000:03d}/{r.id // 1000 % 1000:03d}/{r.id}.jpeg",
            480_000,
            hashlib.sha256(str(r.id).encode()).hexdigest(),
            "image/jpeg",
            source=r.url,
            url=f"s3://bucket/archive/media/{r.id // 1_000_000:03d}/{r.id // 1000 % 1000:03d}/{r.id}.jpeg",
            etag=f'"{r.id:032x}"',
        )
        for r in refs
    ]
    return refs, results


def _measure(out: Path, first: int) -> tuple[float, int]:
    """Seconds to begin and record TASKS tasks from id `first`, and the state's growth in bytes."""
    tasks = [_task(first + n * TASK_ITEMS) for n in range(TASKS)]
    before = _size(out)
    with MediaLedger.open(out) as ledger:
        started = time.perf_counter()
        for refs, results in tasks:
            ledger.begin_many(refs)
            recorded = ledger.record(results)
            assert len(recorded) == len(results)
        elapsed = time.perf_counter() - started
    return elapsed, _size(out) - before


def _size(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(STATE_FILE))


def _preload(out: Path, first: int, last: int) -> float:
    started = time.perf_counter()
    with sqlite3.connect(out / STATE_FILE) as conn:
        conn.execute(_PRELOAD_MEDIA, (first, last))
        conn.execute(_PRELOAD_PUBLISHED, (first, last, Kind.MEDIA))
    with sqlite3.connect(out / STATE_FILE) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - started


def scenario_coordinator(rows: int, keep: bool) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="harvest-bench-ledger-"))
    log(f"scenario 10: the coordinator's ledger, {TASKS} tasks of {TASK_ITEMS}, empty and at {rows:,} rows")
    try:
        empty_s, _ = _measure(scratch, 1)
        done = 1 + TASKS * TASK_ITEMS
        preload_s = _preload(scratch, done, rows)
        log(f"  [10] preloaded to {rows:,} rows in {preload_s:.0f} s; state {_size(scratch) / 2**30:.2f} GiB")
        full_s, grown = _measure(scratch, rows + 1)
        state_bytes = _size(scratch)
    finally:
        if not keep:
            for path in scratch.iterdir():
                path.unlink()
            scratch.rmdir()
    measured = TASKS * TASK_ITEMS
    figures = {
        "ledger_rows": rows,
        "task_items": TASK_ITEMS,
        "empty_results_per_s": round(measured / empty_s),
        "full_results_per_s": round(measured / full_s),
        "full_ms_per_task": round(full_s / TASKS * 1000, 1),
        "full_vs_empty": round(empty_s / full_s, 3),
        "state_mib_per_million": round(grown / measured * 1e6 / 2**20, 1),
        "state_gib_at_rows": round(state_bytes / 2**30, 2),
        "preload_s": round(preload_s, 1),
    }
    log(
        f"  [10] {figures['empty_results_per_s']:,} results/s empty, {figures['full_results_per_s']:,} at "
        f"{rows:,} rows; {figures['state_mib_per_million']} MiB of state per million"
    )
    rate = figures["full_results_per_s"]
    targets = [
        {
            "scenario": "10",
            "target": f"results recorded/s at {rows:,} ledger rows >= {TARGET_RESULTS_PER_S:,.0f}",
            "value": f"{rate:,}",
            "pass": rate >= TARGET_RESULTS_PER_S,
        }
    ]
    return {"figures": figures, "targets": targets, "seconds": round(empty_s + preload_s + full_s, 1)}
