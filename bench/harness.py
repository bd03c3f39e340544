"""Processes of the benchmark: starting the fake API, running a measured child, writing specs and configs."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crawler.testing import configs

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HARVEST = str(Path(sys.executable).with_name("harvest"))
MODEL_ID = 500
CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """The environment of every child: no API key, no proxies (everything is on loopback)."""
    drop = {
        "CIVITAI_API_KEY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def split_versions(total: int, n: int, first_id: int = 5001) -> list[tuple[int, int]]:
    """n versions holding `total` images in all, as even as possible."""
    return [(first_id + k, total // n + (1 if k < total % n else 0)) for k in range(n)]


def dataset_spec(versions: Sequence[tuple[int, int]], *, seed: int = 20_240_601) -> dict[str, Any]:
    """One model (MODEL_ID) with the given (versionId, images).

    overlap 0: every served image is new to the harvest, so items served (baseline, ceiling) and
    items written (harvest) count the same thing. hidden_rate 0.02 keeps the short pages.
    """
    return {
        "seed": seed,
        "models": {str(MODEL_ID): {"versions": [{"id": v, "images": n} for v, n in versions]}},
        "overlap": 0.0,
        "hidden_rate": 0.02,
    }


def write_config(path: Path, base_url: str, query: Mapping[str, Any], out: str = "out", **api: Any) -> Path:
    """A harvest config whose output dir is path.parent / out; the pace is the server's to set."""
    api = {"requests_per_second": 100_000, "concurrency": 4, "timeout": 60, "max_backoff": 1.0, **api}
    return configs.write_config(path, base_url, [query], out, **api)


def harvest_query(limit: int = 200) -> dict[str, Any]:
    return {
        "name": "bench",
        "modelId": MODEL_ID,
        "browsingLevel": 31,
        "withMeta": True,
        "sort": "Newest",
        "limit": limit,
    }


class WorkDir:
    """A scratch dir under the system temp dir, removed on exit (a 1M harvest writes about 1 GB)."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.path = Path(tempfile.mkdtemp(prefix="harvest-bench-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- the server


def proc_cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of a live process, from /proc (10 ms resolution)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (every core), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / CLK_TCK


class Server:
    """The fake API as its own process on an ephemeral loopback port."""

    def __init__(
        self,
        spec: Mapping[str, Any],
        workdir: Path,
        *,
        module: str = "crawler.testing.fakeapi",
        args: Sequence[str] = (),
        start_timeout: float = 120,
    ) -> None:
        self.spec_path = workdir / "spec.json"
        self.spec_path.write_text(json.dumps(spec))
        self.module = module
        self.args = list(args)
        self.start_timeout = start_timeout
        self.stderr_path = workdir / "server.stderr"
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.stats: dict[str, Any] | None = None  # what bench.server prints on exit

    def __enter__(self) -> Server:
        cmd = [PYTHON, "-m", self.module, "--port", "0", "--spec", str(self.spec_path), *self.args]
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=child_env()
            )
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self.start_timeout)
        except queue.Empty:
            line = ""
        prefix = "listening on "
        if not line.startswith(prefix):
            self.__exit__()
            raise RuntimeError(
                f"{self.module} did not start: {line!r} {self.stderr_path.read_text()[-2000:]}"
            )
        self.base_url = line[len(prefix) :].strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.__exit__()
            raise RuntimeError(f"server not on loopback: {self.base_url}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        for line in (rest or "").splitlines():
            if line.startswith("{"):
                self.stats = json.loads(line)


# ---------------------------------------------------------------- measured children


@dataclass
class Measured:
    """One child process, reaped with wait4: its own CPU and peak RSS."""

    cmd: list[str]
    code: int
    wall: float  # seconds from spawn to exit
    user: float
    sys: float
    maxrss_mb: float  # ru_maxrss (KiB on Linux) / 1024
    stdout: str
    stderr: str
    server_cpu: float = float("nan")  # CPU seconds the server spent meanwhile
    other_cpu: float = float("nan")  # CPU seconds every other process on the machine spent meanwhile
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def run_measured(
    cmd: Sequence[str], *, timeout: float, cwd: Path = ROOT, server: Server | None = None
) -> Measured:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        server_before = server.cpu_seconds() if server else float("nan")
        busy_before = system_busy_seconds()
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, cwd=cwd, env=child_env(), text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        server_cpu = server.cpu_seconds() - server_before if server else float("nan")
        ours = usage.ru_utime + usage.ru_stime + (server_cpu if server else 0.0)
        other_cpu = max(0.0, system_busy_seconds() - busy_before - ours)
        out.seek(0)
        err.seek(0)
        return Measured(
            list(cmd),
            proc.returncode,
            wall,
            usage.ru_utime,
            usage.ru_stime,
            usage.ru_maxrss / 1024,
            out.read(),
            err.read(),
            server_cpu,
            other_cpu,
        )


def run_harvest(config: Path, *, timeout: float, server: Server | None = None) -> Measured:
    """`harvest run config`, as a user runs it; adds last-run.json under .extra['summary']."""
    cmd = [HARVEST, "run", str(config)]
    m = run_measured(cmd, timeout=timeout, server=server)
    summary_path = config.parent / "out" / "last-run.json"
    if m.code != 0 or not summary_path.exists():
        raise RuntimeError(f"harvest exited {m.code}: {m.stderr[-3000:]}")
    m.extra["summary"] = json.loads(summary_path.read_text())
    return m


def run_script(script: str, args: Sequence[str], *, timeout: float, server: Server | None = None) -> Measured:
    """bench/<script> as its own process; its last stdout line is a JSON object put in .extra."""
    m = run_measured([PYTHON, str(ROOT / "bench" / script), *args], timeout=timeout, server=server)
    if m.code != 0:
        raise RuntimeError(f"{script} exited {m.code}: {m.stderr[-3000:]}")
    m.extra = json.loads(m.stdout.strip().splitlines()[-1])
    return m
