"""Scenario 5, the soak: a long faulty harvest killed with SIGKILL a few times, resumed, exact at the end.

    python -m bench --only soak            # as part of the benchmark (not CI)
    python -m bench.soak --port 0 --spec spec.json --faults faults.json   # its server

One model, 6 versions, 100,000 images (10,000 with --quick), withMeta, the fake's
default overlap between versions (so shards share images: dedupe across shards)
and 2% hidden rows. About 10% of responses are faults, every kind but the
run-fatal 451. `harvest run -q` is started, SIGKILLed 3-5 times at seeded-random
points spread over the harvest (each once the output has grown past a drawn
fraction of the expected images, plus a random few hundred ms), and rerun until
it exits 0. Then every line of every segment must parse, no id may come twice,
the id set must equal the dataset's exactly, and `harvest verify` must pass.

Killed runs write no last-run.json, so requests are counted on the server too:
this module's server is the fake API with bench.server's counting middleware
outermost plus a fault injector that counts the kinds it drew; it prints both
as one JSON line on SIGTERM, like bench.server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bench.harness import (
    HARVEST,
    MODEL_ID,
    ROOT,
    Server,
    WorkDir,
    child_env,
    dataset_spec,
    harvest_query,
    split_versions,
    system_busy_seconds,
    write_config,
)
from bench.server import Tally, _outer
from crawler.archive.compression import read_lines
from crawler.testing.fakeapi import (
    FAULT_KINDS,
    Dataset,
    DatasetSpec,
    FaultInjector,
    FaultSpec,
    ServerOptions,
    make_app,
)

VERSIONS = 6
SEED = 20_251_124  # kill points and fault draws
KILLS = (3, 5)  # SIGKILLs per soak, drawn from this range
SPREAD = (0.08, 0.88)  # kills land while the output holds this fraction of the expected images
JITTER = 0.4  # and up to this many seconds after the point is passed
MIN_GAIN = 0.03  # and never before the run has added this fraction of the expected images
RUN_TIMEOUT = 600.0  # one `harvest run` at most this long
TIMEOUT = 2.0  # [api] timeout; "slow" faults answer after SLOW seconds, so the client gives up first
SLOW = 3.0
API: dict[str, Any] = {
    "requests_per_second": 50.0,
    "concurrency": VERSIONS,
    "timeout": TIMEOUT,
    "max_backoff": 2.0,
    "max_retries": 30,
}
# ~10% of /images and /models answers fail, every kind but 451 (run-fatal: no rerun can help)
RATES = {
    "503": 0.008,  # Retry-After: 1
    "429": 0.008,  # Cloudflare's bare 429
    "429_retry_after": 0.008,
    "challenge": 0.009,
    "challenge_403": 0.009,
    "502": 0.009,
    "504": 0.009,
    "524": 0.009,
    "500": 0.009,
    "reset": 0.009,
    "truncated": 0.009,
    "slow": 0.004,
}
_STATUS_TOTAL = re.compile(r"^(\d+) images in (\d+) file", re.MULTILINE)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fault_spec() -> dict[str, Any]:
    assert set(RATES) == set(FAULT_KINDS) - {"451"}, "every fault kind but 451"
    return {"seed": SEED, "rates": RATES, "retry_after": 1, "slow_seconds": SLOW}


def soak_spec(images: int) -> dict[str, Any]:
    spec = dataset_spec(split_versions(images, VERSIONS))
    del spec["overlap"]  # the fake's default: images shared between versions
    return spec


def expected_ids(spec: dict[str, Any]) -> set[int]:
    """The exact set a complete harvest must hold: the same dataset the server builds."""
    dataset = Dataset(DatasetSpec.from_dict(spec))
    return {i for v in dataset.version_ids(MODEL_ID) for i in dataset.version_image_ids(v, levels=31)}


# ---------------------------------------------------------------- the runs


class Output:
    """The output dir as the bench sees it from outside, while a harvest writes to it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.dir = config.parent / "out"
        self._bytes_per_line = 0.0

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("images-*.ndjson*")) if self.dir.exists() else []

    def size(self) -> int:
        total = 0
        for seg in self.segments():
            try:
                total += seg.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def lines_on_disk(self) -> float:
        """About how many images are on disk: bytes over the mean line length (sampled once)."""
        size = self.size()
        if not self._bytes_per_line:
            segs = self.segments()
            if not segs or size < 256 * 1024 or segs[0].name.endswith((".zst", ".gz")):
                return 0.0 if size < 256 * 1024 else size / 2000  # rough until sampled
            with segs[0].open("rb") as f:
                head = f.read(256 * 1024)
            self._bytes_per_line = len(head[: head.rfind(b"\n") + 1]) / max(head.count(b"\n"), 1)
        return size / self._bytes_per_line

    def committed(self) -> int:
        """Images the state holds, as `harvest status` reports them."""
        status = subprocess.run(
            [HARVEST, "status", str(self.config)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=120,
        )
        match = _STATUS_TOTAL.search(status.stdout)
        if status.returncode != 0 or not match:
            raise RuntimeError(f"harvest status exited {status.returncode}: {status.stdout} {status.stderr}")
        return int(match.group(1))

    def summary(self, since_ns: int) -> dict[str, Any] | None:
        """last-run.json if the run that started at since_ns wrote one."""
        path = self.dir / "last-run.json"
        try:
            if path.stat().st_mtime_ns < since_ns:
                return None
            loaded: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return loaded


def one_run(
    out: Output, server: Server, n: int, kill_at: float | None, jitter: float, min_gain: float
) -> dict[str, Any]:
    """`harvest run -q`; SIGKILLed `jitter` s after the output holds `kill_at` images (and
    `min_gain` more than at its start), if it gets there."""
    if kill_at is not None:  # a kill lands mid-harvest, never before the run has made progress
        kill_at = max(kill_at, out.lines_on_disk() + min_gain)
    errfile = out.config.parent / f"stderr-{n:02d}.txt"
    since_ns = time.time_ns()
    server_before, busy_before = server.cpu_seconds(), system_busy_seconds()
    started = time.perf_counter()
    with errfile.open("w") as err:
        proc = subprocess.Popen(
            [HARVEST, "run", "-q", str(out.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env=child_env(),
        )
    killed_at_lines = None
    deadline = started + RUN_TIMEOUT
    reaped = False
    try:
        while True:  # reaped with wait4 (not Popen.poll) to keep the child's rusage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                reaped = True
                break
            now = time.perf_counter()
            if now > deadline:
                proc.kill()
                raise RuntimeError(f"harvest run {n} outlasted {RUN_TIMEOUT:.0f} s")
            if kill_at is not None and killed_at_lines is None and out.lines_on_disk() >= kill_at:
                time.sleep(jitter)
                proc.send_signal(signal.SIGKILL)
                killed_at_lines = out.lines_on_disk()
                continue
            time.sleep(0.02)
    finally:
        if not reaped:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    server_cpu = server.cpu_seconds() - server_before
    other = max(0.0, system_busy_seconds() - busy_before - cpu - server_cpu)
    rec: dict[str, Any] = {
        "run": n,
        "exit": code,
        "killed": code == -signal.SIGKILL,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "server_cpu_s": round(server_cpu, 2),
        "other_load_cores": round(other / wall, 2) if wall else 0.0,
        "summary": out.summary(since_ns),
    }
    if rec["killed"]:
        rec["kill_point_images"] = round(kill_at or 0)
        rec["on_disk_at_kill_images"] = round(killed_at_lines or 0)
        rec["kill_jitter_s"] = round(jitter, 3)
    if code != 0 and not rec["killed"]:
        rec["stderr"] = errfile.read_text(errors="replace")[-2000:]
    rec["committed_after"] = out.committed() if (out.dir / "harvest.sqlite").exists() else 0
    return rec


def check_output(out: Output, expected: set[int]) -> dict[str, Any]:
    """Every line of every segment parses, no id twice, the id set exactly the expected one."""
    ids: list[int] = []
    bad_lines = torn = 0
    for seg in out.segments():
        for line in read_lines(seg):
            if not line.endswith(b"\n"):
                torn += 1
            try:
                ids.append(orjson.loads(line)["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                bad_lines += 1
    got = set(ids)
    return {
        "segments": len(out.segments()),
        "lines": len(ids) + bad_lines,
        "unparsable_lines": bad_lines,
        "torn_lines": torn,
        "duplicates": len(ids) - len(got),
        "missing": len(expected - got),
        "extra": len(got - expected),
        "exact": bad_lines == 0 and torn == 0 and len(ids) == len(got) and got == expected,
    }


def scenario_soak(images: int, keep: bool) -> dict[str, Any]:
    rng = random.Random(SEED)
    spec = soak_spec(images)
    expected = expected_ids(spec)
    kills = rng.randint(*KILLS)
    lo, hi = SPREAD
    # one kill point in each of `kills` equal slices of the spread: spread over the run, yet random
    points = [len(expected) * (lo + (hi - lo) * (k + rng.random()) / kills) for k in range(kills)]
    jitters = [rng.uniform(0, JITTER) for _ in range(kills)]
    runs: list[dict[str, Any]] = []
    with WorkDir(keep) as wd:
        faults = wd / "faults.json"
        faults.write_text(json.dumps(fault_spec()))
        started = time.perf_counter()
        with Server(spec, wd, module="bench.soak", args=["--faults", str(faults)]) as server:
            config = write_config(wd / "harvest.toml", server.base_url, harvest_query(200), **API)
            out = Output(config)
            while True:
                n = len(runs)
                point = points[n] if n < kills else None
                jitter = jitters[n] if n < kills else 0.0
                rec = one_run(out, server, n, point, jitter, MIN_GAIN * len(expected))
                runs.append(rec)
                log(
                    f"  [5] run {n + 1}: exit {rec['exit']} after {rec['wall_s']:.1f} s, "
                    f"{rec['committed_after']}/{len(expected)} images committed"
                    + (f" (SIGKILL at ~{rec['on_disk_at_kill_images']} on disk)" if rec["killed"] else "")
                )
                if not rec["killed"]:  # done, or failed: a failed last run is a finding, not retried
                    break
            final = runs[-1]
            check = check_output(out, expected)
            verify = subprocess.run(
                [HARVEST, "verify", str(config)], capture_output=True, text=True, env=child_env(), timeout=600
            )
        wall = time.perf_counter() - started
    stats = server.stats or {}
    statuses = stats.get("statuses", {})
    summaries = [r["summary"] for r in runs if r["summary"]]
    killed = [r for r in runs if r["killed"]]

    def harvest_sum(key: str) -> Any:
        return sum(s.get(key, 0) for s in summaries)

    failed_attempts: Counter[str] = Counter()
    for s in summaries:
        failed_attempts.update(s.get("failed_attempts", {}))
    figures = {
        "images": images,
        "versions": VERSIONS,
        "expected_ids": len(expected),
        "kills": len(killed),
        "kills_planned": kills,
        "runs": len(runs),
        "final_exit": final["exit"],
        "committed_at_kills": [r["committed_after"] for r in killed],
        "wall_s": round(wall, 1),
        "harvest_wall_s": round(sum(r["wall_s"] for r in runs), 1),
        "harvest_cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "server_requests": stats.get("requests"),
        "server_statuses": statuses,
        "server_429": statuses.get("429", 0),
        "server_503": statuses.get("503", 0),
        "server_429_503": f"{statuses.get('429', 0)} / {statuses.get('503', 0)}",
        "server_unanswered": statuses.get("0", 0),  # the client gave up first (slow faults, kills)
        "faults_injected": stats.get("faults", {}),
        "faults_injected_total": sum(stats.get("faults", {}).values()),
        "fault_rate": sum(RATES.values()),
        # the runs that wrote last-run.json (killed runs write none)
        "summaries": len(summaries),
        "requests": harvest_sum("requests"),
        "retries": harvest_sum("retries"),
        "rate_limited": harvest_sum("rate_limited"),
        "cooldown_s": round(harvest_sum("cooldown_seconds"), 1),
        "rate_decreases": harvest_sum("rate_decreases"),
        "lowest_rps": min((s["lowest_rps"] for s in summaries if "lowest_rps" in s), default=None),
        "failed_attempts": dict(failed_attempts),
        "new_items_final_run": final["summary"]["new_items"] if final["summary"] else None,
        "output": check,
        "verify_exit": verify.returncode,
        "verify_last_line": verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else "",
        "fault_spec": fault_spec(),
        "config_api": API,
    }
    exact = final["exit"] == 0 and check["exact"]
    why = (
        f"final exit {final['exit']}; {check['lines']} lines, {check['duplicates']} dup, "
        f"{check['missing']} missing, {check['extra']} extra, {check['unparsable_lines']} unparsable"
    )
    targets = [
        _target(f"exact set after {len(killed)} SIGKILLs", f"{len(expected)} ids" if exact else why, exact),
        _target(
            "verify sound",
            figures["verify_last_line"].rsplit(": ", 1)[-1] or f"exit {verify.returncode}",
            verify.returncode == 0,
        ),
    ]
    for r in runs:  # the figures are above; keep each run's record small
        if r["summary"]:
            r["summary"] = {k: r["summary"][k] for k in ("new_items", "requests", "retries", "rate_limited")}
    return {"figures": figures, "runs": runs, "targets": targets}


def _target(what: str, value: str, ok: bool) -> dict[str, Any]:
    return {"scenario": "5", "target": what, "value": value, "pass": bool(ok)}


# ---------------------------------------------------------------- the server


class CountingInjector(FaultInjector):
    """The fake's fault injector, counting what it drew by kind."""

    def __init__(self, spec: FaultSpec) -> None:
        super().__init__(spec)
        self.drawn: Counter[str] = Counter()

    def draw(self) -> str | None:
        kind = super().draw()
        if kind is not None:
            self.drawn[kind] += 1
        return kind


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"loopback only, not {args.host}")
    dataset = Dataset(DatasetSpec.from_dict(json.loads(args.spec.read_text())))
    injector = CountingInjector(FaultSpec.from_dict(json.loads(args.faults.read_text())))
    app = make_app(dataset, injector, options=ServerOptions())
    tally = Tally()
    app.middlewares.insert(0, _outer(tally, 0.0))  # outermost: sees every answer, faults included
    # handler_cancellation: a client that times out on a `slow` fault frees its handler
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on http://127.0.0.1:{port}/api/v1", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return {**tally.as_dict(), "faults": dict(injector.drawn)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description="the soak scenario's server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--faults", type=Path, required=True, help='e.g. {"seed": 1, "rates": {"503": 0.05}}')
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(_serve(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
