"""Issue #4: text or JSON log lines, -q, progress lines off a terminal, the live display on one."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from conftest import harvest, make_dataset, read_items, write_config
from crawler.cli import app as cli
from crawler.cli import logs
from crawler.cli.progress import LiveProgress, LogProgress, shorten_keys
from crawler.crawl.watch import MediaTally, ShardView
from crawler.http.gate import Counters
from crawler.testing.fakeapi import FakeServer, ServerThread

MODEL = {"modelId": 500, "sort": "Newest", "browsingLevel": 31}
KEY = "sk-test-0123456789abcdef"
PROGRESS = re.compile(
    r"progress: (\d+)/(\d+) shards done(?:, \d+ failed)?; (\d+) new images in (\d+) pages, "
    r"[\d.]+ images/s; (\d+) requests, (\d+) retries, (\d+) rate-limited; \d+:\d\d:\d\d elapsed"
)
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def json_records(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line, parsed: fails on any line that is not one JSON object."""
    records = [orjson.loads(line) for line in stderr.splitlines()]
    assert records, "nothing was logged"
    for record in records:
        assert isinstance(record, dict)
        assert {"ts", "level", "msg"} <= record.keys(), record
        assert datetime.fromisoformat(record["ts"]).utcoffset() == UTC.utcoffset(None)
    return records


def slow_config(tmp_path: Path, api: FakeServer) -> Path:
    """Two versions, ~380 images at 20 a page and 20 requests a second: a run of a second or so."""
    return write_config(tmp_path / "c.toml", api.base_url, [{**MODEL, "limit": 20}], requests_per_second=20)


@pytest.fixture
def slow_api() -> Iterator[FakeServer]:
    with ServerThread(make_dataset({5001: 230, 5002: 170})) as server:
        yield server


# -- through the real CLI ----------------------------------------------------------------


def test_json_logs_are_json_lines_only_and_keep_the_summary(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [{**MODEL, "limit": 40}])
    result = harvest("run", cfg, "--log-format", "json", env={"CIVITAI_API_KEY": KEY})
    assert result.code == 0, result.stderr
    records = json_records(result.stderr)
    assert KEY not in result.stderr
    assert any(r["level"] == "INFO" and r["msg"].startswith("shard ") for r in records)
    (summary,) = [r for r in records if r.get("event") == "summary"]
    written = len(read_items(tmp_path / "out"))
    assert summary["level"] == "INFO" and f"{written} new images" in summary["msg"]
    assert summary["new_items"] == written and summary["shards_done"] == summary["shards"] >= 3
    assert summary["requests"] >= summary["pages"] > 0 and summary["ok"] is True
    assert summary["output_dir"] == str(tmp_path / "out")


def test_json_logs_turn_error_lines_into_records(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "http://127.0.0.1:9/api/v1", [{**MODEL, "sort": "newest"}])
    result = harvest("run", cfg, "--log-format", "json")
    assert result.code == 2
    (record,) = json_records(result.stderr)
    assert record["level"] == "ERROR" and record["msg"].startswith("harvest: error: ")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_progress_lines_off_a_terminal(tmp_path: Path, slow_api: FakeServer, log_format: str) -> None:
    cfg = slow_config(tmp_path, slow_api)
    result = harvest("run", cfg, "--progress-every", "0.05", "--log-format", log_format)
    assert result.code == 0, result.stderr
    written = len(read_items(tmp_path / "out"))
    if log_format == "json":
        records = [r for r in json_records(result.stderr) if r.get("event") == "progress"]
        assert records and all(r["level"] == "INFO" and PROGRESS.search(r["msg"]) for r in records)
        last = records[-1]
        assert last["shards"] >= 2 and 0 <= last["shards_done"] <= last["shards"]  # + other ends
        assert 0 <= last["new_items"] <= written and last["requests"] >= last["pages"]
        assert {"items_per_second", "retries", "rate_limited", "elapsed_seconds"} <= last.keys()
        return
    lines = [line for line in result.stderr.splitlines() if " INFO progress: " in line]
    assert lines, result.stderr
    figures = [tuple(map(int, m.groups())) for m in map(PROGRESS.search, lines) if m]
    assert len(figures) == len(lines), lines
    for earlier, later in zip(figures, figures[1:], strict=False):
        assert all(b >= a for a, b in zip(earlier, later, strict=True))  # totals only grow
    done, shards, new, pages, requests, _, _ = figures[-1]
    assert shards >= 2 and done <= shards and new <= written and 0 < pages <= requests  # + other ends


