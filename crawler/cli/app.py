"""`harvest`: the command line. Turns every HarvestError into one line and an exit status."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from crawler.archive.lock import OutputLock
from crawler.archive.state import State
from crawler.archive.verify import verify
from crawler.cli import logs
from crawler.cli.report import print_status, write_summary
from crawler.config import ApiConfig, Config, OutputConfig, load_config
from crawler.crawl.pipeline import RunSummary, run_harvest
from crawler.errors import ExitCode, HarvestError

log = logging.getLogger("harvest")
KEY_ENV = "CIVITAI_API_KEY"

EPILOG = """\
exit status:
  0    every shard finished
  1    the run cannot go on (API key rejected, region blocked, disk full, state broken)
  2    bad config or usage: nothing was requested
  3    some shards failed; the others finished. Rerun the same command to resume
  4    another harvest holds the output dir
  130  interrupted by SIGINT, 143 by SIGTERM; committed work is kept, rerun to resume

The API key is read from the environment variable CIVITAI_API_KEY and is never printed.
"""


_API_HELP = {
    "base_url": "the API (any mirror, or the bundled fake)",
    "requests_per_second": "one budget shared by all workers; lowered for a while after repeated 429/503",
    "concurrency": "requests in flight at most",
    "timeout": "seconds for one whole request",
    "max_retries": "retries of one request after its first attempt; then the shard stops, the run exits 3",
    "max_backoff": "seconds: cap of the exponential backoff when no Retry-After is given",
}
_OUTPUT_HELP = {
    "segment_items": "close a segment after this many images (0: no limit)",
    "segment_mb": "close a segment once it holds this many MiB (0: no limit)",
    "compress": "closed segments: zstd, gzip or none",
}


def _config_reference() -> str:
    """The config keys with their defaults, read from the dataclasses so they never drift."""
    api, output = ApiConfig(), OutputConfig(Path("."))

    def row(key: str, value: object, text: str) -> str:
        shown = f'"{value}"' if isinstance(value, str) else str(value)
        return f"  {key} = {shown}\n      {text}"

    lines = ["config [api], with defaults (the retry budgets among them):"]
    lines += [row(k, getattr(api, k), text) for k, text in _API_HELP.items()]
    lines += [
        "config [output]:",
        "  dir (required)",
        "      where the harvest is written, relative to the config file",
    ]
    lines += [row(k, getattr(output, k), text) for k, text in _OUTPUT_HELP.items()]
    lines += ["config [[queries]]: the API's own parameter names (see README); limit defaults to 200"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harvest",
        description="Exactly-once, resumable bulk harvester for Civitai's images API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="harvest a config into its output dir (rerun to resume)",
        epilog=_config_reference() + "\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", type=Path, help="TOML config file")
    _add_verbosity(run)
    status = sub.add_parser("status", help="show where every shard of a config's harvest stands")
    status.add_argument("config", type=Path, help="TOML config file")
    check = sub.add_parser("verify", help="check the output against the state (exit 0 when sound)")
    check.add_argument("config", type=Path, help="TOML config file")
    demo = sub.add_parser("demo", help="harvest a sample from the bundled fake API on loopback")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where to write (default: ./demo)")
    _add_verbosity(demo)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log every page")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only; no progress")
    logs.add_arguments(parser)  # --log-format, --progress-every


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    key = os.environ.get(KEY_ENV) or None
    try:
        if args.command == "run":
            return cmd_run(load_config(args.config), key)
        if args.command == "status":
            return cmd_status(load_config(args.config))
        if args.command == "verify":
            return cmd_verify(load_config(args.config))
        from crawler.cli.demo import run_demo  # the fake API is only loaded when asked for

        return run_demo(args.dir, cmd_run)
    except HarvestError as exc:
        print(f"harvest: error: {redact(str(exc), key)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, the committed state is intact
        log.debug("internal error", exc_info=True)
        detail = redact(f"{type(exc).__name__}: {exc}", key)
        print(f"harvest: internal error: {detail} (rerun resumes; -v shows the traceback)", file=sys.stderr)
        return ExitCode.ERROR


def cmd_run(config: Config, key: str | None) -> int:
    _tune_gc()
    lock = OutputLock(config.output.dir)
    state = State.open(config.output.dir)
    try:
        summary, signum = _run_interruptibly(lambda: run_harvest(config, state, key, logs.new_progress()))
        if signum is not None:
            name = signal.Signals(signum).name
            print(
                f"harvest: interrupted by {name}; committed work is kept. "
                f"Resume with: harvest run {config.path}",
                file=sys.stderr,
            )
            return 128 + signum
        assert summary is not None
        write_summary(config.output.dir, summary)
        logs.log_summary(summary, config)  # in json mode a record with every figure as a field
        return ExitCode.OK if summary.ok else ExitCode.SHARDS_FAILED
    finally:
        state.close()
        lock.release()


def _run_interruptibly(
    make: Callable[[], object],
) -> tuple[RunSummary | None, int | None]:
    """Run the harvest; the first SIGINT/SIGTERM cancels it cleanly, a second exits at once.

    Exiting at once is safe: every commit is one SQLite transaction and an
    uncommitted tail of the output is cut away on the next start.
    """
    caught: list[int] = []

    async def guarded() -> RunSummary | None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if caught:
                os._exit(128 + caught[0])
            caught.append(signum)
            log.warning("%s: finishing the page being committed, then stopping", signal.Signals(signum).name)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await make()  # type: ignore[no-any-return, misc]
        except asyncio.CancelledError:
            if caught:
                return None
            raise

    summary = asyncio.run(guarded())
    # The loop and its handlers are gone; a signal during the last steps (summary,
    # closing the state) still exits cleanly and at once, with the status it asks for.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda got, _frame: os._exit(128 + (caught[0] if caught else got)))
    return summary, (caught[0] if caught else None)


def _tune_gc() -> None:
    """Collect rarely: pages are parsed into many small, acyclic containers whose
    allocation would trigger a young collection several times per page, for nothing
    (measured by `make bench`: ~1 µs of CPU per image). Startup objects are frozen
    out of collections altogether."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_status(config: Config) -> int:
    state = State.open(config.output.dir, create=False)
    try:
        print_status(state, config)
    finally:
        state.close()
    return ExitCode.OK


def cmd_verify(config: Config) -> int:
    state = State.open(config.output.dir, create=False)
    try:
        report = verify(config.output.dir, state)
    finally:
        state.close()
    for line in report.problems + report.notes:
        print(line)
    verdict = "sound" if report.sound else f"NOT sound: {len(report.problems)} problem(s)"
    print(f"{report.lines} images in {report.segments} segment(s) under {config.output.dir}: {verdict}")
    return ExitCode.OK if report.sound else ExitCode.ERROR


def redact(text: str, key: str | None) -> str:
    """Belt and braces: the key is never put into messages, but never let one through."""
    return text.replace(key, "[redacted]") if key else text


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """Text or JSON lines on stderr (`--log-format`), as recorded by the parser; the key never shown."""
    # Both formatters redact every line they produce, whatever reaches them.
    logs.configure(log, verbose, quiet, redact=lambda text: redact(text, os.environ.get(KEY_ENV)))


if __name__ == "__main__":
    sys.exit(main())
