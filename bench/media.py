"""Scenario 9, media: `harvest media` against the fake CDN on loopback, beside a hand-written
aiohttp downloader (bench/media_baseline.py) fetching the same files at the same concurrency.

A metadata harvest (`harvest run`, media off) of a model whose items point at the fake CDN
is made for each repetition; then, each a measured child process:

- `harvest media` at concurrency 8 (the default), an unlimited CDN budget: files/s, MB/s,
  CPU, peak RSS (it hashes every byte, fsyncs and records every file);
- the baseline, the same URLs into a plain folder (no hash, no fsync, no state);
- memory: `harvest media` of videos of 100 MB each, against one of ~2.5 MB videos: the peak
  RSS must not grow with the file size (bodies are streamed, never held).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.harness import (
    HARVEST,
    Measured,
    Server,
    WorkDir,
    dataset_spec,
    harvest_query,
    run_measured,
    run_script,
    split_versions,
    write_config,
)
from bench.media_baseline import cdn_flags, cdn_url_of, media_urls
from crawler.testing.configs import toml_value
from crawler.testing.fakeapi import CdnOptions

CONCURRENCY = 8
RSS_GROWTH_MIB = 30.0  # "flat": fetching 100 MB videos may cost at most this much more memory


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _target(what: str, value: str, ok: bool) -> dict[str, Any]:
    return {"scenario": "9", "target": what, "value": value, "pass": bool(ok)}


def _config(wd: Path, server: Server, cdn_url: str, out: str, **media: Any) -> Path:
    config = write_config(wd / f"{out}.toml", server.base_url, harvest_query(), out=out, concurrency=6)
    table = {
        "download": False,
        "concurrency": CONCURRENCY,
        "requests_per_second": 100_000,
        "video_base": cdn_url + "/file/civitai-media-cache",
        **media,
    }
    lines = ["", "[media]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    config.write_text(config.read_text() + "\n".join(lines) + "\n")
    return config


def _media(config: Path) -> tuple[Measured, dict[str, Any]]:
    m = run_measured([HARVEST, "media", str(config), "-q"], timeout=1800)
    summary_path = config.parent / config.stem / "last-run.json"
    if m.code != 0:
        raise RuntimeError(f"harvest media exited {m.code}: {m.stderr[-3000:]}")
    media: dict[str, Any] = json.loads(summary_path.read_text())["media"]
    return m, media


def _record(m: Measured, files: int, size: int) -> dict[str, Any]:
    return {
        "files": files,
        "bytes": size,
        "wall_s": round(m.wall, 3),
        "files_per_s": round(files / m.wall, 1),
        "mb_per_s": round(size / 1e6 / m.wall, 1),
        "cpu_s": round(m.cpu, 3),
        "peak_rss_mib": round(m.maxrss_mb, 1),
        "other_load_cores": round(m.other_cpu / m.wall, 2) if m.wall else None,
    }


def _throughput(images: int, reps: int, keep: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = dataset_spec(split_versions(images, 6))
    options = CdnOptions(seed=1)
    ours, theirs = [], []
    with WorkDir(keep) as wd, Server(spec, wd, args=cdn_flags(options)) as server:
        cdn_url = cdn_url_of(server)
        urls = media_urls(spec, cdn_url, options)
        (wd / "urls.txt").write_text("\n".join(urls) + "\n")
        for rep in range(reps):
            config = _config(wd, server, cdn_url, f"out{rep}")
            run_harvest_to(config)
            m, media = _media(config)
            ours.append(_record(m, media["done"], media["bytes"]))
            b = run_script(
                "media_baseline.py",
                [str(wd / "urls.txt"), str(wd / f"base{rep}"), "--concurrency", str(CONCURRENCY)],
                timeout=1800,
            )
            theirs.append(_record(b, b.extra["files"], b.extra["bytes"]))
            log(
                f"  [9] rep {rep + 1}/{reps}: harvest media {_brief(ours[-1])}; baseline {_brief(theirs[-1])}"
            )
    return ours, theirs


def _brief(rec: dict[str, Any]) -> str:
    return f"{rec['files']} files, {rec['mb_per_s']} MB/s, {rec['files_per_s']} files/s"


def run_harvest_to(config: Path) -> None:
    """The metadata harvest into the config's own output dir (media off)."""
    m = run_measured([HARVEST, "run", str(config), "-q"], timeout=1800)
    if m.code != 0:
        raise RuntimeError(f"harvest run exited {m.code}: {m.stderr[-3000:]}")


def _video_rss(videos: int, video_mb: float | None, keep: bool) -> dict[str, Any]:
    spec = dataset_spec(split_versions(videos, 1)) | {"type_weights": [0, 100, 0]}
    options = CdnOptions(seed=2, video_mb=video_mb, gone_rate=0.0, cache_miss_rate=0.0)
    with WorkDir(keep) as wd, Server(spec, wd, args=cdn_flags(options)) as server:
        config = _config(wd, server, cdn_url_of(server), "out", types=["video"])
        run_harvest_to(config)
        m, media = _media(config)
    return _record(m, media["done"], media["bytes"])


def scenario_media(images: int, big_videos: int, reps: int, keep: bool) -> dict[str, Any]:
    ours, theirs = _throughput(images, reps, keep)
    small = _video_rss(big_videos, None, keep)
    big = _video_rss(big_videos, 100.0, keep)
    log(f"  [9] peak RSS: {small['peak_rss_mib']} MiB (~2.5 MB videos), {big['peak_rss_mib']} MiB (100 MB)")
    mbps = statistics.median(r["mb_per_s"] for r in ours)
    base_mbps = statistics.median(r["mb_per_s"] for r in theirs)
    growth = big["peak_rss_mib"] - small["peak_rss_mib"]
    figures = {
        "media_files": ours[-1]["files"],
        "media_bytes": ours[-1]["bytes"],
        "media_files_per_s": statistics.median(r["files_per_s"] for r in ours),
        "media_mb_per_s": mbps,
        "media_cpu_s": statistics.median(r["cpu_s"] for r in ours),
        "media_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ours),
        "baseline_files_per_s": statistics.median(r["files_per_s"] for r in theirs),
        "baseline_mb_per_s": base_mbps,
        "baseline_cpu_s": statistics.median(r["cpu_s"] for r in theirs),
        "media_vs_baseline": mbps / base_mbps,
        "big_videos": big["files"],
        "big_video_mb_per_s": big["mb_per_s"],
        "peak_rss_small_videos_mib": small["peak_rss_mib"],
        "peak_rss_100mb_videos_mib": big["peak_rss_mib"],
        "peak_rss_growth_mib": round(growth, 1),
    }
    targets = [
        _target(
            "harvest media MB/s >= 0.8x a hand-written aiohttp downloader (which neither hashes, fsyncs "
            "nor records)",
            f"{mbps:.1f} MB/s vs {base_mbps:.1f} MB/s ({mbps / base_mbps:.2f}x)",
            mbps >= 0.8 * base_mbps,
        ),
        _target(
            f"peak RSS flat while fetching 100 MB videos (<= +{RSS_GROWTH_MIB:.0f} MiB)",
            f"{big['peak_rss_mib']:.0f} MiB vs {small['peak_rss_mib']:.0f} MiB ({growth:+.1f})",
            growth <= RSS_GROWTH_MIB,
        ),
    ]
    return {
        "figures": figures,
        "runs": ours,
        "baseline": theirs,
        "videos": {"small": small, "big": big},
        "targets": targets,
        "other_load_cores": statistics.median(r["other_load_cores"] for r in ours),
    }
