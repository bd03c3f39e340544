"""`harvest refresh` (issue 13, part 3), through the real CLI against the fake API.

What the fake serves for an id changes after the harvest (reactions added, images hidden,
deleted, re-rated); a refresh pass must record, once per id, exactly what the fake serves
then, in `refresh-NNNNNN.ndjson`, never touching the item segments, through faults and
kill -9, and the export and `harvest sql` must carry the latest observation.
"""

from __future__ import annotations

import gzip
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

from conftest import HARVEST, harvest, make_dataset, write_config
from crawler.archive.compression import open_segment
from crawler.errors import ExitCode
from crawler.export.schema import OBSERVATION_SCHEMA
from crawler.testing.fakeapi import Dataset, FakeServer
from crawler.testing.fakeapi.background import ServerThread

VERSIONS = {5001: 300, 5002: 200, 5003: 120}
QUERY = {"modelId": 500, "browsingLevel": 31, "sort": "Newest"}
STATS = ("cryCount", "laughCount", "likeCount", "dislikeCount", "heartCount", "commentCount")


def dataset() -> Dataset:
    return make_dataset(VERSIONS, hidden_rate=0.0)


def harvested(tmp_path: Path, api: FakeServer, **api_options: Any) -> Path:
    """The config, after a harvest of every version; `api_options` change the [api] table."""
    cfg = write_config(tmp_path / "cfg.toml", api.base_url, [QUERY], **api_options)
    result = harvest("run", cfg)
    assert result.code == ExitCode.OK, result.stderr
    return cfg


def harvested_ids(out: Path) -> list[int]:
    with sqlite3.connect(out / "harvest.sqlite") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM seen ORDER BY id")]


def observations(out: Path) -> list[dict[str, Any]]:
    """Every line of every refresh segment (plain or compressed), parsed; no torn line."""
    found = []
    names = sorted(p for p in out.iterdir() if p.name.startswith("refresh-") and ".part" not in p.name)
    for path in names:
        with open_segment(path) as stream:
            data = stream.read()
        assert not data or data.endswith(b"\n"), f"{path.name} ends in a torn line"
        found += [orjson.loads(line) for line in data.splitlines()]
    return found


def served_now(data: Dataset, ids: list[int]) -> dict[int, dict[str, Any] | None]:
    """What the fake serves for each id now, read from its dataset: None for hidden or deleted."""
    visible = {i for v in VERSIONS for i in data.version_image_ids(v)}
    result: dict[int, dict[str, Any] | None] = {}
    for image_id in ids:
        index = data.index_of(image_id)
        result[image_id] = data.item(index) if image_id in visible and index is not None else None
    return result


def assert_observed(found: list[dict[str, Any]], want: dict[int, dict[str, Any] | None]) -> None:
    by_id = {o["id"]: o for o in found}
    assert len(by_id) == len(found), "an id observed twice in one pass"
    assert set(by_id) == set(want)
    for image_id, item in want.items():
        seen = by_id[image_id]
        if item is None:
            assert seen["gone"] is True and seen["stats"] is None and seen["browsingLevel"] is None, seen
        else:
            assert seen["gone"] is False, seen
            assert (seen["stats"], seen["nsfwLevel"], seen["browsingLevel"]) == (
                item["stats"],
                item["nsfwLevel"],
                item["browsingLevel"],
            ), image_id


def change(data: Dataset, ids: list[int]) -> dict[str, list[int]]:
    """What happens to images after their first sight, as the real site does it."""
    picked = random.Random(5).sample(ids, 40)
    changes = {
        "liked": picked[:20],
        "hidden": picked[20:25],
        "deleted": picked[25:30],
        "rerated": picked[30:],
    }
    data.react(changes["liked"], like=1000, comment=3)
    data.hide_images(changes["hidden"])
    data.delete_images(changes["deleted"])
    data.set_browsing_level(changes["rerated"], 16)
    return changes


def json_latest(folder: Path) -> list[dict[str, Any]]:
    """The rows of a JSON lines export's latest file (`latest.jsonl.gz` or `latest-next.jsonl.gz`)."""
    [path] = (folder / "latest").glob("latest*.jsonl.gz")
    rows = [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    assert list(rows[0]) == OBSERVATION_SCHEMA.names  # every column, in the schema's order
    return rows


def segment_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("images-*"))}


# -- what is observed ------------------------------------------------------------------


