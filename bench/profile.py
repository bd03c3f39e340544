"""Where `harvest` spends its CPU: scenario 1's harvest under cProfile, both of its threads.

    python -m bench.profile [--images 100000] [--versions 6] [--concurrency 6] [--limit 200]
                            [--timer cpu|wall] [--top 30] [--out DIR]

Starts the fake API (its own process), writes the same config as scenario 1 and runs
`harvest run` in a child process under cProfile. Plain `python -m cProfile -m crawler run cfg`
only sees the main thread, but every page is committed (orjson dumps, write, fsync, SQLite) in a
worker thread (asyncio.to_thread), so this wraps Checkpointer.commit with a second profiler that
runs in that thread. The default timer is time.thread_time: each profile counts its own thread's
CPU only, so waiting (epoll, fsync) is not counted. Prints the top functions of each thread and
leaves main.prof and commit.prof in DIR for `python -m pstats`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    PYTHON,
    ROOT,
    Server,
    WorkDir,
    dataset_spec,
    harvest_query,
    run_measured,
    split_versions,
    write_config,
)


def _child(config: Path, out: Path, timer: str) -> int:
    """In the child: run the CLI with the main thread and the committer thread profiled."""
    from crawler.archive import checkpoint
    from crawler.cli import app as cli

    clock: Any = time.thread_time if timer == "cpu" else time.perf_counter
    main_prof, commit_prof = cProfile.Profile(clock), cProfile.Profile(clock)
    original = checkpoint.Checkpointer.commit

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        commit_prof.enable()  # in whichever executor thread runs this commit
        try:
            return original(self, *args, **kwargs)
        finally:
            commit_prof.disable()

    checkpoint.Checkpointer.commit = commit  # type: ignore[method-assign]
    main_prof.enable()
    try:
        code = cli.main(["run", str(config)])
    finally:
        main_prof.disable()
        main_prof.dump_stats(out / "main.prof")
        commit_prof.dump_stats(out / "commit.prof")
    return code


def _show(path: Path, title: str, top: int) -> None:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    print(f"\n===== {title}: {stats.total_tt:.3f} s in profiled functions ({path})")  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    text = buf.getvalue()
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--versions", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--timer", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, help="where to leave the .prof files (default: a temp dir, kept)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, args.out, args.timer)

    spec = dataset_spec(split_versions(args.images, args.versions))
    with WorkDir() as wd, Server(spec, wd) as server:
        out = args.out or Path(str(wd) + "-prof")
        out.mkdir(parents=True, exist_ok=True)
        config = write_config(
            wd / "harvest.toml", server.base_url, harvest_query(args.limit), concurrency=args.concurrency
        )
        cmd = [
            PYTHON,
            "-m",
            "bench.profile",
            "--child",
            str(config),
            "--out",
            str(out),
            "--timer",
            args.timer,
        ]
        m = run_measured(cmd, timeout=1800, cwd=ROOT, server=server)
    if m.code != 0:
        print(m.stderr, file=sys.stderr)
        return m.code
    print(m.stderr.strip())
    print(
        f"child: {m.wall:.2f} s wall, {m.cpu:.2f} s CPU (user {m.user:.2f}, sys {m.sys:.2f}), "
        f"peak RSS {m.maxrss_mb:.0f} MiB; server {m.server_cpu:.2f} s CPU"
    )
    _show(out / "main.prof", "main thread (event loop)", args.top)
    _show(out / "commit.prof", "committer thread (Checkpointer.commit)", args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
