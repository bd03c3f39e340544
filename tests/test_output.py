"""Long pulls (issue #4): rotation, compression, verify, disk full; real CLI, fake API."""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from conftest import HARVEST, expected_ids, harvest, ids_of, make_dataset, write_config
from crawler.archive.compression import read_lines
from crawler.testing.fakeapi import Dataset, ServerThread

VERSIONS = {8001: 260, 8002: 200, 8003: 140}
QUERY = {"modelId": 500, "sort": "Newest", "browsingLevel": 31, "withMeta": True, "limit": 25}


def _all_ids(out: Path) -> list[int]:
    return [orjson.loads(line)["id"] for f in sorted(out.glob("images-*")) for line in read_lines(f)]


def _config(tmp_path: Path, api_url: str, out: str = "out", **output: object) -> Path:
    cfg = write_config(tmp_path / "c.toml", api_url, [QUERY], out=out)
    text = cfg.read_text().replace(
        f'dir = "{out}"',
        f'dir = "{out}"\n' + "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in output.items()),
    )
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize(
    "codec,suffix", [("zstd", ".ndjson.zst"), ("gzip", ".ndjson.gz"), ("none", ".ndjson")]
)
def test_segments_rotate_and_closed_ones_are_compressed(tmp_path: Path, codec: str, suffix: str) -> None:
    dataset = make_dataset(VERSIONS)
    with ServerThread(dataset) as api:
        # 569 images in pages of at most 25: three closed segments of 150..174 hold 450..522, a
        # fourth never closes, so an active segment is left whatever order the pages are committed in.
        cfg = _config(tmp_path, api.base_url, segment_items=150, compress=codec)
        assert harvest("run", cfg).code == 0
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("images-*"))
    assert len(files) >= 4
    assert all(name.endswith(suffix) for name in files[:-1])  # closed segments
    assert files[-1].endswith(".ndjson")  # the active one stays plain
    ids = _all_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, list(VERSIONS))
    check = harvest("verify", cfg)
    assert check.code == 0 and "sound" in check.stdout


