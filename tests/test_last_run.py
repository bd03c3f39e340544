"""`last-run.json` on every exit of `harvest run` (README, "Each run writes its summary"):
what the run did so far and how it ended, `exit_code` and `ok`. Real CLI, fake API.

Signals (130, 143) are covered with the other graceful stops in test_crash_resume.py,
a disk that fills mid-run in test_output.py, a region blocked mid-run in test_chaos.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from conftest import harvest, make_dataset, read_items, write_config
from crawler.archive.lock import OutputLock
from crawler.testing.fakeapi import FakeServer, ServerThread

SUMMARY = "last-run.json"
KEY = "sk-test-wrong-0123456789"


def last_run(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = orjson.loads((out / SUMMARY).read_bytes())
    return summary


def test_a_rejected_key_exits_1_and_says_so_in_last_run(tmp_path: Path) -> None:
    with ServerThread(make_dataset(), api_key="sk-test-the-right-one") as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, [{"modelVersionId": 5001, "browsingLevel": 31}])
        result = harvest("run", cfg, env={"CIVITAI_API_KEY": KEY})
        statuses = [r.status for r in api.log.for_path("/api/v1/images")]
    assert result.code == 1, result.stderr
    assert "was rejected" in result.stderr.strip().splitlines()[-1]
    summary = last_run(tmp_path / "out")
    assert summary["exit_code"] == 1 and summary["ok"] is False
    assert summary["requests"] == len(statuses) == 1 and statuses == [401]
    assert summary["new_items"] == summary["pages"] == summary["shards_done"] == 0
    assert summary["elapsed_seconds"] > 0
    assert KEY not in (tmp_path / "out" / SUMMARY).read_text()


def test_failed_shards_exit_3_and_the_summary_is_not_ok(tmp_path: Path, api: FakeServer) -> None:
    queries = [{"name": "ghost", "modelId": 999999}, {"name": "real", "modelVersionId": 5003}]
    cfg = write_config(tmp_path / "c.toml", api.base_url, queries)
    result = harvest("run", cfg)
    assert result.code == 3, result.stderr
    summary = last_run(tmp_path / "out")
    assert summary["exit_code"] == 3 and summary["ok"] is False
    assert summary["new_items"] == len(read_items(tmp_path / "out")) > 0
    assert len(summary["failures"]) == 1 and "ghost" in summary["failures"][0]


def test_a_finished_run_is_ok_with_exit_code_0(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [{"modelVersionId": 5003, "browsingLevel": 31}])
    assert harvest("run", cfg).code == 0
    summary = last_run(tmp_path / "out")
    assert summary["exit_code"] == 0 and summary["ok"] is True
    assert summary["new_items"] == len(read_items(tmp_path / "out")) > 0


def test_a_locked_output_dir_leaves_the_other_runs_summary_alone(tmp_path: Path, api: FakeServer) -> None:
    """Exit 4: the output dir belongs to the run holding the lock, its summary too."""
    cfg = write_config(tmp_path / "c.toml", api.base_url, [{"modelVersionId": 5003, "browsingLevel": 31}])
    assert harvest("run", cfg).code == 0
    before = (tmp_path / "out" / SUMMARY).read_bytes()
    lock = OutputLock(tmp_path / "out")
    try:
        assert harvest("run", cfg).code == 4
    finally:
        lock.release()
    assert (tmp_path / "out" / SUMMARY).read_bytes() == before


def test_a_summary_that_cannot_be_written(tmp_path: Path, api: FakeServer) -> None:
    """A finished run that cannot record itself fails (1); a failing one keeps its own error."""
    query = {"modelVersionId": 5003, "browsingLevel": 31}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last-run.tmp").mkdir()  # where the summary is written before its rename
    finished = harvest("run", write_config(tmp_path / "c.toml", api.base_url, [query]))
    assert finished.code == 1, finished.stderr
    error = finished.stderr.strip().splitlines()[-1]
    assert error.startswith("harvest: error: ") and "cannot write the run summary" in error
    with ServerThread(make_dataset(), api_key="sk-test-the-right-one") as keyed:
        cfg = write_config(tmp_path / "c.toml", keyed.base_url, [query])
        rejected = harvest("run", cfg, env={"CIVITAI_API_KEY": KEY})
    assert rejected.code == 1, rejected.stderr
    *before, error = rejected.stderr.strip().splitlines()
    assert "was rejected" in error  # the run's own error is what is reported, last
    assert any(" WARNING " in line and "cannot write the run summary" in line for line in before)
    assert not (tmp_path / "out" / SUMMARY).exists()
