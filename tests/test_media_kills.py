"""Media through kill -9 at any instant: mid-file, between rename and record, at random points."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import HARVEST, harvest, read_items
from crawler.errors import ExitCode
from crawler.testing.fakeapi import FakeServer, ServerOptions
from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdnfiles import CdnOptions
from test_media import assert_complete, media_config, media_dataset, media_rows


def _start(*args: str | Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    return subprocess.Popen(
        [HARVEST, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )


def _kill(proc: subprocess.Popen[bytes]) -> float:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return time.monotonic()


def _wait_for_size(path: Path, size: int) -> None:
    deadline = time.monotonic() + 60
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} never held {size} bytes"
        time.sleep(0.01)


def _biggest_video(api: FakeServer, out: Path) -> tuple[dict[str, Any], int]:
    assert api.cdn is not None
    files = api.cdn.files
    videos = [i for i in read_items(out) if i["type"] == "video" and not files.gone(i["url"].split("/")[4])]
    item = max(videos, key=lambda i: files.for_item(i).size)
    return item, files.for_item(item).size


def test_kill_mid_file_resumes_with_range(tmp_path: Path) -> None:
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        assert api.cdn is not None
        config = media_config(tmp_path / "c.toml", api, download=False)
        assert harvest("run", config).code == ExitCode.OK
        item, size = _biggest_video(api, tmp_path / "out")
        uuid = str(item["url"]).split("/")[4]
        api.cdn.transfers.hold(uuid, size // 2)
        proc = _start("media", config)
        assert api.cdn.transfers.wait_paused(uuid, timeout=60)
        folder = tmp_path / "out" / "media" / f"{item['id'] // 1_000_000:03d}/{item['id'] // 1000 % 1000:03d}"
        part = folder / f"{item['id']}.part"
        _wait_for_size(part, size // 4)  # some of what was sent has reached the disk
        _kill(proc)
        held = part.stat().st_size  # what the killed run left
        api.cdn.transfers.release(uuid)
        api.cdn.log.clear()
        result = harvest("media", config)
        assert result.code == ExitCode.OK, result.stderr
        assert_complete(api, tmp_path / "out")
        # One whole answer since the kill: the rest of the file (the killed body may log its end late).
        (resumed,) = [r for r in api.cdn.log.for_uuid(uuid) if r.complete]
        assert 0 < held < size and resumed.header("Range") == f"bytes={held}-"
        assert resumed.status == 206 and resumed.sent == size - held


def test_kill_between_rename_and_record_or_after_the_last_byte(tmp_path: Path) -> None:
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        assert api.cdn is not None
        config = media_config(tmp_path / "c.toml", api)
        assert harvest("run", config).code == ExitCode.OK
        out, media = tmp_path / "out", tmp_path / "out" / "media"
        done = [r for r in media_rows(out).values() if r["status"] == "done"]
        renamed, whole = done[0], done[1]
        # What a kill leaves: a file renamed but not recorded; a .part holding every byte.
        part = media / Path(whole["path"]).parent / f"{whole['id']}.part"
        (media / whole["path"]).rename(part)
        with sqlite3.connect(out / "harvest.sqlite") as conn:
            conn.execute(
                "UPDATE media SET status='fetching' WHERE id IN (?, ?)", (renamed["id"], whole["id"])
            )
        api.cdn.log.clear()
        result = harvest("media", config)
        assert result.code == ExitCode.OK, result.stderr
        assert api.cdn.log.for_uuid(renamed["url"].split("/")[4]) == []  # found on disk, not fetched
        asked = api.cdn.log.for_uuid(whole["url"].split("/")[4])
        assert [(r.status, r.header("Range")) for r in asked] == [(416, f"bytes={whole['size']}-")]
        assert not part.exists()
        assert_complete(api, out)
        rows = media_rows(out)
        assert rows[renamed["id"]]["sha256"] == renamed["sha256"]
        assert rows[whole["id"]]["sha256"] == whole["sha256"]


def test_kill9_at_random_instants_loses_nothing_and_fetches_nothing_twice(tmp_path: Path) -> None:
    rng = random.Random(12)
    options = ServerOptions(cdn=CdnOptions(seed=6, throttle=3e6))
    with ServerThread(media_dataset(), options=options) as api:
        assert api.cdn is not None
        config = media_config(tmp_path / "c.toml", api)
        kills: list[float] = []
        for _ in range(3):
            proc = _start("run", config)
            target = len(api.cdn.log) + rng.randint(3, 25)
            while len(api.cdn.log) < target and proc.poll() is None:
                time.sleep(0.01)  # polling the fake's log for the instant to kill at; nothing is timed
            kills.append(_kill(proc))
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        out = tmp_path / "out"
        assert_complete(api, out)
        assert harvest("verify", config).code == ExitCode.OK
        # No file was served whole twice, unless a kill cut the first time short.
        cut = [r for r in api.cdn.log if any(r.mono <= k <= r.answered + 0.5 for k in kills)]
        whole = Counter(r.uuid for r in api.cdn.log if r.status == 200 and r.complete and not r.fault)
        twice = {u for u, n in whole.items() if n > 1} - {r.uuid for r in cut}
        assert not twice
