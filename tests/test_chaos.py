"""Chaos (issue #3): the real `harvest` CLI against a fake API that fails in every way the
real one does. Every expected image exactly once, and never a request inside a cooldown.

Times come from the server's request log (`mono`: when a request arrived, on the same
system-wide monotonic clock the harvester paces by), never from sleeping in the test.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import orjson

from conftest import HARVEST, Result, expected_ids, harvest, ids_of, make_dataset, read_items, write_config
from crawler.testing.fakeapi import (
    FAULT_KINDS,
    FaultInjector,
    FaultSpec,
    ImageQuery,
    RateLimit,
    RequestRecord,
    ServerOptions,
    ServerThread,
)

MODEL = {"modelId": 500, "sort": "Newest", "browsingLevel": 31}
VERSIONS = [5001, 5002, 5003]
API_PATHS = ("/api/v1/images", "/api/v1/models/")


def api_requests(log: Iterable[RequestRecord]) -> list[RequestRecord]:
    return sorted((r for r in log if r.path.startswith(API_PATHS)), key=lambda r: r.mono)


def cooldown_violations(records: Sequence[RequestRecord], pauses: dict[str, float]) -> list[str]:
    """Requests that arrived after a rate-limited answer but before its pause was over.

    `pauses` maps a fault kind to the pause it demands: its Retry-After, or for a bare 429
    the capped backoff's nominal delay. No grace: a request sent in the pause is early.
    """
    early = []
    for answer in records:
        pause = pauses.get(answer.fault or "")
        if pause is None:
            continue
        for later in records:
            if answer.mono < later.mono < answer.mono + pause:
                early.append(
                    f"{later.path}?{later.query} arrived {later.mono - answer.mono:.3f} s after "
                    f"a {answer.status} ({answer.fault}) that asked for {pause} s"
                )
    return early


def assert_exactly(out: Path, expected: set[int]) -> None:
    ids = ids_of(read_items(out))
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    assert not repeated, f"written more than once: {repeated[:10]}"
    assert set(ids) == expected, f"missing {len(expected - set(ids))}, foreign {len(set(ids) - expected)}"


# ---------------------------------------------------------------- (a) every kind of fault

SCRIPT = (  # the kinds that pause everyone spread out among the others
    "503",
    "challenge",
    "502",
    "reset",
    "429",
    "504",
    "truncated",
    "slow",
    "429_retry_after",
    "524",
    "500",
    "challenge_403",
)


def test_faults_of_every_kind_lose_and_repeat_nothing(tmp_path: Path) -> None:
    kinds = [k for k in FAULT_KINDS if k != "451"]
    assert sorted(SCRIPT) == sorted(kinds)
    spec = FaultSpec(
        seed=11,
        # 11.9% of answers; fewer of the kinds that pause everyone, to keep the test short.
        rates=tuple((k, 0.005 if k in ("slow", "503", "429", "429_retry_after") else 0.011) for k in kinds),
        retry_after=1,
        slow_seconds=1.5,
    )
    injector = FaultInjector(spec)
    dataset = make_dataset()
    with ServerThread(dataset, injector) as api:
        cfg = write_config(
            tmp_path / "c.toml",
            api.base_url,
            [{**MODEL, "limit": 20}],
            requests_per_second=40,
            concurrency=4,
            timeout=1,
            max_backoff=0.2,
            max_retries=30,
        )
        # Once every shard is walking, every kind at least once, whatever the draws.
        result = harvest_meanwhile(cfg, lambda: _ok_pages(api.log) >= 3, lambda: injector.queue(*SCRIPT))
        records = api_requests(api.log)
    assert result.code == 0, result.stderr
    assert_exactly(tmp_path / "out", expected_ids(dataset, VERSIONS))
    seen = Counter(r.fault for r in records)
    assert set(kinds) <= set(seen), f"kinds never injected: {set(kinds) - set(seen)}"
    assert sum(n for k, n in seen.items() if k) >= 0.1 * len(records)
    pauses = {"503": 1.0, "429_retry_after": 1.0, "429": 0.2}  # bare 429: the backoff, capped at 0.2 s
    assert not cooldown_violations(records, pauses)


# ---------------------------------------------------------------- (b) a strict edge rate limit


def test_strict_rate_limit_is_obeyed_and_the_rate_comes_down(tmp_path: Path) -> None:
    dataset = make_dataset({5001: 150, 5002: 100, 5003: 60})
    limit = RateLimit(rate=5, burst=1, mode="503", retry_after=1)
    with ServerThread(dataset, options=ServerOptions(rate_limit=limit)) as api:
        cfg = write_config(
            tmp_path / "c.toml",
            api.base_url,
            [{**MODEL, "limit": 10}],
            requests_per_second=8,
            concurrency=4,
            max_backoff=0.5,
            max_retries=10,
        )
        result = harvest("run", cfg)
        records = api_requests(api.log)
    assert result.code == 0, result.stderr
    assert_exactly(tmp_path / "out", expected_ids(dataset, VERSIONS))
    assert not cooldown_violations(records, {"rate_limit": 1.0})
    limited = [r.status == 503 for r in records]
    second_half = limited[len(limited) // 2 :]
    assert sum(limited) <= 6, f"{sum(limited)} rate-limited answers in {len(limited)} requests"
    assert sum(second_half) <= 0.1 * len(second_half), "AIMD did not bring the rate down"
    assert "pacing requests at 4/s" in result.stderr


# ---------------------------------------------------------------- (c) a blocked region


def test_blocked_region_stops_the_run_with_one_line(tmp_path: Path) -> None:
    dataset = make_dataset()
    with ServerThread(dataset, FaultSpec.only("451")) as api:
        query = {"modelVersionId": VERSIONS, "browsingLevel": 31}
        result = harvest("run", write_config(tmp_path / "c.toml", api.base_url, [query]))
        records = api_requests(api.log)
    assert result.code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("harvest: error:")]
    assert len(errors) == 1 and "blocked in this region" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert records and all(r.status == 451 for r in records)
    urls = Counter(tuple(sorted(r.query.items())) for r in records)
    assert max(urls.values()) == 1, "a 451 was retried"


def test_a_region_blocked_mid_run_exits_1_and_last_run_keeps_what_was_done(tmp_path: Path) -> None:
    dataset = make_dataset()
    injector = FaultInjector()
    with ServerThread(dataset, injector) as api:
        query = {"modelVersionId": VERSIONS, "browsingLevel": 31, "limit": 20}
        cfg = write_config(tmp_path / "c.toml", api.base_url, [query], requests_per_second=40)
        result = harvest_meanwhile(cfg, lambda: _ok_pages(api.log) >= 4, lambda: injector.queue("451"))
        served = _ok_pages(api.log)
    assert result.code == 1, result.stderr
    assert "blocked in this region" in result.stderr.strip().splitlines()[-1]
    summary = orjson.loads((tmp_path / "out" / "last-run.json").read_bytes())
    assert summary["exit_code"] == 1 and summary["ok"] is False
    written = ids_of(read_items(tmp_path / "out"))
    assert summary["new_items"] == len(written) > 0  # what was committed before the 451, all of it
    assert 0 < summary["pages"] <= served and summary["requests"] > summary["pages"]


# ---------------------------------------------------------------- (d) a spent retry budget


def test_spent_retries_fail_the_shard_keep_its_checkpoint_and_a_rerun_completes(tmp_path: Path) -> None:
    dataset = make_dataset({5001: 230, 5002: 170, 5003: 5})
    assert len(dataset.select(ImageQuery(model_version_id=5003))) < 40  # 5003 is a single page
    injector = FaultInjector()
    with ServerThread(dataset, injector) as api:
        query = {"modelVersionId": VERSIONS, "browsingLevel": 31, "limit": 40}
        cfg = write_config(tmp_path / "c.toml", api.base_url, [query], requests_per_second=15, max_retries=1)
        first_run = harvest_meanwhile(
            cfg,
            lambda: _ok_pages(api.log, "5003") >= 1 and _ok_pages(api.log) >= 4,
            lambda: setattr(injector, "spec", FaultSpec.only("500")),  # from here on, every answer is a 500
        )
        first = api_requests(api.log)
        written = ids_of(read_items(tmp_path / "out"))
        injector.spec = FaultSpec()
        api.log.clear()
        again = harvest("run", cfg)
        rerun = api_requests(api.log)
    assert first_run.code == 3, first_run.stderr
    failed = [line for line in first_run.stderr.splitlines() if line.startswith("harvest: failed:")]
    assert len(failed) == 2 and all("gave up after 2 attempts; last: HTTP 500" in line for line in failed)
    assert not any("modelVersionId=5003" in line for line in failed)
    tries = Counter(tuple(sorted(r.query.items())) for r in first if r.status == 500)
    assert set(tries.values()) == {2}, "the budget was 1 retry: 2 attempts per request"
    # The checkpoint kept every committed page: 5003 whole, 5001 and 5002 in part, nothing twice.
    assert len(written) == len(set(written))
    assert expected_ids(dataset, [5003]) <= set(written) < expected_ids(dataset, VERSIONS)
    assert len(set(written) - expected_ids(dataset, [5003])) >= 20
    assert again.code == 0, again.stderr
    assert_exactly(tmp_path / "out", expected_ids(dataset, VERSIONS))
    firsts = {r.query["modelVersionId"]: r.query for r in reversed(rerun)}
    assert set(firsts) == {"5001", "5002"}, "a finished shard was walked again"
    assert all("cursor" in q for q in firsts.values()), "the rerun did not resume from the checkpoint"


def _ok_pages(log: Iterable[RequestRecord], version: str | None = None) -> int:
    return sum(
        1
        for r in log
        if r.path == "/api/v1/images" and r.status == 200 and version in (None, r.query.get("modelVersionId"))
    )


def harvest_meanwhile(cfg: Path, until: Callable[[], bool], then: Callable[[], object]) -> Result:
    """`harvest run cfg` as `harvest()` runs it; once `until()` holds, `then()` changes the server."""
    env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    proc = subprocess.Popen(
        [HARVEST, "run", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not until():
            assert proc.poll() is None, "the harvest ended before the moment came"
            assert time.monotonic() < deadline, "the harvest never got there"
            time.sleep(0.002)
        then()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Result(proc.returncode, out, err)


# ---------------------------------------------------------------- (f) a 400 names the parameter


def test_a_stored_cursor_the_api_refuses_is_walked_again_from_the_head(tmp_path: Path) -> None:
    """A 400 about the cursor is not a bad config: the shard starts again from its head (issue 10)."""
    dataset = make_dataset()
    injector = FaultInjector(FaultSpec.only("500"))
    with ServerThread(dataset, injector) as api:
        query = {"modelVersionId": VERSIONS, "browsingLevel": 31}
        cfg = write_config(tmp_path / "c.toml", api.base_url, [query], max_retries=0)
        assert harvest("run", cfg).code == 3  # every shard failed on its first page
        # A stored cursor the API no longer accepts (say, from before a format change):
        with sqlite3.connect(tmp_path / "out" / "harvest.sqlite") as db:
            changed = db.execute(
                "UPDATE shards SET cursor=? WHERE key LIKE ?", ('"bogus|0"', "%modelVersionId=5001%")
            ).rowcount
        assert changed == 1
        injector.spec = FaultSpec()
        api.log.clear()
        result = harvest("run", cfg)
        records = api_requests(api.log)
    assert result.code == 0, result.stderr
    restarted = [line for line in result.stderr.splitlines() if "walking it again from the head" in line]
    assert len(restarted) == 1 and "modelVersionId=5001" in restarted[0], result.stderr
    assert "HTTP 400 bad request: cursor: Invalid cursor" in restarted[0]
    assert [r.status for r in records if r.query.get("cursor") == "bogus|0"] == [400], "a 400 was retried"
    assert_exactly(tmp_path / "out", expected_ids(dataset, VERSIONS))
