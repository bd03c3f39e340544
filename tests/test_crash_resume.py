"""Crash and resume, end to end: the real `harvest` killed at many instants, then rerun.

The promise under test (README, "Exactly once"): a `kill -9` at any instant followed
by the same command finishes the harvest with every image exactly once and no torn
line. Kill instants are drawn from a seeded `random.Random`, so a failure names the
seed and replays the same plan (the instants themselves still depend on the machine's
speed, which is why nothing here asserts on timing).

Between kills the output is checked the way a user could: every complete line parses
and is unique, `harvest status` exits 0, the committed count never goes down, and the
committed lines are never rewritten by a later run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import (
    HARVEST,
    expected_ids,
    harvest,
    ids_of,
    make_dataset,
    read_items,
    write_config,
)
from crawler.testing.fakeapi import Dataset, FakeServer, FaultSpec
from crawler.testing.fakeapi.background import ServerThread

VERSIONS = {5001: 700, 5002: 500, 5003: 300}  # ~1,400 visible images over 3 versions
VERSION_IDS = list(VERSIONS)
# limit 10 at 80 requests/s: ~160 pages, an uninterrupted run lasts ~2 s.
LIMIT = 10
RPS = 80
STATE_FILE = "harvest.sqlite"
_STATUS_TOTAL = re.compile(r"^(\d+) images in (\d+) file", re.MULTILINE)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return make_dataset(VERSIONS, hidden_rate=0.05)


@pytest.fixture
def api(dataset: Dataset) -> Iterator[FakeServer]:
    with ServerThread(dataset) as server:
        yield server


def by_model(**extra: Any) -> dict[str, Any]:
    return {
        "name": "by-model",
        "modelId": 500,
        "browsingLevel": 31,
        "limit": LIMIT,
        "sort": "Newest",
        **extra,
    }


def config(
    tmp_path: Path, api: FakeServer, queries: Sequence[Mapping[str, Any]] | None = None, **api_options: Any
) -> Path:
    options = {"requests_per_second": RPS, **api_options}
    return write_config(tmp_path / "harvest.toml", api.base_url, queries or [by_model()], **options)


# ------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}


@dataclass
class Attempt:
    """One `harvest run` that was (meant to be) interrupted."""

    how: str  # how the kill instant was chosen
    delay: float
    code: int
    stderr: str
    committed: int  # images committed afterwards, per `harvest status` (-1: not checked yet)


@dataclass
class Harness:
    """Spawns `harvest run cfg`, interrupts it, and checks the output between runs."""

    cfg: Path
    expected: set[int]
    seed: int
    attempts: list[Attempt] = field(default_factory=list)
    committed_prefixes: list[list[bytes]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.cfg.parent / "out"

    def where(self) -> str:
        return f"seed={self.seed}, attempts so far: " + ", ".join(
            f"{a.how}+{a.delay:.3f}->rc {a.code}/{a.committed if a.committed >= 0 else '?'}"
            for a in self.attempts
        )

    def on_disk_size(self) -> int:
        return sum(p.stat().st_size for p in self.out.glob("*.ndjson")) if self.out.exists() else 0

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """Every file in the output dir with its size and mtime: changes on any write."""
        try:
            entries = list(os.scandir(self.out))
        except FileNotFoundError:
            return ()
        found = []
        for entry in entries:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            found.append((entry.name, st.st_size, st.st_mtime_ns))
        return tuple(sorted(found))

    def wait_for_changes(self, proc: subprocess.Popen[bytes], changes: int, limit: float = 30.0) -> None:
        """Busy-poll the output dir until it has changed `changes` times, to kill right after a write
        (the appended page not yet committed, or the commit just made): the narrow windows."""
        deadline = time.monotonic() + limit
        last = self.signature()
        while changes > 0 and proc.poll() is None and time.monotonic() < deadline:
            now = self.signature()
            if now != last:
                changes, last = changes - 1, now

    def spawn(self) -> tuple[subprocess.Popen[bytes], Path]:
        errfile = self.cfg.parent / f"stderr-{len(self.attempts):03d}.txt"
        with errfile.open("wb") as err:
            proc = subprocess.Popen(
                [HARVEST, "run", str(self.cfg)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_env(),
            )
        return proc, errfile

    def wait_for_progress(self, proc: subprocess.Popen[bytes], start_size: int, limit: float = 30.0) -> None:
        """Block until the output on disk changes (the run is past its start) or the run ends."""
        deadline = time.monotonic() + limit
        while proc.poll() is None and time.monotonic() < deadline:
            if self.on_disk_size() != start_size:
                return
            time.sleep(0.005)

    def interrupt(self, how: str, delay: float, *signals: int) -> Attempt:
        """Start a run; after `delay` seconds from the spawn ("spawn") or from its first write
        ("after-write"), or right after the output dir's `delay`-th change ("on-change"),
        send `signals` back to back (SIGKILL if none); then check the output it left."""
        start_size = self.on_disk_size()
        proc, errfile = self.spawn()
        try:
            if how == "after-write":
                self.wait_for_progress(proc, start_size)
            if how == "on-change":  # `delay` is a number of changes here, the kill immediate
                self.wait_for_changes(proc, int(delay))
            else:
                time.sleep(delay)
            if proc.poll() is None:
                for sig in signals or (signal.SIGKILL,):
                    os.kill(proc.pid, sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = errfile.read_text(errors="replace")
        attempt = Attempt(how, delay, code, stderr, committed=-1)
        self.attempts.append(attempt)
        attempt.committed = self.check_between_runs()
        return attempt

    def committed_count(self) -> int:
        """Images the state has committed, as `harvest status` reports them (0 before any state)."""
        if not (self.out / STATE_FILE).exists():
            return 0
        status = harvest("status", self.cfg)
        assert status.code == 0, f"harvest status exited {status.code}: {status.stderr} ({self.where()})"
        match = _STATUS_TOTAL.search(status.stdout)
        assert match, f"no total in harvest status output: {status.stdout!r}"
        return int(match.group(1))

    def check_between_runs(self) -> int:
        """The output of a stopped run: complete lines unique and expected, committed work intact."""
        lines: list[bytes] = []
        for segment in sorted(self.out.glob("*.ndjson")) if self.out.exists() else []:
            data = segment.read_bytes()
            lines += data[: data.rfind(b"\n") + 1].splitlines()  # a torn tail is allowed until the rerun
        ids = [orjson.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)), f"an id is written twice before the rerun ({self.where()})"
        assert set(ids) <= self.expected, f"unexpected ids {sorted(set(ids) - self.expected)[:5]}"
        committed = self.committed_count()
        assert committed <= len(lines), (
            f"state committed {committed} images but only {len(lines)} complete lines are on disk "
            f"({self.where()})"
        )
        if self.attempts[:-1]:
            before = self.attempts[-2].committed
            assert committed >= before, f"committed work went from {before} to {committed} ({self.where()})"
        self.committed_prefixes.append(lines[:committed])
        return committed

    def finish(self) -> list[dict[str, Any]]:
        """Run to the end; the result is exact and keeps every line committed along the way."""
        result = harvest("run", self.cfg)
        assert result.code == 0, f"final run exited {result.code}: {result.stderr} ({self.where()})"
        items = read_items(self.out)  # fails on a torn line
        ids = ids_of(items)
        duplicates = len(ids) - len(set(ids))
        assert duplicates == 0, f"{duplicates} ids written more than once ({self.where()})"
        missing, extra = self.expected - set(ids), set(ids) - self.expected
        assert not missing and not extra, (
            f"{len(missing)} ids missing (e.g. {sorted(missing)[:5]}), {len(extra)} extra "
            f"(e.g. {sorted(extra)[:5]}) ({self.where()})"
        )
        final_lines = [
            line for seg in sorted(self.out.glob("*.ndjson")) for line in seg.read_bytes().splitlines()
        ]
        for n, prefix in enumerate(self.committed_prefixes):
            assert final_lines[: len(prefix)] == prefix, (
                f"lines committed before interruption {n + 1} were rewritten ({self.where()})"
            )
        assert self.committed_count() == len(self.expected)
        return items


def mid_harvest(attempts: Sequence[Attempt], total: int) -> int:
    """How many interruptions landed while the harvest was under way and committed something."""
    count, before = 0, 0
    for a in attempts:
        if before < a.committed < total:
            count += 1
        before = a.committed
    return count


def last_run(h: Harness) -> dict[str, Any]:
    """The summary the latest run left in the output dir (tests remove it before each run)."""
    summary: dict[str, Any] = orjson.loads((h.out / "last-run.json").read_bytes())
    return summary


def committed_by_last_attempt(h: Harness) -> int:
    before = h.attempts[-2].committed if len(h.attempts) > 1 else 0
    return h.attempts[-1].committed - before


# ------------------------------------------------------------------ kill -9


@pytest.mark.parametrize("seed", [20240917])
def test_sigkill_at_many_instants_then_resume_is_exact(
    tmp_path: Path, api: FakeServer, dataset: Dataset, seed: int
) -> None:
    rng = random.Random(seed)
    expected = expected_ids(dataset, VERSION_IDS)
    h = Harness(config(tmp_path, api), expected, seed)

    # Very early kills first: during start-up, before any commit (state not even open).
    plan: list[tuple[str, float]] = [("spawn", rng.uniform(0.0, 0.04)), ("spawn", rng.uniform(0.0, 0.04))]
    # Then a mix: instants counted from the spawn (start-up, planning, first pages) and
    # from the run's first write to the output (anywhere in the page pipeline).
    rest = [("spawn", rng.uniform(0.05, 0.6)) for _ in range(3)]
    rest += [("after-write", rng.uniform(0.0, 0.3)) for _ in range(5)]
    # And right after a write to the output dir: a page appended but not committed yet,
    # or a commit just made, are the instants a wrong order of writes would show.
    rest += [("on-change", rng.randint(2, 40)) for _ in range(5)]
    rng.shuffle(rest)
    plan += rest

    for how, delay in plan:
        attempt = h.interrupt(how, delay)
        if attempt.code == 0:  # the harvest finished before this kill: nothing left to interrupt
            break
        assert attempt.code == -signal.SIGKILL, f"run exited {attempt.code}: {attempt.stderr} ({h.where()})"

    assert h.attempts[0].code == -signal.SIGKILL and h.attempts[0].committed == 0, h.where()
    assert mid_harvest(h.attempts, len(expected)) >= 3, f"too few kills landed mid-harvest: {h.where()}"
    h.finish()
    status = harvest("status", h.cfg)
    assert status.code == 0, status.stderr


def test_sigkill_again_and_again_on_a_finished_harvest_writes_nothing(
    tmp_path: Path, api: FakeServer, dataset: Dataset
) -> None:
    """A finished harvest, run again (a new pass), adds no line: run to its end or killed mid-pass."""
    h = Harness(config(tmp_path, api, requests_per_second=200), expected_ids(dataset, VERSION_IDS), seed=5)
    h.finish()
    snapshot = {p.name: p.read_bytes() for p in h.out.glob("*.ndjson")}

    again = harvest("run", h.cfg)
    assert again.code == 0, again.stderr
    assert {p.name: p.read_bytes() for p in h.out.glob("*.ndjson")} == snapshot

    # Killed during a pass that finds nothing new. At 2 requests/s that pass lasts at least
    # 1.5 s past its start-up (the /models request, then one page per version, paced evenly);
    # every kill below comes earlier (within 0.3 s of the spawn, or at the first or second
    # change to the output dir: the state opened, the pass begun), so each one lands mid-run.
    slow = h.cfg.read_text().replace("requests_per_second = 200", "requests_per_second = 2")
    assert "requests_per_second = 2\n" in slow
    h.cfg.write_text(slow)
    rng = random.Random(h.seed)
    plan = [("spawn", rng.uniform(0.05, 0.3)) for _ in range(3)]
    plan += [("on-change", rng.randint(1, 2)) for _ in range(3)]
    for how, delay in plan:
        attempt = h.interrupt(how, delay)
        assert attempt.code == -signal.SIGKILL, f"exit {attempt.code}: {attempt.stderr} ({h.where()})"
    h.finish()
    assert {p.name: p.read_bytes() for p in h.out.glob("*.ndjson")} == snapshot


# ------------------------------------------------------------------ graceful signals


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_graceful_signal_stops_consistent_and_resumes_exactly(
    tmp_path: Path, api: FakeServer, dataset: Dataset, sig: signal.Signals, code: int
) -> None:
    h = Harness(config(tmp_path, api), expected_ids(dataset, VERSION_IDS), seed=int(sig))
    rng = random.Random(h.seed)
    for _ in range(3):
        (h.out / "last-run.json").unlink(missing_ok=True)
        # After the first write the signal handlers are surely installed.
        attempt = h.interrupt("after-write", rng.uniform(0.0, 0.3), sig)
        assert attempt.code == code, (
            f"{sig.name}: exit {attempt.code}, want {code}: {attempt.stderr} ({h.where()})"
        )
        # The summary says how the run ended and holds exactly what it committed, the page
        # whose commit the signal interrupted included (that commit finishes and is counted).
        summary = last_run(h)
        assert summary["exit_code"] == code and summary["ok"] is False, summary
        assert committed_by_last_attempt(h) == summary["new_items"], (summary, h.where())
        assert summary["requests"] > 0 and summary["requests"] >= summary["pages"], summary
        resume = [line for line in attempt.stderr.splitlines() if "harvest run" in line]
        assert resume and any(h.cfg.name in line for line in resume), (
            f"no line saying how to resume in stderr: {attempt.stderr!r}"
        )
        # The page being committed was finished: no tail, every line on disk committed.
        on_disk = read_items(h.out)
        assert len(on_disk) == attempt.committed, (
            f"{sig.name}: {len(on_disk)} lines on disk but {attempt.committed} committed ({h.where()})"
        )
    assert mid_harvest(h.attempts, len(h.expected)) >= 2, h.where()
    h.finish()


def test_second_signal_exits_at_once_and_stays_consistent(
    tmp_path: Path, api: FakeServer, dataset: Dataset
) -> None:
    """SIGTERM and SIGINT back to back (kill, then Ctrl-C): the second one exits at once.

    Both may be pending together, so the kernel may deliver either first: the status is
    128 + the first one handled, which the run names in its "finishing the page" line.
    Exiting at once skips the resume line but not last-run.json; what was committed
    stays committed and the rerun is exact.
    """
    h = Harness(config(tmp_path, api), expected_ids(dataset, VERSION_IDS), seed=15)
    rng = random.Random(h.seed)
    at_once = 0
    for _ in range(4):
        (h.out / "last-run.json").unlink(missing_ok=True)
        attempt = h.interrupt("after-write", rng.uniform(0.0, 0.3), signal.SIGTERM, signal.SIGINT)
        handled = re.findall(r" WARNING (SIGINT|SIGTERM): finishing the page", attempt.stderr)
        assert len(handled) == 1, f"want one signal handled gracefully: {attempt.stderr} ({h.where()})"
        code = 128 + signal.Signals[handled[0]]
        assert attempt.code == code, f"exit {attempt.code}, want {code}: {attempt.stderr} ({h.where()})"
        summary = last_run(h)
        assert summary["exit_code"] == code and summary["ok"] is False, summary
        # At once: a commit still in its thread may land after the summary was written.
        assert 0 <= summary["new_items"] <= committed_by_last_attempt(h), (summary, h.where())
        at_once += "harvest run" not in attempt.stderr  # no resume line: it did not get that far
    assert at_once >= 1, f"the second signal never cut the graceful stop short ({h.where()})"
    h.finish()


# ------------------------------------------------------------------ faults, overlap


def test_sigkill_during_faulty_run_then_resume_is_exact(tmp_path: Path, dataset: Dataset) -> None:
    faults = FaultSpec(seed=11, rates=(("500", 0.04), ("reset", 0.03), ("truncated", 0.03)), retry_after=1)
    expected = expected_ids(dataset, VERSION_IDS)
    with ServerThread(dataset, faults) as api:
        h = Harness(config(tmp_path, api, max_backoff=0.05, max_retries=8), expected, seed=31)
        rng = random.Random(h.seed)
        plan = [("spawn", rng.uniform(0.0, 0.04))] + [
            ("after-write", rng.uniform(0.0, 0.35)) for _ in range(5)
        ]
        plan += [("on-change", rng.randint(2, 40)) for _ in range(3)]
        rng.shuffle(plan)
        for how, delay in plan:
            attempt = h.interrupt(how, delay)
            if attempt.code == 0:
                break
            assert attempt.code == -signal.SIGKILL, (
                f"run exited {attempt.code}: {attempt.stderr} ({h.where()})"
            )
        assert mid_harvest(h.attempts, len(expected)) >= 3, h.where()
        h.finish()
        kinds = {r.fault for r in api.log if r.faulted}
    assert kinds & {"500", "reset", "truncated"}, f"no fault was injected: {kinds}"


def test_sigkill_with_overlapping_shards_writes_each_id_once(
    tmp_path: Path, api: FakeServer, dataset: Dataset
) -> None:
    """Two queries over the same versions (by model, newest first; by version list, oldest first)."""
    queries = [
        by_model(limit=20),
        {
            "name": "by-version",
            "modelVersionId": VERSION_IDS,
            "browsingLevel": 31,
            "limit": 20,
            "sort": "Oldest",
        },
    ]
    expected = expected_ids(dataset, VERSION_IDS)
    h = Harness(config(tmp_path, api, queries), expected, seed=47)
    rng = random.Random(h.seed)
    plan = [("spawn", rng.uniform(0.0, 0.04))] + [("after-write", rng.uniform(0.0, 0.3)) for _ in range(5)]
    plan += [("on-change", rng.randint(2, 40)) for _ in range(3)]
    rng.shuffle(plan)
    for how, delay in plan:
        attempt = h.interrupt(how, delay)
        if attempt.code == 0:
            break
        assert attempt.code == -signal.SIGKILL, f"run exited {attempt.code}: {attempt.stderr} ({h.where()})"
    assert mid_harvest(h.attempts, len(expected)) >= 3, h.where()
    h.finish()

    # Both walks really happened, so the ids really overlapped (each walk covers every version).
    sorts = {r.query.get("sort") for r in api.log.for_path("/api/v1/images") if r.status == 200}
    assert sorts >= {"Newest", "Oldest"}, sorts
    status = harvest("status", h.cfg)
    assert status.code == 0 and status.stdout.count("done") >= 6, status.stdout