def test_quiet_prints_no_info_lines(tmp_path: Path, slow_api: FakeServer) -> None:
    result = harvest("run", slow_config(tmp_path, slow_api), "-q", "--progress-every", "0.05")
    assert result.code == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if TEXT_LINE.match(line)], result.stderr
    assert "progress:" not in result.stderr
    (summary,) = result.stderr.splitlines()
    assert summary.startswith(f"harvest: {len(read_items(tmp_path / 'out'))} new images")


def test_progress_every_zero_and_bad_values(tmp_path: Path, slow_api: FakeServer) -> None:
    result = harvest("run", slow_config(tmp_path, slow_api), "--progress-every", "0")
    assert result.code == 0 and "progress:" not in result.stderr
    bad = harvest("run", tmp_path / "c.toml", "--progress-every", "-1")
    assert bad.code == 2 and "--progress-every" in bad.stderr


def test_demo_takes_the_log_flags(tmp_path: Path) -> None:
    result = harvest("demo", "--dir", tmp_path / "demo", "--log-format", "json", "--progress-every", "0")
    assert result.code == 0, result.stderr
    records = json_records(result.stderr)
    assert any(r["msg"].startswith("demo: ") for r in records)
    assert [r for r in records if r.get("event") == "summary"]


# -- the CLI's logging set-up, in process -----------------------------------------------------


