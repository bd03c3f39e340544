"""Scenario 8, export: `harvest export` of a harvested archive, against the hand-written loop.

A harvest of 1,000,000 images (100,000 with --quick; 6 versions, withMeta, segments
of 100,000 closed as zstd) is made once with the real `harvest run`; then, each a
measured child process:

- `harvest export` (the first export, then `--full` for the other repetitions):
  images/s, CPU per image, peak RSS, Parquet bytes against the NDJSON bytes;
- `harvest export` again with nothing new (the incremental no-op);
- `harvest export --format jsonl.gz` (once) and `harvest sql` counting meta (once);
- bench/export_baseline.py: orjson per line and a Python loop, one Parquet file (once);
- last, `harvest refresh` of every harvested id (ids= batches of 100 at unlimited rate: ids/s),
  then the export of its observations (once).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.harness import (
    HARVEST,
    PYTHON,
    ROOT,
    Measured,
    Server,
    WorkDir,
    dataset_spec,
    harvest_query,
    run_harvest,
    run_measured,
    split_versions,
    write_config,
)
from crawler.archive.state import STATE_FILE

VERSIONS = 6
TARGET_SECONDS_PER_MILLION = 30.0  # "well under a minute" for a million images on 2 cores


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _target(what: str, value: str, ok: bool) -> dict[str, Any]:
    return {"scenario": "8", "target": what, "value": value, "pass": bool(ok)}


def _export(config: Path, *args: str, timeout: float = 900) -> Measured:
    m = run_measured([HARVEST, "export", str(config), *args], timeout=timeout)
    if m.code != 0:
        raise RuntimeError(f"harvest export exited {m.code}: {m.stderr[-3000:]}")
    return m


def _sql(config: Path, query: str) -> Measured:
    m = run_measured([HARVEST, "sql", str(config), query, "--format", "json"], timeout=900)
    if m.code != 0:
        raise RuntimeError(f"harvest sql exited {m.code}: {m.stderr[-3000:]}")
    return m


def _refresh(config: Path, out: Path) -> tuple[Measured, int]:
    """One `harvest refresh` pass over the whole harvest (ids= batches of 100, unlimited rate)."""
    m = run_measured([HARVEST, "refresh", str(config)], timeout=1800)
    if m.code != 0:
        raise RuntimeError(f"harvest refresh exited {m.code}: {m.stderr[-3000:]}")
    observed = int(json.loads((out / "last-run.json").read_text())["refresh"]["observed"])
    log(f"  [8] refresh: {observed} ids in {m.wall:.2f} s = {observed / m.wall:.0f} ids/s")
    return m, observed


def _seen(out: Path) -> int:
    with sqlite3.connect(out / STATE_FILE) as conn:
        return int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])


def _manifest(folder: Path, fmt: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())["formats"][fmt]
    return data


def _record(m: Measured, rows: int) -> dict[str, Any]:
    return {
        "items": rows,
        "wall_s": round(m.wall, 3),
        "items_per_s": round(rows / m.wall, 1) if m.wall else None,
        "cpu_s": round(m.cpu, 3),
        "cpu_us_per_item": round(m.cpu / rows * 1e6, 2) if rows else None,
        "peak_rss_mib": round(m.maxrss_mb, 1),
        "other_load_cores": round(m.other_cpu / m.wall, 2) if m.wall else None,
    }


def scenario_export(images: int, reps: int, keep: bool) -> dict[str, Any]:
    spec = dataset_spec(split_versions(images, VERSIONS))
    with WorkDir(keep) as wd, Server(spec, wd) as server:
        config = write_config(wd / "harvest.toml", server.base_url, harvest_query(), concurrency=VERSIONS)
        text = config.read_text().replace("[output]\n", '[output]\ncompress = "zstd"\n')
        config.write_text(text)
        run_harvest(config, timeout=1800, server=server)
        out = wd / "out"
        state_bytes = sum(p.stat().st_size for p in out.glob(f"{STATE_FILE}*"))  # the harvest's alone
        seen = _seen(out)
        folder = out / "export"
        runs = []
        for rep in range(reps):
            m = _export(config, *(["--full"] if rep else []))
            manifest = _manifest(folder, "parquet")
            rec = _record(m, manifest["rows"])
            rec["parquet_bytes"] = sum(f["bytes"] for f in manifest["files"])
            rec["files"] = len(manifest["files"])
            runs.append(rec)
            log(
                f"  [8] rep {rep + 1}/{reps}: {rec['items']} images in {rec['wall_s']:.2f} s = "
                f"{rec['items_per_s']:.0f}/s, {rec['cpu_us_per_item']:.1f} us CPU/image, "
                f"peak RSS {rec['peak_rss_mib']:.0f} MiB, other load {rec['other_load_cores']:.2f} cores"
            )
        ndjson = sum(s["bytes"] for s in _manifest(folder, "parquet")["segments"].values())
        zst = sum(p.stat().st_size for p in out.glob("images-*.ndjson*"))
        noop = _export(config)
        jsonl = _export(config, "--format", "jsonl.gz")
        jsonl_bytes = sum(f["bytes"] for f in _manifest(folder, "jsonl.gz")["files"])
        query = "SELECT count(*) AS images, count(meta) AS with_meta FROM images"
        sql_cold, sql_warm = (_sql(config, query) for _ in range(2))  # the cache made, then used
        baseline = run_measured(
            [PYTHON, str(ROOT / "bench" / "export_baseline.py"), str(out), str(wd / "baseline.parquet")],
            timeout=1800,
        )
        if baseline.code != 0:
            raise RuntimeError(f"export_baseline.py exited {baseline.code}: {baseline.stderr[-3000:]}")
        base_items = json.loads(baseline.stdout.strip().splitlines()[-1])["items"]
        refresh, observed = _refresh(config, out)  # last: the exports above hold no observations
        observations = _export(config)  # the observations of that pass, and latest.parquet
    rate = statistics.median([r["items_per_s"] for r in runs])
    seconds_per_million = 1e6 / rate
    parquet = statistics.median([r["parquet_bytes"] for r in runs])
    base = _record(baseline, base_items)
    figures = {
        "images": images,
        "exported_rows": runs[-1]["items"],
        "export_items_per_s": rate,
        "export_other_load_cores": statistics.median([r["other_load_cores"] for r in runs]),
        "export_wall_s": statistics.median([r["wall_s"] for r in runs]),
        "export_seconds_per_million": seconds_per_million,
        "export_cpu_us_per_item": statistics.median([r["cpu_us_per_item"] for r in runs]),
        "export_peak_rss_mib": statistics.median([r["peak_rss_mib"] for r in runs]),
        "ndjson_bytes": ndjson,
        "segments_zst_bytes": zst,
        "parquet_bytes": parquet,
        "parquet_vs_ndjson": parquet / ndjson,
        "parquet_files": runs[-1]["files"],
        "noop_export_wall_s": round(noop.wall, 2),
        "jsonl_gz_wall_s": round(jsonl.wall, 2),
        "jsonl_gz_bytes": jsonl_bytes,
        "sql_first_wall_s": round(sql_cold.wall, 2),
        "sql_first_peak_rss_mib": round(sql_cold.maxrss_mb, 1),
        "sql_again_wall_s": round(sql_warm.wall, 2),
        "sql_again_peak_rss_mib": round(sql_warm.maxrss_mb, 1),
        "baseline_items_per_s": base["items_per_s"],
        "baseline_cpu_us_per_item": base["cpu_us_per_item"],
        "export_vs_baseline": rate / base["items_per_s"],
        "refresh_ids": observed,
        "refresh_wall_s": round(refresh.wall, 2),
        "refresh_ids_per_s": round(observed / refresh.wall, 1) if refresh.wall else None,
        "refresh_cpu_us_per_id": round(refresh.cpu / observed * 1e6, 2) if observed else None,
        "refresh_peak_rss_mib": round(refresh.maxrss_mb, 1),
        "observations_export_wall_s": round(observations.wall, 2),
        "state_mib_per_million": round(state_bytes / seen * 1e6 / 2**20, 1),
    }
    targets = [
        _target(
            f"export of a million images <= {TARGET_SECONDS_PER_MILLION:.0f} s (well under a minute)",
            f"{seconds_per_million:.1f} s per million ({rate:,.0f} images/s)",
            seconds_per_million <= TARGET_SECONDS_PER_MILLION,
        )
    ]
    return {"figures": figures, "runs": runs, "baseline": base, "targets": targets}
