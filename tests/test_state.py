"""The state file across versions: old files open and migrate, newer ones are refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from crawler.archive import schema
from crawler.archive.state import STATE_FILE, PageCommit, ShardStatus, State
from crawler.errors import OutputError, StateError

# The tables exactly as the code before versioning made them (user_version left at 0,
# meta schema "1"): a frozen copy, so the test keeps meaning what it says.
PRE_VERSIONING_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    key TEXT PRIMARY KEY,
    query TEXT NOT NULL,
    pass INTEGER NOT NULL,
    status TEXT NOT NULL,
    cursor TEXT,
    tail_cursor TEXT,
    items INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    finished INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    items INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    file TEXT
);
CREATE TABLE IF NOT EXISTS seen (id INTEGER PRIMARY KEY) WITHOUT ROWID;
"""
V1_TABLES = ("meta", "shards", "segments", "seen")


def make_pre_versioning_state(out: Path) -> Path:
    """A harvest.sqlite as the code before versioning left it, mid-harvest."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / STATE_FILE
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(PRE_VERSIONING_SCHEMA)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)", [("schema", "1"), ("pass", "1"), ("pass_open", "1")]
        )
        conn.execute(
            "INSERT INTO shards (key, query, pass, status, cursor, items, pages, updated) "
            "VALUES ('k', 'q', 1, 'active', '\"c2\"', 3, 2, 0)"
        )
        conn.executemany(
            "INSERT INTO segments VALUES (?, ?, ?, ?, ?)",
            [
                ("images-000001.ndjson", 60, 2, 1, "images-000001.ndjson.zst"),
                ("images-000002.ndjson", 30, 1, 0, None),
            ],
        )
        conn.executemany("INSERT INTO seen VALUES (?)", [(1,), (2,), (3,)])
    finally:
        conn.close()
    return path


def table_sql(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type='table'").fetchall())
    finally:
        conn.close()


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_pre_versioning_state_opens_as_version_1_and_migrates(tmp_path: Path) -> None:
    path = make_pre_versioning_state(tmp_path)
    before = table_sql(path)
    with State.open(tmp_path, create=False) as state:
        shard = state.shard("k")
        assert (shard.status, shard.cursor, shard.items, shard.pages) == (ShardStatus.ACTIVE, "c2", 3, 2)
        assert [(s.name, s.closed, s.file) for s in state.segments()] == [
            ("images-000001.ndjson", True, "images-000001.ndjson.zst"),
            ("images-000002.ndjson", False, "images-000002.ndjson"),
        ]
        assert state.seen_count() == 3 and state.known_ids([2, 9]) == {2}
        assert state.get_meta("schema") == "1"  # what code from before versioning checks
        assert state.begin_pass([("k", "q")]) == 1  # the open pass resumes
    assert user_version(path) == schema.LATEST
    after = table_sql(path)
    assert {t: after[t] for t in V1_TABLES} == {t: before[t] for t in V1_TABLES}  # left as they were


def test_a_fresh_state_has_the_same_tables_as_before_versioning(tmp_path: Path) -> None:
    with State.open(tmp_path / "new") as state:
        assert state.get_meta("schema") == "1"
        assert state.segments() == [] and state.seen_count() == 0
    fresh = table_sql(tmp_path / "new" / STATE_FILE)
    old = table_sql(make_pre_versioning_state(tmp_path / "old"))
    assert {t: fresh[t] for t in V1_TABLES} == {t: old[t] for t in V1_TABLES}
    assert user_version(tmp_path / "new" / STATE_FILE) == schema.LATEST


def test_reopening_a_current_state_changes_nothing(tmp_path: Path) -> None:
    with State.open(tmp_path) as state:
        state.begin_pass([("k", "q")])
    before = table_sql(tmp_path / STATE_FILE)
    with State.open(tmp_path, create=False) as state:
        assert state.shard("k").status == ShardStatus.PENDING
    assert table_sql(tmp_path / STATE_FILE) == before
    assert user_version(tmp_path / STATE_FILE) == schema.LATEST


def test_a_newer_state_is_refused_naming_file_and_versions(tmp_path: Path) -> None:
    with State.open(tmp_path):
        pass
    path = tmp_path / STATE_FILE
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.LATEST + 3}")
    conn.close()
    with pytest.raises(StateError) as refused:
        State.open(tmp_path)
    message = str(refused.value)
    assert str(path) in message
    assert f"version {schema.LATEST + 3}" in message and f"version {schema.LATEST})" in message
    assert user_version(path) == schema.LATEST + 3  # untouched


def test_a_pre_versioning_state_of_another_schema_is_refused(tmp_path: Path) -> None:
    path = make_pre_versioning_state(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='7' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="state schema 7, this harvest reads 1"):
        State.open(tmp_path)
    assert user_version(path) == 0


def test_a_failing_migration_leaves_the_last_whole_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_pre_versioning_state(tmp_path)

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (x)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, half_done))
    monkeypatch.setattr(schema, "LATEST", len(schema.MIGRATIONS))
    with pytest.raises(StateError, match="disk I/O error"):
        State.open(tmp_path)
    assert user_version(path) == schema.LATEST - 1  # the earlier steps stay, each was committed
    assert "half" not in table_sql(path)  # the failed step was rolled back whole


def test_state_is_a_context_manager_that_closes(tmp_path: Path) -> None:
    with State.open(tmp_path) as state:
        state.set_meta("k", "v")
    with pytest.raises(sqlite3.ProgrammingError):
        state.get_meta("k")
    with pytest.raises(RuntimeError), State.open(tmp_path) as again:
        raise RuntimeError("boom")
    with pytest.raises(sqlite3.ProgrammingError):
        again.get_meta("k")
    state = State.open(tmp_path, create=False)  # the open()/close() way still works
    assert state.get_meta("k") == "v"
    state.close()


def test_a_committed_page_survives_reopening(tmp_path: Path) -> None:
    with State.open(tmp_path) as state:
        state.begin_pass([("k", "q")])
        state.commit_page(PageCommit("k", "images-000001.ndjson", 10, [5, 6], "c1", None))
    with State.open(tmp_path) as state:
        assert state.shard("k").cursor == "c1" and state.seen_count() == 2


def test_a_full_disk_inside_a_transaction_is_a_clean_state_error(tmp_path: Path) -> None:
    """SQLite rolls back by itself when the disk is full; that must not turn into an internal error."""
    with State.open(tmp_path) as state:
        state.begin_pass([("k", "q")])
        conn = state._conn  # a page cap on this connection stands in for a full disk
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0] + 1}")
        with pytest.raises(StateError, match="full"):
            state.commit_page(PageCommit("k", "images-000001.ndjson", 10, list(range(50_000)), "c", None))
        conn.execute("PRAGMA max_page_count = 1073741823")  # space again: the state is intact and usable
        assert state.shard("k").status == ShardStatus.PENDING and state.seen_count() == 0
        state.commit_page(PageCommit("k", "images-000001.ndjson", 10, [1], "c", None))
        assert state.seen_count() == 1


def test_version_1_gains_the_later_tables_and_keeps_the_rest(tmp_path: Path) -> None:
    path = make_pre_versioning_state(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 1")  # as version-1 code leaves it
    conn.close()
    before = table_sql(path)
    with State.open(tmp_path) as state:
        assert state.done_steps("images-000001.ndjson") == frozenset()  # nothing recorded yet
        state.record_step("images-000001.ndjson", "compress")
        state.record_step("images-000001.ndjson", "compress")  # recording twice is harmless
        assert state.done_steps("images-000001.ndjson") == {"compress"}
        assert state.segment("images-000001.ndjson").file == "images-000001.ndjson.zst"
    after = table_sql(path)
    later = {"segment_steps", "walks", "end_ids", "shard_levels", "media"}
    later |= {"first_seen", "runs", "refresh_segments", "refresh_steps", "observed", "refresh_todo"}
    later |= {"published"}
    assert set(after) == set(before) | later
    assert {t: after[t] for t in before} == before
    assert user_version(path) == schema.LATEST == 6


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_symlink_planted_as_the_state_or_its_log_is_refused(tmp_path: Path, suffix: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / (STATE_FILE + suffix)).symlink_to(victim)
    with pytest.raises(OutputError, match=rf"{STATE_FILE}{suffix}: is a symlink"):
        State.open(out)
    assert victim.read_bytes() == b"precious"


# A commit that runs into the file size limit (`ulimit -f`, EFBIG), in a process of its own:
# SQLite only says "disk I/O error"; the error must say what is wrong, and where.
_FILE_SIZE_LIMIT = """
import resource, sys
from pathlib import Path
from crawler.archive.state import PageCommit, State
from crawler.errors import StateError
state = State.open(Path(sys.argv[1]))
state.begin_pass([("k", "q")])
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    state.commit_page(PageCommit("k", "images-000001.ndjson", 10, list(range(100_000)), "c", None))
except StateError as exc:
    print(exc)
"""


def test_a_commit_past_the_file_size_limit_says_so(tmp_path: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    said = found.stdout.strip()
    assert said.startswith(f"{tmp_path / STATE_FILE}: ") and "file too large" in said, said
    assert "200000 bytes" in said and "disk I/O error" not in said


@pytest.mark.parametrize(
    ("page", "meets"),
    [
        ([10, 11, 12, 3, 2, 1], True),  # the page's last ids are the other end's: they met
        ([3, 2, 1], True),  # all of it
        ([10, 11, 1], True),  # only its last one
        ([1, 10, 11, 12], False),  # an id served at the head of every page (pinned): not a meeting
        ([1, 10, 2, 3], False),  # an id the other end never saw between its ids: something lies between
        ([10, 11, 12], False),  # nothing in common
        ([], False),
    ],
)
def test_a_page_meets_the_other_end_only_where_its_last_ids_are_that_ends(
    tmp_path: Path, page: list[int], meets: bool
) -> None:
    with State.open(tmp_path) as state:
        state.record_ends("newest", ("oldest", "q"), [1, 2, 3])
        assert state.meets("newest", page) is meets