@pytest.fixture
def cli_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A buffer to be stderr; the harvest logger and sys.stderr restored afterwards.

    The test body puts the buffer in place: pytest sets its own stderr capture between fixture and test.
    """
    logger = logging.getLogger("harvest")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after the test, whatever it set
    yield buffer
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_key_never_appears_in_either_format(cli_logging: io.StringIO, log_format: str) -> None:
    sys.stderr = cli_logging
    args = cli.build_parser().parse_args(["run", "x.toml", "--log-format", log_format])
    cli.setup_logging(cli.log_options(args), KEY)
    log = logging.getLogger("harvest")
    log.warning("rejected %s", KEY, extra={"detail": {"header": f"Bearer {KEY}"}})
    try:
        raise ValueError(f"token {KEY}")
    except ValueError:
        log.error("boom", exc_info=True)
    if log_format == "json":  # the CLI's own lines become records, redacted like the rest
        print(f"harvest: error: {KEY}", file=sys.stderr)
    text = cli_logging.getvalue()
    assert KEY not in text and text.count("[redacted]") >= (4 if log_format == "json" else 2)
    if log_format == "json":
        records = json_records(text)
        assert [r["level"] for r in records] == ["WARNING", "ERROR", "ERROR"]
        assert records[0]["detail"] == {"header": "Bearer [redacted]"} and "exc" in records[1]
    else:
        assert text.splitlines()[0].endswith("WARNING rejected [redacted]")


def test_json_lines_survive_lone_surrogates(cli_logging: io.StringIO) -> None:
    """A file name that is not UTF-8 (surrogate-escaped) is logged with U+FFFD, not a traceback."""
    sys.stderr = cli_logging
    args = cli.build_parser().parse_args(["run", "x.toml", "--log-format", "json"])
    cli.setup_logging(cli.log_options(args), KEY)
    logging.getLogger("harvest").warning("cannot read %s", "seg\udcff.ndjson", extra={"path": "\udcff"})
    (record,) = json_records(cli_logging.getvalue())
    assert record["msg"] == "cannot read seg\ufffd.ndjson" and record["path"] == "\ufffd"


def test_the_watcher_follows_the_flags(cli_logging: io.StringIO) -> None:
    sys.stderr = cli_logging

    def options(*argv: str) -> logs.LogOptions:
        return cli.log_options(cli.build_parser().parse_args(["run", "x.toml", *argv]))

    def watcher(*argv: str) -> object:
        chosen = options(*argv)
        return logs.new_progress(chosen, cli.setup_logging(chosen, None))

    assert type(watcher()).__name__ == "LogProgress"  # stderr is no terminal here
    assert watcher("--progress-every", "5").every == 5  # type: ignore[attr-defined]
    assert type(watcher("-q")).__name__ == "NoProgress"
    assert type(watcher("--progress-every", "0")).__name__ == "NoProgress"
    assert options("--progress-every", "0").progress_every == 0
    assert options().progress_every == logs.DEFAULT_PROGRESS_EVERY  # a new parse starts afresh


# -- the watchers, driven directly --------------------------------------------------------------

K1 = "browsingLevel=31&modelVersionId=5001&sort=Newest"
K2 = "browsingLevel=31&modelVersionId=5002&sort=Newest"
K3 = "browsingLevel=31&modelVersionId=5003&sort=Newest"
SHARDS = [
    ShardView(K1, "model-500", "pending", 0, 0),
    ShardView(K2, "model-500", "active", 40, 2),
    ShardView(K3, "model-500", "done", 90, 5),
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_live_display_shows_every_shard_and_the_totals() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150, height=40, color_system=None)
    clock = Clock()
    route = logs.StderrHandler(io.StringIO())
    route.setFormatter(logs.TextFormatter())
    progress = LiveProgress(console, route=route, clock=clock, redirect_stderr=False)
    counters = Counters(requests=9, retries=2, rate_limited=1)
    progress.start(SHARDS, counters)
    assert route.console is console  # log records print above the display, not into it
    for new in (20, 18, 7):
        clock.now += 1
        progress.page(K1, new, 20)
    progress.shard_done(K1)
    progress.shard_failed(K2, "HTTP 404: not found")
    route.handle(logging.LogRecord("harvest", logging.INFO, "", 0, "shard x done", None, None))
    clock.now = 1010.0
    progress.stop()
    assert route.console is None
    text = out.getvalue()
    final = text[text.rindex("QUERY") :]
    assert "shard x done" in text and not route.stream.getvalue()
    # Shards are told apart by what differs, not by the parameters they share.
    assert "modelVersionId=5001" in final and "browsingLevel=31&modelVersionId" not in final
    row = {m: next(line for line in final.splitlines() if m in line) for m in ("5001", "5002", "5003")}
    assert re.search(r"done\s+45\s+3\s+22\.5\s+45\b", row["5001"])  # status, new, pages, images/s, total
    assert re.search(r"failed\s+0\s+0\s+40\b", row["5002"])
    assert re.search(r"done\s+0\s+0\s+90\b", row["5003"])
    assert "2/3 shards done, 1 failed · 45 new images · 3 pages · 4.5 images/s" in final
    assert "9 requests · 2 retries · 1 rate-limited · 0:00:10 elapsed" in final
    assert "ETA" not in text  # nothing is known about how much is left


def test_live_display_keeps_to_its_rows() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    views = [ShardView(f"modelVersionId={i}", "q", "pending", 0, 0) for i in range(30)]
    progress = LiveProgress(console, max_rows=5, redirect_stderr=False)
    progress.start(views, Counters())
    progress.page("modelVersionId=17", 3, 3)
    progress.shard_done("modelVersionId=2")
    progress.stop()
    rendered = io.StringIO()
    Console(file=rendered, width=120, color_system=None).print(progress.render())
    text = rendered.getvalue()
    assert "modelVersionId=17 " in text and "… 26 more shards (25 waiting, 1 done)" in text


def test_log_progress_without_a_loop_ticks_on_the_clock(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test-progress")
    progress = LogProgress(every=10, clock=clock, logger=logger)
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress.start(SHARDS, Counters(requests=4))
        clock.now += 5
        progress.page(K1, 20, 20)
        assert not caplog.records
        clock.now += 6
        progress.page(K1, 10, 20)
        progress.stop()
    (record,) = caplog.records
    assert record.getMessage().startswith("progress: 1/3 shards done; 30 new images in 2 pages, 2.7 images/s")
    assert PROGRESS.search(record.getMessage())
    assert record.event == "progress" and record.new_items == 30 and record.requests == 4  # type: ignore[attr-defined]


def test_progress_lines_carry_the_media_stage(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test-progress")
    tally = MediaTally(started=clock.now, counters=Counters(requests=13, retries=1))
    for size in (3_000_000, 1_000_000):
        tally.file_done(size)
    tally.gone, tally.failed = 1, 1
    progress = LogProgress(every=10, clock=clock, logger=logger)
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress.start(SHARDS, Counters(requests=4))
        progress.media(tally)
        clock.now += 11
        progress.page(K1, 20, 20)
    (record,) = caplog.records
    text = record.getMessage()
    assert "; media: 2 files (0.2/s, 0.4 MB/s), 1 gone, 1 failed; 13 requests, 1 retries" in text
    assert record.media_done == 2 and record.media_bytes == 4_000_000  # type: ignore[attr-defined]
    alone = LogProgress(every=10, clock=clock, logger=logger)
    alone.start([], tally.counters)  # harvest media: no shards, only the media figures
    alone.media(tally)
    assert alone.line()[0].startswith("progress: media: 2 files")


async def test_log_progress_ticks_from_a_task_on_the_loop() -> None:
    progress = LogProgress(every=30)
    progress.start(SHARDS, Counters())
    task = progress._task
    assert task is not None and task.get_name() == "harvest-progress"
    progress.stop()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


def test_a_failing_watcher_never_raises_into_the_harvest(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(logging.Logger):
        def info(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("disk gone")

    clock = Clock()
    progress = LogProgress(every=1, clock=clock, logger=Broken("broken"))
    progress.start(SHARDS, Counters())
    clock.now += 2
    progress.page(K1, 1, 1)  # the tick raises inside: caught, reported once, then quiet
    progress.page(K1, 1, 1)
    progress.shard_done(K1)
    progress.stop()
    assert [r.getMessage() for r in caplog.records] == [
        "progress display failed; the harvest goes on without it"
    ]


def test_shard_keys_are_shortened_to_what_differs() -> None:
    long_key = "username=" + "x" * 80
    labels = shorten_keys([*SHARDS, ShardView("postId=7&sort=Most+Reactions", "posts", "pending", 0, 0)])
    labels |= shorten_keys([ShardView(long_key, "user", "pending", 0, 0)], width=20)
    assert labels[K1] == "modelVersionId=5001"
    assert labels["postId=7&sort=Most+Reactions"] == "postId=7&sort=Most Reactions"  # alone: whole key
    assert labels[long_key] == "username=xxxxxxxxxx…" and len(labels[long_key]) == 20


def test_a_shard_that_appears_during_the_run_is_counted() -> None:
    progress = LogProgress(every=0)
    progress.start(SHARDS, Counters())
    progress.page("browsingLevel=1&modelVersionId=5001&sort=Newest", 12, 20)  # a split shard's part
    progress.shard_done("browsingLevel=1&modelVersionId=5001&sort=Newest")
    totals = progress.totals()
    assert (totals.shards, totals.done, totals.new, totals.pages) == (4, 2, 12, 1)