def test_refresh_records_what_the_api_serves_now_and_never_touches_the_items(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        cfg = harvested(tmp_path, api)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        items_before = segment_bytes(out)
        changes = change(data, ids)
        api.log.clear()
        result = harvest("refresh", cfg)
        assert result.code == ExitCode.OK, result.stderr
        asked = [r for r in api.log if r.path.endswith("/images")]
    found = observations(out)
    assert_observed(found, served_now(data, ids))
    gone = {o["id"] for o in found if o["gone"]}
    assert gone == set(changes["hidden"]) | set(changes["deleted"])
    assert all(o["browsingLevel"] == 16 for o in found if o["id"] in changes["rerated"])
    assert {o["pass"] for o in found} == {1} and len({o["observed_at"] for o in found}) >= 1
    # ids= batches of at most 100, every level asked for, one request per batch
    assert len(asked) == -(-len(ids) // 100)
    for record in asked:
        assert len(record.query["ids"].split(",")) <= 100 and record.query["browsingLevel"] == "31"
        assert int(record.query["limit"]) >= 100
    assert segment_bytes(out) == items_before, "the first-seen item lines are never rewritten"
    summary = orjson.loads((out / "last-run.json").read_bytes())
    assert summary["command"] == "refresh" and summary["ok"] is True
    assert summary["refresh"]["observed"] == len(ids) and summary["refresh"]["gone"] == len(gone)
    assert f"{len(ids)} of {len(ids)} ids observed, {len(gone)} gone" in result.stderr
    status = harvest("status", cfg)
    assert f"refresh: pass 1 complete; {len(ids)} ids observed, {len(gone)} gone" in status.stdout
    verify = harvest("verify", cfg)
    assert verify.code == ExitCode.OK, verify.stdout + verify.stderr
    assert f"{len(ids)} images in 1 segment" in verify.stdout  # the refresh segment is not an item segment
    assert f"{len(ids)} observations in 1 refresh segment(s): sound" in verify.stdout
    refresh = out / "refresh-000001.ndjson"
    with refresh.open("r+b") as f:  # cut outside the harvest
        f.truncate(refresh.stat().st_size - 10)
    broken = harvest("verify", cfg)
    assert broken.code == ExitCode.ERROR and "refresh-000001.ndjson" in broken.stdout
    assert f"{len(ids)} images in 1 segment(s) under {out}: sound" in broken.stdout
    again = harvest("refresh", cfg)  # the agreement check: nothing is cut, the state is not trusted
    assert again.code == ExitCode.ERROR and "harvest repair" in again.stderr


def test_a_second_pass_observes_again_and_older_than_picks_what_is_due(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        cfg = harvested(tmp_path, api)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        assert harvest("refresh", cfg).code == ExitCode.OK
        fresh = harvest("refresh", cfg, "--older-than", "1h")
        assert fresh.code == ExitCode.OK and "nothing is due" in fresh.stderr
        # Age some ids: observed two days ago, or (never observed) first seen two days ago.
        added = data.add_images(5002, 15)
        assert harvest("run", cfg).code == ExitCode.OK
        aged = ids[:30]
        with sqlite3.connect(out / "harvest.sqlite") as conn:
            conn.executemany("UPDATE observed SET at = at - 2 * 86400 WHERE id=?", ((i,) for i in aged))
            conn.executemany(
                "UPDATE first_seen SET at = at - 2 * 86400 WHERE id=?", ((i,) for i in added[:5])
            )
        data.react(aged[:3], heart=7)
        result = harvest("refresh", cfg, "--older-than", "1d")
        assert result.code == ExitCode.OK, result.stderr
        second = [o for o in observations(out) if o["pass"] == 2]
        assert sorted(o["id"] for o in second) == sorted(aged + added[:5])
        assert_observed(second, served_now(data, aged + added[:5]))
        everything = harvest("refresh", cfg)  # no --older-than: every id the archive holds
        assert everything.code == ExitCode.OK
    third = [o for o in observations(out) if o["pass"] == 3]
    assert sorted(o["id"] for o in third) == sorted(ids + added)


def test_a_bad_age_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.toml", "http://127.0.0.1:9/api/v1", [QUERY])
    result = harvest("refresh", cfg, "--older-than", "7 days")
    assert result.code == ExitCode.USAGE and "is not a duration" in result.stderr
    none_yet = harvest("refresh", cfg)
    assert none_yet.code == ExitCode.ERROR and "no harvest state here yet" in none_yet.stderr
    assert len(none_yet.stderr.strip().splitlines()) == 1


# -- faults and kills ------------------------------------------------------------------


def test_faults_during_a_refresh_are_retried_and_each_id_observed_once(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        cfg = harvested(tmp_path, api)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        change(data, ids)
        api.faults.queue("429", "500", "truncated", "503", "challenge", "reset", "502")
        result = harvest("refresh", cfg)
        assert result.code == ExitCode.OK, result.stderr
    assert_observed(observations(out), served_now(data, ids))
    summary = orjson.loads((out / "last-run.json").read_bytes())
    assert summary["retries"] >= 7 and summary["rate_limited"] >= 1


def test_a_batch_that_fails_for_good_stops_the_pass_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        cfg = harvested(tmp_path, api, max_retries=2, concurrency=1)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        api.faults.queue("500", "500", "500")  # the first batch's three attempts
        stopped = harvest("refresh", cfg)
        assert stopped.code == ExitCode.SHARDS_FAILED, stopped.stderr
        assert "gave up after 3 attempts" in stopped.stderr and "rerun `harvest refresh" in stopped.stderr
        partial = observations(out)
        assert len(partial) < len(ids)
        resumed = harvest("refresh", cfg)
        assert resumed.code == ExitCode.OK, resumed.stderr
        assert "resumed" in resumed.stderr
    found = observations(out)
    assert {o["pass"] for o in found} == {1}
    assert_observed(found, served_now(data, ids))


def test_a_400_on_a_batch_fails_it_at_once_without_the_key_and_a_rerun_finishes(tmp_path: Path) -> None:
    """A 400 is the server refusing the request, not weather: no retry, one line, the key nowhere."""
    data = dataset()
    key = "sk-REFRESH-0123456789abcdef"
    with ServerThread(data, api_key=key) as api:
        cfg = harvested(tmp_path, api, concurrency=1)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        api.faults.queue("echo_400")  # its body echoes the request's headers, Authorization too
        stopped = harvest("refresh", cfg, env={"CIVITAI_API_KEY": key})
        assert stopped.code == ExitCode.SHARDS_FAILED, stopped.stderr
        failed = [line for line in stopped.stderr.splitlines() if "ERROR refresh: ids " in line]
        assert len(failed) == 1 and "HTTP 400" in failed[0], stopped.stderr
        assert "rerun `harvest refresh" in stopped.stderr
        summary = orjson.loads((out / "last-run.json").read_bytes())
        assert summary["retries"] == 0 and summary["exit_code"] == ExitCode.SHARDS_FAILED, summary
        texts = {
            "stderr": stopped.stderr + stopped.stdout,
            **{p.name: p.read_bytes().decode(errors="replace") for p in out.iterdir() if p.is_file()},
        }
        for where, text in texts.items():
            assert key not in text, f"the key leaked into {where}"
        resumed = harvest("refresh", cfg, env={"CIVITAI_API_KEY": key})
        assert resumed.code == ExitCode.OK, resumed.stderr
    found = observations(out)
    assert {o["pass"] for o in found} == {1}
    assert_observed(found, served_now(data, ids))


def test_sigterm_mid_refresh_finishes_the_batch_and_a_rerun_resumes_the_pass(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        harvested(tmp_path, api)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        change(data, ids)
        slow = write_config(
            tmp_path / "slow.toml", api.base_url, [QUERY], requests_per_second=4, concurrency=1
        )
        proc = _start("refresh", slow, stderr=subprocess.PIPE)
        while _lines_on_disk(out, 0) == 0 and proc.poll() is None:
            time.sleep(0.005)  # polling the disk for the instant to signal at; nothing is timed
        assert proc.poll() is None, "the refresh ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        stderr = err.decode()
        assert proc.returncode == 143, stderr
        assert f"Resume with: harvest refresh {slow}" in stderr
        summary = orjson.loads((out / "last-run.json").read_bytes())
        assert summary["exit_code"] == 143 and summary["command"] == "refresh", summary
        with sqlite3.connect(out / "harvest.sqlite") as conn:
            committed = conn.execute("SELECT count(*) FROM observed").fetchone()[0]
        partial = observations(out)  # no torn line: the batch being committed was finished
        assert len(partial) == committed == summary["refresh"]["observed"] < len(ids)
        assert _pass_open(out)
        resumed = harvest("refresh", slow)
        assert resumed.code == ExitCode.OK, resumed.stderr
        assert "resumed" in resumed.stderr
    found = observations(out)
    assert max(Counter(o["id"] for o in found).values()) == 1, "an observation written twice in one pass"
    assert {o["pass"] for o in found} == {1}
    assert_observed(found, served_now(data, ids))


def _start(*args: str | Path, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    return subprocess.Popen([HARVEST, *map(str, args)], stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def _lines_on_disk(out: Path, segment_items: int) -> int:
    """Observation lines written so far (a compressed segment is a closed one: full)."""
    plain = sum(path.read_bytes().count(b"\n") for path in out.glob("refresh-*.ndjson"))
    return plain + segment_items * len(list(out.glob("refresh-*.ndjson.zst")))


def _pass_open(out: Path) -> bool:
    with sqlite3.connect(out / "harvest.sqlite") as conn:
        row = conn.execute("SELECT value FROM meta WHERE key='refresh_open'").fetchone()
    return row is None or row[0] == "1"


@pytest.mark.parametrize("seed", [3])
def test_kill9_mid_refresh_then_the_resumed_pass_writes_each_observation_once(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    data = dataset()
    output = {"segment_items": 250, "compress": "zstd"}  # observation segments rotate and compress too
    with ServerThread(data) as api:
        fast = write_config(tmp_path / "fast.toml", api.base_url, [QUERY], output=output)
        assert harvest("run", fast).code == ExitCode.OK
        out = tmp_path / "out"
        ids = harvested_ids(out)
        change(data, ids)
        # The same output dir, refreshed slowly: 5 requests/s (7 batches), one at a time.
        slow = write_config(
            tmp_path / "slow.toml",
            api.base_url,
            [QUERY],
            output=output,
            requests_per_second=10,
            concurrency=1,
        )
        kills = 0
        for _ in range(3):
            if not _pass_open(out):
                break  # a run got to the end of the pass: one more would begin the next pass
            target = _lines_on_disk(out, 250) + rng.randint(1, 120)
            proc = _start("refresh", slow)
            while _lines_on_disk(out, 250) < target and proc.poll() is None:
                time.sleep(0.005)  # polling the disk for the instant to kill at; nothing is timed
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        assert kills >= 1, "the refresh ended before it could be killed"
        result = harvest("refresh", slow)
        assert result.code == ExitCode.OK, result.stderr
    found = observations(out)
    counts = Counter(o["id"] for o in found)
    assert max(counts.values()) == 1, "an observation written twice in one pass"
    assert {o["pass"] for o in found} == {1}
    assert_observed(found, served_now(data, ids))
    assert harvest("verify", slow).code == ExitCode.OK


def test_repair_adopts_the_refresh_segments(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        cfg = harvested(tmp_path, api)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        assert harvest("refresh", cfg).code == ExitCode.OK
        segment = out / "refresh-000001.ndjson"
        whole = segment.read_bytes()
        with segment.open("ab") as f:
            f.write(b'{"id": 1, "pass": 1, "gone": fa')  # a write cut short, then the state lost
        (out / "harvest.sqlite").unlink()
        for suffix in ("-wal", "-shm"):
            (out / f"harvest.sqlite{suffix}").unlink(missing_ok=True)
        repaired = harvest("repair", cfg)
        assert repaired.code == ExitCode.OK, repaired.stderr
        with sqlite3.connect(out / "harvest.sqlite") as conn:
            assert conn.execute("SELECT count(*) FROM observed").fetchone()[0] == len(ids)
            assert conn.execute("SELECT name, items FROM refresh_segments").fetchall() == [
                ("refresh-000001.ndjson", len(ids))
            ]
        assert segment.read_bytes() == whole, "the torn line is cut, no complete line removed"
        again = harvest("refresh", cfg)
        assert again.code == ExitCode.OK, again.stderr
    assert Counter(o["pass"] for o in observations(out)) == {1: len(ids), 2: len(ids)}


# -- export and sql --------------------------------------------------------------------


def test_export_and_sql_carry_the_latest_observation(tmp_path: Path) -> None:
    data = dataset()
    with ServerThread(data) as api:
        cfg = harvested(tmp_path, api)
        out = tmp_path / "out"
        ids = harvested_ids(out)
        assert harvest("export", cfg).code == ExitCode.OK
        change(data, ids)
        assert harvest("refresh", cfg).code == ExitCode.OK
        as_json = harvest("export", cfg, "--format", "jsonl.gz", "--to", tmp_path / "json")
        assert as_json.code == ExitCode.OK, as_json.stderr
        assert {r["pass"] for r in json_latest(tmp_path / "json")} == {1}
        data.react(ids[:10], like=5)  # changes again: the second pass is the latest
        assert harvest("refresh", cfg).code == ExitCode.OK
        exported = harvest("export", cfg)
        assert exported.code == ExitCode.OK, exported.stderr
        assert f"exported {2 * len(ids)} new observations" in exported.stderr
        # The JSON lines' latest is made from the last one and the new pass (incremental).
        as_json = harvest("export", cfg, "--format", "jsonl.gz", "--to", tmp_path / "json")
        assert as_json.code == ExitCode.OK, as_json.stderr
        assert f"exported {len(ids)} new observations" in as_json.stderr
    want = served_now(data, ids)
    folder = out / "export"
    # pyarrow: the latest observation per id, and every observation
    latest = {row["id"]: row for row in pq.read_table(folder / "latest").to_pylist()}
    assert set(latest) == set(ids) and {r["pass"] for r in latest.values()} == {2}
    for image_id, item in want.items():
        row = latest[image_id]
        if item is None:
            assert row["gone"] is True and row["stats"] is None
        else:
            assert row["gone"] is False and row["stats"] == {k: item["stats"][k] for k in row["stats"]}
            assert (row["nsfwLevel"], row["browsingLevel"]) == (item["nsfwLevel"], item["browsingLevel"])
    assert pq.read_table(folder / "observations").num_rows == 2 * len(ids)
    assert sorted(p.name for p in (folder / "latest").iterdir()) == ["latest.parquet"]
    packed = sorted((tmp_path / "json" / "observations").glob("observations-*.jsonl.gz"))
    lines = [line for p in packed for line in gzip.decompress(p.read_bytes()).splitlines()]
    assert len(lines) == 2 * len(ids) and set(orjson.loads(lines[0])) == set(OBSERVATION_SCHEMA.names)
    # The JSON lines carry the same latest observation (and `gone`) as the Parquet, column for column.
    assert [p.name for p in (tmp_path / "json" / "latest").iterdir()] == ["latest-next.jsonl.gz"]
    as_lines = json_latest(tmp_path / "json")
    assert [r["id"] for r in as_lines] == sorted(latest)
    for row in as_lines:
        want_row = dict(latest[row["id"]])
        want_row["observed_at"] = want_row["observed_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert row == want_row, row["id"]
    # A JSON lines export dir from before they had a latest file gets it at its next export.
    manifest_path = tmp_path / "json" / "manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    del manifest["latest"]["jsonl.gz"]
    manifest_path.write_bytes(orjson.dumps(manifest))
    (tmp_path / "json" / "latest" / "latest-next.jsonl.gz").unlink()
    again = harvest("export", cfg, "--format", "jsonl.gz", "--to", tmp_path / "json")
    assert again.code == ExitCode.OK and "nothing new to export" in again.stderr, again.stderr
    assert json_latest(tmp_path / "json") == as_lines
    # DuckDB over the same files: the images joined with the latest observation
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT i.id, i.stats.likeCount, l.stats.likeCount, l.gone FROM '{folder}/images-*.parquet' i "
            f"JOIN '{folder}/latest/*.parquet' l USING (id) ORDER BY i.id"
        ).fetchall()
    assert len(rows) == len(ids)
    for image_id, first, now, gone in rows:
        item = want[image_id]
        assert gone is (item is None) and now == (None if item is None else item["stats"]["likeCount"])
        assert first is not None
    # harvest sql: images carries the latest; observations holds both passes
    result = harvest(
        "sql",
        cfg,
        "SELECT id, gone, latest_stats, latest_browsingLevel FROM images ORDER BY id",
        "--format",
        "json",
    )
    assert result.code == ExitCode.OK, result.stderr
    for row in orjson.loads(result.stdout):
        item = want[row["id"]]
        assert row["gone"] is (item is None)
        if item is not None:
            assert row["latest_stats"]["likeCount"] == item["stats"]["likeCount"]
            assert row["latest_browsingLevel"] == item["browsingLevel"]
    passes = harvest(
        "sql", cfg, "SELECT pass, count(*) AS n FROM observations GROUP BY 1 ORDER BY 1", "--format", "json"
    )
    assert orjson.loads(passes.stdout) == [{"pass": 1, "n": len(ids)}, {"pass": 2, "n": len(ids)}]