def test_verify_finds_duplicates_and_torn_lines(tmp_path: Path) -> None:
    dataset = make_dataset(VERSIONS)
    with ServerThread(dataset) as api:
        cfg = _config(tmp_path, api.base_url)
        assert harvest("run", cfg).code == 0
        segment = tmp_path / "out" / "images-000001.ndjson"
        committed = segment.read_bytes()
        first = committed.splitlines(keepends=True)[0]
        # Past the committed length: a page appended, the same image again, then a torn line.
        segment.write_bytes(committed + first + first[: len(first) // 2])
        tail = segment.read_bytes()
        assert not tail.endswith(b"\n") and tail.count(b"\n") == committed.count(b"\n") + 1  # torn
        noted = harvest("verify", cfg)
        assert noted.code == 0 and "uncommitted tail" in noted.stdout  # only a note: the next run cuts it
        assert harvest("run", cfg).code == 0  # the resume
    assert segment.read_bytes() == committed
    clean = harvest("verify", cfg)
    assert clean.code == 0 and "uncommitted tail" not in clean.stdout
    # Within the committed length: id 1 twice, and the last line cut, so the file keeps its length.
    segment.write_bytes(first + committed[: -len(first)])
    damaged = segment.read_bytes()
    assert len(damaged) == len(committed) and not damaged.endswith(b"\n")  # really a torn line
    bad = harvest("verify", cfg)
    assert bad.code == 1 and "NOT sound" in bad.stdout
    assert "appears twice" in bad.stdout and "torn line (no newline)" in bad.stdout


def _segment_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("images-*")) if out.exists() else 0


def _committed(cfg: Path) -> int:
    """Images the state has committed, as `harvest status` reports them."""
    status = harvest("status", cfg)
    assert status.code == 0, status.stderr
    return int(status.stdout.splitlines()[-1].split(" images in ")[0])


def test_kill_across_rotation_and_compression_is_exact(tmp_path: Path) -> None:
    """Eight SIGKILLs, each after the run's first write and before the harvest is complete.

    limit 10 at 10 requests/s: ~58 requests, so at least ~6 s of harvesting paced by the
    limiter, while each run is killed within ~0.4 s of its first request: the kills land
    mid-run on any machine (a slower one only harvests less per run).
    """
    dataset = make_dataset(VERSIONS)
    expected = expected_ids(dataset, list(VERSIONS))
    rng = random.Random(4)
    out = tmp_path / "out"
    with ServerThread(dataset) as api:
        cfg = _config(tmp_path, api.base_url, segment_items=60, compress="zstd")
        fast = cfg.read_text()
        slow = fast.replace("requests_per_second = 500", "requests_per_second = 10")
        slow = slow.replace("limit = 25", "limit = 10")
        assert slow.count(" = 10\n") == 2, slow
        cfg.write_text(slow)
        committed = 0
        for n in range(1, 9):
            before = _segment_bytes(out)
            proc = subprocess.Popen([HARVEST, "run", "-q", str(cfg)], stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while _segment_bytes(out) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)  # until this run has written
            time.sleep(rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL, f"kill {n}: the run had already exited {proc.returncode}"
            now = _committed(cfg)
            assert committed <= now < len(expected), f"kill {n}: {now} of {len(expected)} images committed"
            committed = now
        assert len(list(out.glob("images-*"))) >= 2, "the kills never spanned a rotation"
        cfg.write_text(fast)  # the rest at full speed
        assert harvest("run", cfg).code == 0
    ids = _all_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert harvest("verify", cfg).code == 0
    assert not list(out.glob("*.part"))
    assert list(out.glob("*.ndjson.zst"))


def _fill_then_resume(tmp_path: Path, dataset: Dataset, api_url: str, out: Path, **popen: object) -> None:
    cfg = _config(tmp_path, api_url, out=str(out))
    full = subprocess.run([HARVEST, "run", str(cfg)], capture_output=True, text=True, **popen)  # type: ignore[call-overload]
    assert full.returncode == 1, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("harvest: error:") and "Traceback" not in full.stderr
    assert "space" in last or "full" in last or "too large" in last
    assert harvest("verify", cfg).code == 0  # what was committed is intact
    kept = set(_all_ids(out))
    assert kept  # something was harvested before the disk filled


def test_disk_full_on_tmpfs_then_resume(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        dataset = make_dataset({8001: 900, 8002: 700})
        with ServerThread(dataset) as api:
            _fill_then_resume(tmp_path, dataset, api.base_url, disk / "out")
            subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
            cfg = _config(tmp_path, api.base_url, out=str(disk / "out"))
            again = harvest("run", cfg)
            assert again.code == 0, again.stderr
            ids = _all_ids(disk / "out")
            assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [8001, 8002])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_failing_write_then_resume(tmp_path: Path) -> None:
    """A file-size limit makes the kernel refuse writes past it (EFBIG), like a full disk."""
    dataset = make_dataset({8001: 900, 8002: 700})
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))

    with ServerThread(dataset) as api:
        _fill_then_resume(tmp_path, dataset, api.base_url, out, preexec_fn=limit)
        # The failed run still wrote its summary (a small file, under the limit): what it had
        # committed before the disk filled, and that it ended with exit 1.
        summary = orjson.loads((out / "last-run.json").read_bytes())
        assert summary["exit_code"] == 1 and summary["ok"] is False
        cfg = _config(tmp_path, api.base_url, out=str(out))
        status = harvest("status", cfg)
        committed = status.stdout.splitlines()[-1]  # "N images in M file(s) under ..."
        assert status.code == 0 and committed.startswith(f"{summary['new_items']} images in")
        assert summary["new_items"] > 0 and summary["pages"] > 0
        assert harvest("run", cfg).code == 0
    ids = ids_of([{"id": i} for i in _all_ids(out)])
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [8001, 8002])


def test_unwritable_output_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    cfg = _config(tmp_path, "http://127.0.0.1:9/api/v1", out="file/out")
    result = harvest("run", cfg)
    assert result.code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "file/out" in result.stderr
