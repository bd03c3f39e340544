"""What a hostile server and a careless user do, each through the real CLI (issue 9).

Every test here failed before its fix: data altered or lost, the key leaked, a run
stalled or crashed. The fake API plays the hostile server (echoed headers, gzip
bombs, endless bodies, odd ids, lone surrogates, huge Retry-After).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import HARVEST, _toml_value, expected_ids, harvest, ids_of, make_dataset, read_items
from crawler.testing.fakeapi import FakeServer, FaultSpec, ServerOptions, ServerThread
from crawler.testing.fakeapi.faults import _bomb

KEY = "sk-HOSTILE-0123456789abcdef"
CLOSED_PORT_URL = "http://127.0.0.1:9/api/v1"


def config(
    tmp_path: Path,
    base_url: str,
    queries: Sequence[Mapping[str, Any]] = ({"modelId": 500, "browsingLevel": 31},),
    output: Mapping[str, Any] | None = None,
    name: str = "cfg.toml",
    **api: Any,
) -> Path:
    api = {"base_url": base_url, "requests_per_second": 500, "timeout": 5, "max_backoff": 0.05, **api}
    lines = ["[api]", *(f"{k} = {_toml_value(v)}" for k, v in api.items())]
    lines += ["", "[output]", 'dir = "out"', *(f"{k} = {_toml_value(v)}" for k, v in (output or {}).items())]
    for query in queries:
        lines += ["", "[[queries]]", *(f"{k} = {_toml_value(v)}" for k, v in query.items())]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Logging error" not in text, text


# -- 1. values as served ----------------------------------------------------------------

BIG_SEED = (
    b'{"id":77000001,"postId":1,"meta":{"seed":18446744073709552000,"big":123456789012345678901234567890}}'
)
SURROGATE = (
    b'{"id":77000002,"postId":1,"meta":{"prompt":"cut inside an emoji \\ud83d","negativePrompt":"\\udc00"}}'
)


def test_big_integers_and_lone_surrogates_are_written_as_served(tmp_path: Path) -> None:
    options = ServerOptions(
        raw_items=(("modelVersionId", "5001", BIG_SEED), ("modelVersionId", "5002", SURROGATE))
    )
    with ServerThread(make_dataset(), options=options) as api:
        cfg = config(tmp_path, api.base_url)
        result = harvest("run", cfg)
    assert result.code == 0, result.stderr
    lines = (tmp_path / "out" / "images-000001.ndjson").read_bytes().splitlines()
    assert BIG_SEED in lines and SURROGATE in lines
    check = harvest("verify", cfg)
    assert check.code == 0, check.stdout + check.stderr


# -- 2. a lost or older state never truncates the archive -------------------------------


def test_lost_state_refuses_instead_of_truncating_then_repair_rebuilds(tmp_path: Path) -> None:
    dataset = make_dataset()
    with ServerThread(dataset) as api:
        cfg = config(tmp_path, api.base_url)
        assert harvest("run", cfg).code == 0
    segment = tmp_path / "out" / "images-000001.ndjson"
    before = segment.read_bytes()
    (tmp_path / "out" / "harvest.sqlite").unlink()
    down = config(tmp_path, CLOSED_PORT_URL, max_retries=0)
    result = harvest("run", down)
    assert result.code == 1, result.stderr
    assert "harvest repair" in result.stderr and "images-000001.ndjson" in result.stderr
    assert segment.read_bytes() == before
    repaired = harvest("repair", down)
    assert repaired.code == 0, repaired.stderr
    assert harvest("verify", down).code == 0
    with ServerThread(dataset) as api:
        again = harvest("run", config(tmp_path, api.base_url))
    assert again.code == 0, again.stderr
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [5001, 5002, 5003])
    assert segment.read_bytes().startswith(before)


def test_older_state_refuses_instead_of_truncating(tmp_path: Path) -> None:
    dataset = make_dataset()
    with ServerThread(dataset) as api:
        first = config(tmp_path, api.base_url, queries=[{"modelVersionId": 5001, "browsingLevel": 31}])
        assert harvest("run", first).code == 0
        shutil.copy(tmp_path / "out" / "harvest.sqlite", tmp_path / "old.sqlite")
        both = config(tmp_path, api.base_url)
        assert harvest("run", both).code == 0
    segment = tmp_path / "out" / "images-000001.ndjson"
    before = segment.read_bytes()
    for extra in ("-wal", "-shm"):
        (tmp_path / "out" / f"harvest.sqlite{extra}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "old.sqlite", tmp_path / "out" / "harvest.sqlite")
    result = harvest("run", config(tmp_path, CLOSED_PORT_URL, max_retries=0))
    assert result.code == 1 and "harvest repair" in result.stderr, result.stderr
    assert segment.read_bytes() == before


# -- 3. files that are not ours ---------------------------------------------------------


def test_foreign_part_files_are_left_alone(tmp_path: Path, api: FakeServer) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "ubuntu.iso.part"
    mine.write_bytes(b"half an iso")
    result = harvest("run", config(tmp_path, api.base_url, output={"segment_items": 100, "compress": "zstd"}))
    assert result.code == 0, result.stderr
    assert mine.read_bytes() == b"half an iso"


# -- 4. the key never leaks through echoed bodies ---------------------------------------


@pytest.mark.parametrize("kind", ["echo_400", "echo_404", "echo_500"])
def test_echoed_key_never_reaches_state_summary_status_or_stderr(tmp_path: Path, kind: str) -> None:
    with ServerThread(make_dataset(), api_key=KEY) as api:
        api.faults.queue(kind, *([kind] * 3 if kind == "echo_500" else []))
        queries = [{"modelVersionId": 5001, "browsingLevel": 31}]  # the first request walks a shard
        cfg = config(tmp_path, api.base_url, queries, max_retries=2)
        result = harvest("run", cfg, env={"CIVITAI_API_KEY": KEY})
        status = harvest("status", cfg)
    assert result.code == 3, result.stderr
    assert "Authorization" in result.stderr or "HTTP" in result.stderr  # the failure is shown...
    for where, text in [
        ("stderr", result.stderr + result.stdout),
        ("status", status.stdout + status.stderr),
        ("last-run.json", (tmp_path / "out" / "last-run.json").read_text()),
    ]:
        assert KEY not in text, f"the key leaked into {where}"
    for path in (tmp_path / "out").iterdir():
        assert KEY.encode() not in path.read_bytes(), f"the key leaked into {path.name}"


# -- 5. bounded bodies ------------------------------------------------------------------


# Runs `harvest` as its only child and prints that child's peak RSS (KiB) on its last stderr line:
# the test process's own RUSAGE_CHILDREN would mix in every harvest an earlier test ran.
MEASURED = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


@pytest.mark.parametrize("kind", ["gzip_bomb", "endless"])
def test_oversized_answers_are_failed_attempts_and_memory_stays_bounded(tmp_path: Path, kind: str) -> None:
    dataset = make_dataset()
    spec = FaultSpec(bomb_mb=512, endless_mb=1024)
    _bomb(spec.bomb_mb)  # built once, before the clock of any request starts
    with ServerThread(dataset, spec) as api:
        api.faults.queue(kind)
        cfg = config(tmp_path, api.base_url, max_page_mb=2, timeout=30)
        proc = subprocess.run(
            [sys.executable, "-c", MEASURED, HARVEST, "run", str(cfg)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
    *lines, peak = proc.stderr.rstrip().splitlines()
    err = "\n".join(lines)
    assert proc.returncode == 0, err
    assert "larger than" in err and "max_page_mb" in err, err
    ids = ids_of(read_items(tmp_path / "out"))
    assert set(ids) == expected_ids(dataset, [5001, 5002, 5003])
    assert int(peak) < 300 * 1024, f"peak RSS {int(peak) // 1024} MiB"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    env.update(extra)
    return env


# -- 6. one odd item fails its own shard at most ----------------------------------------


def test_an_id_beyond_63_bits_fails_only_its_shard(tmp_path: Path) -> None:
    odd = b'{"id":9223372036854775808,"postId":1}'
    dataset = make_dataset()
    with ServerThread(dataset, options=ServerOptions(raw_items=(("modelVersionId", "5002", odd),))) as api:
        cfg = config(tmp_path, api.base_url)
        result = harvest("run", cfg)
        again = harvest("run", cfg)
    assert result.code == 3 and again.code == 3, result.stderr
    assert "9223372036854775808" in result.stderr
    ids = set(ids_of(read_items(tmp_path / "out")))
    assert expected_ids(dataset, [5001, 5003]) <= ids
    no_traceback(result.stderr)


# -- 7. lone surrogates in error bodies and cursors -------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("kind", ["surrogate_400", "surrogate_cursor"])
def test_lone_surrogates_from_the_server_never_crash(tmp_path: Path, kind: str, log_format: str) -> None:
    with ServerThread(make_dataset()) as api:
        api.faults.queue(*[kind] * 10)
        cfg = config(tmp_path, api.base_url, max_retries=1)
        result = harvest("run", cfg, "--log-format", log_format)
        status = harvest("status", cfg)
    assert result.code == 3, result.stderr
    no_traceback(result.stderr)
    assert status.code == 0, status.stderr
    assert "\ud83d" not in result.stderr + status.stdout


# -- 8. a day-long demanded pause is refused --------------------------------------------


def test_huge_retry_after_stops_with_a_rerun_time(tmp_path: Path) -> None:
    with ServerThread(make_dataset(), FaultSpec(retry_after=1_000_000_000)) as api:
        api.faults.queue("503")
        started = time.monotonic()
        result = harvest("run", config(tmp_path, api.base_url, max_wait=900), timeout=60)
    assert result.code == 3, result.stderr
    assert time.monotonic() - started < 30
    assert "asked for a pause of 1000000000 s" in result.stderr and "rerun after" in result.stderr


def test_short_pause_is_logged_at_warning(tmp_path: Path) -> None:
    with ServerThread(make_dataset(), FaultSpec(retry_after=1)) as api:
        api.faults.queue("503")
        result = harvest("run", config(tmp_path, api.base_url))
    assert result.code == 0, result.stderr
    assert any("WARNING" in line and "pause" in line for line in result.stderr.splitlines()), result.stderr


# -- 9. symlinks are never followed -----------------------------------------------------


@pytest.mark.parametrize("name", ["images-000001.ndjson", ".harvest.lock", "last-run.tmp", "harvest.sqlite"])
def test_planted_symlinks_are_never_followed(tmp_path: Path, api: FakeServer, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (out / name).symlink_to(victim)
    result = harvest("run", config(tmp_path, api.base_url))
    assert victim.read_bytes() == b"precious"
    assert result.code == 1, result.stderr
    said = result.stderr.replace(str(tmp_path), "<tmp>")  # the tmp dir's own name holds "symlink"
    assert "symlink" in said and name in said
    no_traceback(result.stderr)


# -- 10. disk full during a commit says so ----------------------------------------------


def test_state_commit_failing_names_the_disk_and_the_path(tmp_path: Path) -> None:
    def limit() -> None:  # writes past 300 kB fail with EFBIG, like a full disk: small segments,
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))  # so the WAL hits it

    dataset = make_dataset({8001: 3000})
    with ServerThread(dataset) as api:
        cfg = config(
            tmp_path,
            api.base_url,
            queries=[{"modelVersionId": 8001, "browsingLevel": 31}],
            output={"segment_items": 100},
        )
        proc = subprocess.run(
            [HARVEST, "run", str(cfg)],
            capture_output=True,
            text=True,
            env=_env(),
            preexec_fn=limit,
            timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "no transaction is active" not in proc.stderr
        assert str(tmp_path / "out") in last and ("space" in last or "too large" in last), last
        assert harvest("verify", cfg).code == 0
        assert harvest("run", cfg).code == 0


# -- 11. control characters never reach the terminal ------------------------------------


def test_escape_sequences_in_server_text_are_stripped(tmp_path: Path) -> None:
    with ServerThread(make_dataset()) as api:
        api.faults.queue("surrogate_400")
        cfg = config(tmp_path, api.base_url)
        result = harvest("run", cfg)
        status = harvest("status", cfg)
    assert result.code == 3
    for text in (result.stderr, status.stdout):
        assert "\x1b" not in text and "\x07" not in text
    assert "RED" in result.stderr  # the words stay, the escapes go


# -- 12. the key from the environment ---------------------------------------------------


def test_key_with_trailing_newline_is_used(tmp_path: Path) -> None:
    with ServerThread(make_dataset(), api_key=KEY) as api:
        result = harvest("run", config(tmp_path, api.base_url), env={"CIVITAI_API_KEY": KEY + "\n"})
        assert result.code == 0, result.stderr
        assert all(r.has_auth for r in api.log)


def test_key_with_control_characters_is_refused_by_name(tmp_path: Path) -> None:
    result = harvest("run", config(tmp_path, CLOSED_PORT_URL), env={"CIVITAI_API_KEY": "abc\x01def"})
    assert result.code == 2 and "CIVITAI_API_KEY" in result.stderr, result.stderr
    assert "abc" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- 13. broken segments are named, and repair is the way out ---------------------------


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_verify_names_a_corrupt_compressed_segment(tmp_path: Path, api: FakeServer, codec: str) -> None:
    cfg = config(tmp_path, api.base_url, output={"segment_items": 100, "compress": codec})
    assert harvest("run", cfg).code == 0
    packed = sorted((tmp_path / "out").glob("images-*.ndjson.*"))[0]
    data = bytearray(packed.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    packed.write_bytes(bytes(data))
    result = harvest("verify", cfg)
    assert result.code == 1
    assert packed.name in result.stdout + result.stderr
    no_traceback(result.stdout + result.stderr)


def test_deleted_closed_segment_is_noticed_by_run_and_status(tmp_path: Path, api: FakeServer) -> None:
    cfg = config(tmp_path, api.base_url, output={"segment_items": 100, "compress": "zstd"})
    assert harvest("run", cfg).code == 0
    gone = sorted((tmp_path / "out").glob("images-*.ndjson.zst"))[0]
    gone.unlink()
    run = harvest("run", cfg)
    assert run.code == 1 and gone.name in run.stderr and "harvest repair" in run.stderr, run.stderr
    status = harvest("status", cfg)
    assert gone.name in status.stdout + status.stderr and "missing" in (status.stdout + status.stderr)


def test_truncated_active_segment_points_to_repair_which_fixes_it(tmp_path: Path) -> None:
    dataset = make_dataset()
    with ServerThread(dataset) as api:
        cfg = config(tmp_path, api.base_url)
        assert harvest("run", cfg).code == 0
        segment = tmp_path / "out" / "images-000001.ndjson"
        data = segment.read_bytes()
        segment.write_bytes(data[: len(data) // 2])  # cut mid-line
        run = harvest("run", cfg)
        assert run.code == 1 and "harvest repair" in run.stderr, run.stderr
        assert harvest("repair", cfg).code == 0
        assert harvest("verify", cfg).code == 0
        assert harvest("run", cfg).code == 0
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [5001, 5002, 5003])


# -- 14. version ids as strings ---------------------------------------------------------


def test_version_ids_given_as_strings_are_walked(tmp_path: Path) -> None:
    dataset = make_dataset()
    with ServerThread(dataset, options=ServerOptions(version_ids_as_strings=True)) as api:
        result = harvest("run", config(tmp_path, api.base_url))
    assert result.code == 0, result.stderr
    assert set(ids_of(read_items(tmp_path / "out"))) == expected_ids(dataset, [5001, 5002, 5003])


# -- 15, 16. config mistakes that crashed -----------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("base_url", "https://user:secret@example.org/api/v1", "user:password"),
        ("requests_per_second", 1e-300, "0.001"),
        ("requests_per_second", 5e-324, "0.001"),
    ],
)
def test_config_values_that_crashed_are_refused(tmp_path: Path, key: str, value: Any, words: str) -> None:
    cfg = config(tmp_path, **{"base_url": CLOSED_PORT_URL, key: value})
    result = harvest("run", cfg, timeout=20)
    assert result.code == 2, result.stderr
    assert f"api.{key}" in result.stderr and words in result.stderr
    assert "secret" not in result.stderr


# -- 17. decide by the body, not the label ----------------------------------------------


def test_valid_json_labelled_html_is_a_page(tmp_path: Path) -> None:
    with ServerThread(make_dataset()) as api:
        api.faults.queue("json_as_html")
        result = harvest("run", config(tmp_path, api.base_url))
    assert result.code == 0, result.stderr
    summary = (tmp_path / "out" / "last-run.json").read_text()
    assert '"retries": 0' in summary, summary


# -- 18. a walk that makes no progress --------------------------------------------------


def test_walk_without_new_images_stops(tmp_path: Path) -> None:
    dataset = make_dataset()
    options = ServerOptions(stale_pages=frozenset({("modelVersionId", "5002")}))
    with ServerThread(dataset, options=options) as api:
        cfg = config(
            tmp_path,
            api.base_url,
            queries=[{"modelId": 500, "browsingLevel": 31, "limit": 20}],
            max_pages_without_new=5,
        )
        result = harvest("run", cfg, timeout=60)
    assert result.code == 3, result.stderr
    assert "makes no progress" in result.stderr
    assert expected_ids(dataset, [5001, 5003]) <= set(ids_of(read_items(tmp_path / "out")))


# -- 19. start-up signals and verify during a run ---------------------------------------


def test_sigint_during_startup_is_one_line(tmp_path: Path) -> None:
    with ServerThread(make_dataset(), FaultSpec(slow_seconds=20)) as api:
        api.faults.queue("slow")  # the /models request of the planning step hangs
        cfg = config(tmp_path, api.base_url, timeout=30)
        proc = subprocess.Popen([HARVEST, "run", str(cfg)], stderr=subprocess.PIPE, text=True, env=_env())
        lock = tmp_path / "out" / ".harvest.lock"
        deadline = time.monotonic() + 20
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and not api.log.for_path("/api/v1/images")  # still planning
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    no_traceback(err)
    assert len(err.strip().splitlines()) <= 3, err


def test_verify_during_a_live_run_says_a_run_is_in_progress(tmp_path: Path) -> None:
    with ServerThread(make_dataset(), FaultSpec(slow_seconds=20)) as api:
        api.faults.queue("slow")
        cfg = config(tmp_path, api.base_url, timeout=30)
        proc = subprocess.Popen([HARVEST, "run", str(cfg)], stderr=subprocess.DEVNULL, env=_env())
        lock = tmp_path / "out" / ".harvest.lock"
        try:
            # The run holds the lock (its pid written) and hangs on its slow /models request.
            deadline = time.monotonic() + 20
            while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before verify could meet it"
            result = harvest("verify", cfg)
        finally:
            proc.kill()
            proc.wait()
    assert result.code == 4, result.stdout + result.stderr
    assert "in progress" in result.stderr


def test_state_file_stays_sqlite(tmp_path: Path, api: FakeServer) -> None:
    """Guard for the fixes above: the state is still a plain SQLite file others can read."""
    assert harvest("run", config(tmp_path, api.base_url)).code == 0
    with sqlite3.connect(tmp_path / "out" / "harvest.sqlite") as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone()[0] > 0
