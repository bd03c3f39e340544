"""`harvest`: the parser and `main`. Turns every HarvestError into one line and an exit status.

Each subcommand lives in a module of its own (`run`, `status`, `verify`, `repair`, `media`,
`refresh`, `export`, `sql`, `demo`);
this module parses the command line, sets up logging from it and dispatches.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from crawler import __version__
from crawler.cli import logs
from crawler.cli.logs import DEFAULT_PROGRESS_EVERY, LOG_FORMATS, LogOptions, StderrHandler
from crawler.cli.media import ENGINES, cmd_media, positive
from crawler.cli.refresh import cmd_refresh, duration
from crawler.cli.repair import cmd_repair
from crawler.cli.run import cmd_run
from crawler.cli.status import cmd_status
from crawler.cli.verify import cmd_verify
from crawler.config import API_KEY_ENV, AUTO, ApiConfig, MediaConfig, OutputConfig, api_key, load_config
from crawler.crawl.media_ray import TASK_ITEMS, RayOptions
from crawler.crawl.watch import Progress
from crawler.errors import ExitCode, HarvestError
from crawler.export.options import DEFAULT_FILE_MB, FORMATS, SQL_OUTPUT_FORMATS

log = logging.getLogger("harvest")

EPILOG = """\
exit status:
  0    every shard finished
  1    the run cannot go on (API key rejected, region blocked, disk full, state broken)
  2    bad config, usage or CIVITAI_API_KEY: nothing was requested
  3    some shards failed (rerun the same command to resume), or are capped (images out of reach),
       or some media files failed (a rerun tries them again), or a refresh batch failed for good
  4    another harvest holds the output dir
  130  interrupted by SIGINT, 143 by SIGTERM; committed work is kept, rerun to resume

The API key is read from the environment variable CIVITAI_API_KEY (surrounding whitespace, such as a
trailing newline, is ignored; any other control character is refused) and is never printed.
"""


_API_HELP = {
    "base_url": "the API (any mirror, or the bundled fake); no user:password@ (the key: CIVITAI_API_KEY)",
    "requests_per_second": "one budget shared by all workers, at least 0.001; "
    "lowered for a while after repeated 429/503",
    "concurrency": 'requests in flight at most; "auto": about requests_per_second x p90 latency '
    "as observed (2..64), with walks split so that many are busy",
    "timeout": "seconds for one whole request",
    "max_retries": "retries of one request after its first attempt; then the shard stops, the run exits 3",
    "max_backoff": "seconds: cap of the exponential backoff when no Retry-After is given",
    "walk_cap": "positions deep the server lets one walk go; deeper shards are split, walked from both ends",
    "max_page_mb": "MiB: an answer larger than this (decompressed) is a failed attempt, read no further",
    "max_wait": "seconds: the longest Retry-After waited for; a longer one stops the shard, "
    "saying when to rerun",
    "max_pages_without_new": "pages in a row with no image new to the walk (fresh cursors, old images); "
    "then the shard stops",
}
_OUTPUT_HELP = {
    "segment_items": "close a segment after this many images (0: no limit)",
    "segment_mb": "close a segment once it holds this many MiB (0: no limit)",
    "compress": "closed segments: zstd, gzip or none",
    "publish": 'closed segments and media files are uploaded to "s3://bucket/prefix" (None: not); '
    "endpoint and credentials from AWS_* variables and ~/.aws only",
    "keep_local": "false: local copies of published segments and media are deleted once recorded",
}


def _shown(value: object) -> object:
    return AUTO if value is None else value  # the one None default: concurrency


def _config_reference() -> str:
    """The config keys with their defaults, read from the dataclasses so they never drift."""
    api, output = ApiConfig(), OutputConfig(Path("."))

    def row(key: str, value: object, text: str) -> str:
        shown = f'"{value}"' if isinstance(value, str) else str(value)
        return f"  {key} = {shown}\n      {text}"

    lines = ["config [api], with defaults (the retry budgets among them):"]
    lines += [row(k, _shown(getattr(api, k)), text) for k, text in _API_HELP.items()]
    lines += [
        "config [output]:",
        "  dir (required)",
        "      where the harvest is written, relative to the config file",
    ]
    lines += [row(k, getattr(output, k), text) for k, text in _OUTPUT_HELP.items()]
    lines += ["config [[queries]]: the API's own parameter names (see README); limit defaults to 200"]
    return "\n".join(lines) + "\n" + _media_reference()


_MEDIA_HELP = {
    "download": "harvest run also fetches the media of every committed item (harvest media always does)",
    "variant": '"original", or a width (450, 512, 800, 1200, ...): the CDN\'s resized form '
    "(videos: always the video itself)",
    "types": 'the item types whose media is fetched: "image", "video", "audio"',
    "requests_per_second": "the CDN's own budget, apart from the API's",
    "concurrency": "downloads in flight at most",
    "timeout": "seconds without a byte (connecting or in a body) fail an attempt",
    "max_retries": "retries of one file after its first attempt; then it is failed (a rerun tries again)",
    "max_backoff": "seconds: cap of the exponential backoff",
    "video_base": "where videos themselves are served (the CDN's original=true form of a video is a still)",
}


def _media_reference() -> str:
    media = MediaConfig(Path("media"))
    lines = ["config [media], with defaults:", '  dir = "media"\n      relative to output.dir']
    for key, text in _MEDIA_HELP.items():
        value = getattr(media, key)  # json's spelling of these values is TOML's too
        lines.append(
            f"  {key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}\n      {text}"
        )
    return "\n".join(lines) + "\n"


# -- the parser ------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with every command line error as one line naming the culprit, and exit 2.

    argparse prints its usage block before the error; here the error is the whole answer, like
    every other bad input, and points at `--help` for the usage. Subparsers are made of this class
    too (`add_subparsers` takes the parent's), so this is the one place for every subcommand.
    """

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())  # one line, whatever a type's message held
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {line} (see {self.prog} --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:  # argparse names no subcommand here: name the one the flag was given to
            self.subcommand(parsed).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def subcommand(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the subcommand `parsed` holds (this one when there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(parsed, action.dest, None)
                return action.choices[name] if isinstance(name, str) and name in action.choices else self
        return self


def build_parser() -> Parser:
    parser = Parser(
        prog="harvest",
        description="Exactly-once, resumable bulk harvester for Civitai's images API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"harvest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every subcommand takes the logging flags; those that run a harvest also --progress-every.
    common, running = _common_flags(progress=False), _common_flags(progress=True)
    run = sub.add_parser(
        "run",
        parents=[running],
        help="harvest a config into its output dir (rerun to resume)",
        epilog=_config_reference() + "\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", type=Path, help="TOML config file")
    status = sub.add_parser(
        "status", parents=[common], help="show where every shard of a config's harvest stands"
    )
    status.add_argument("config", type=Path, help="TOML config file")
    check = sub.add_parser(
        "verify", parents=[common], help="check the output against the state (exit 0 when sound)"
    )
    check.add_argument("config", type=Path, help="TOML config file")
    mend = sub.add_parser(
        "repair",
        parents=[common],
        help="rebuild the state from the segment files, when a run says they disagree",
    )
    mend.add_argument("config", type=Path, help="TOML config file")
    media = sub.add_parser(
        "media",
        parents=[running],
        help="fetch the media files of every committed image (only the media stage)",
        description="Download the image and video files the harvested items point to, into "
        "[media] dir: each once, verified (SHA-256 recorded), resumable. `harvest run` does the "
        "same as it harvests when [media] download = true. With --engine ray, Ray workers download "
        "(into the object store when [output] publish is set) and this process records.",
        epilog=_media_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    media.add_argument("config", type=Path, help="TOML config file")
    media.add_argument(
        "--retry-gone", action="store_true", help="ask again for media the CDN said was gone (404/410)"
    )
    media.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process downloads (the default); ray: Ray workers download, this process "
        "records (pip install 'civitai-harvest[ray]')",
    )
    media.add_argument(
        "--address",
        metavar="ADDR",
        help="with --engine ray: the running Ray cluster to use: HOST:PORT of its head's GCS (on a "
        "node of the cluster), or ray://HOST:PORT of its Ray Client server (from anywhere); without "
        "it a local Ray is started for the run",
    )
    media.add_argument(
        "--task-items",
        type=positive,
        metavar="N",
        help=f"with --engine ray: items per Ray task (default {TASK_ITEMS})",
    )
    media.add_argument(
        "--workers",
        type=positive,
        metavar="N",
        help="with --engine ray: tasks at once, each with 1/N of [media]'s budget (default: the "
        "cluster's CPUs; at most [media] concurrency)",
    )
    fresh = sub.add_parser(
        "refresh",
        parents=[running],
        help="observe the harvested images again (stats, levels, gone) into refresh segments",
        description="Ask the API again for the ids the output dir holds, 100 a request (ids=), under "
        "the [api] budget and cooldown, and append one observation per id (stats, nsfwLevel, "
        "browsingLevel, or gone: hidden or deleted) to refresh-NNNNNN.ndjson. Exactly once per "
        "pass; rerun the same command after any interruption to resume the pass.",
    )
    fresh.add_argument("config", type=Path, help="TOML config file")
    fresh.add_argument(
        "--older-than",
        type=duration,
        metavar="AGE",
        help="only ids whose latest observation (or first sight) is older than AGE: 7d, 12h, 30m, 2w",
    )
    _add_export(sub, common)
    _add_sql(sub, common)
    demo = sub.add_parser(
        "demo", parents=[running], help="harvest a sample from the bundled fake API on loopback"
    )
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where to write (default: ./demo)")
    return parser


def _add_export(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write the harvested images (and refresh observations) as typed Parquet or gzipped JSON lines",
        description="Write the images of a config's harvest as typed Parquet files (or gzipped JSON "
        "lines): only what is new since the last export into the same dir, unless --full. The "
        "observations of harvest refresh go to observations/, the latest per id to latest/. "
        "The columns are listed in the README.",
    )
    export.add_argument("config", type=Path, help="TOML config file")
    export.add_argument(
        "--to",
        metavar="DIR",
        help="the export dir (default: OUTPUT_DIR/export), or s3://bucket/prefix (see Object storage)",
    )
    export.add_argument("--format", choices=FORMATS, default="parquet", help="file format (default: parquet)")
    export.add_argument("--full", action="store_true", help="export everything again, replacing the files")
    export.add_argument(
        "--file-mb",
        type=_megabytes,
        default=DEFAULT_FILE_MB,
        metavar="MB",
        help=f"start a new file once one holds this many MiB (default {DEFAULT_FILE_MB:g})",
    )


def _add_sql(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    sql = sub.add_parser(
        "sql",
        parents=[common],
        help="query the harvest with SQL (embedded DuckDB): images, media, observations, latest, shards, "
        "segments",
        description="Run SQL over a config's harvest in an embedded DuckDB. Views: images (the export's "
        "columns, from the committed lines, with media_* as the media ledger says now and the latest "
        "observation of harvest refresh: observed_at, gone, latest_stats, latest_nsfwLevel, "
        "latest_browsingLevel), media (the media ledger), observations (every observation of harvest "
        "refresh), latest (the latest per id), shards and segments (from the state).",
    )
    sql.add_argument("config", type=Path, help="TOML config file")
    sql.add_argument("query", help='the SQL, e.g. "SELECT baseModel, count(*) FROM images GROUP BY 1"')
    sql.add_argument(
        "--format",
        choices=SQL_OUTPUT_FORMATS,
        default="table",
        help="table (default), csv or json (an array)",
    )


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of MiB")
    return value


def _common_flags(progress: bool) -> Parser:
    """`-v`, `-q`, `--log-format` and, where a harvest runs, `--progress-every`."""
    flags = Parser(add_help=False)
    group = flags.add_mutually_exclusive_group()
    more = "log every page" if progress else "log debug lines"
    group.add_argument("-v", "--verbose", action="store_true", help=f"{more}; tracebacks of internal errors")
    less = "log warnings and errors only" + ("; no progress" if progress else "")
    group.add_argument("-q", "--quiet", action="store_true", help=less)
    flags.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines on stderr as text (default) or as one JSON object a line",
    )
    if progress:
        flags.add_argument(
            "--progress-every",
            type=_seconds,
            default=DEFAULT_PROGRESS_EVERY,
            metavar="SECONDS",
            help="off a terminal (or with json logs), log the totals every SECONDS "
            f"(default {DEFAULT_PROGRESS_EVERY:g}); on a terminal a live table is shown instead; "
            "0: no progress",
        )
    return flags


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (off) or a positive number of seconds")
    return value


def log_options(args: argparse.Namespace) -> LogOptions:
    """The parsed logging flags as one value; commands that run nothing show no progress."""
    return LogOptions(
        log_format=args.log_format,
        verbose=args.verbose,
        quiet=args.quiet,
        progress_every=getattr(args, "progress_every", 0.0),
    )


# -- main ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if misplaced := _ray_only(args):
        parser.subcommand(args).error(f"{misplaced} is an option of --engine ray")
    options = log_options(args)
    key = os.environ.get(API_KEY_ENV, "").strip() or None  # to redact, even one `api_key` refuses
    handler = setup_logging(options, key)
    try:
        return _dispatch(args, lambda: logs.new_progress(options, handler))
    except HarvestError as exc:
        print(f"harvest: error: {redact(str(exc), key)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, the committed state is intact
        log.debug("internal error", exc_info=True)
        detail = redact(f"{type(exc).__name__}: {exc}", key)
        print(f"harvest: internal error: {detail} (rerun resumes; -v shows the traceback)", file=sys.stderr)
        return ExitCode.ERROR


def _ray_only(args: argparse.Namespace) -> str | None:
    """The first option of `--engine ray` given to `harvest media` without it, if any."""
    if args.command != "media" or args.engine == "ray":
        return None
    flags = (("--address", args.address), ("--workers", args.workers), ("--task-items", args.task_items))
    return next((flag for flag, value in flags if value is not None), None)


def _dispatch(args: argparse.Namespace, watcher: Callable[[], Progress]) -> int:
    if args.command == "demo":
        from crawler.cli.demo import run_demo  # the fake API is only loaded when asked for

        return run_demo(args.dir, lambda config, demo_key: cmd_run(config, demo_key, watcher()))
    config = load_config(args.config)
    if args.command == "run":  # only a run sends the key: a bad one stops nothing else
        return cmd_run(config, api_key(os.environ), watcher())
    if args.command == "media":
        ray = RayOptions(args.address, args.task_items or TASK_ITEMS, args.workers)
        return cmd_media(config, watcher(), retry_gone=args.retry_gone, engine=args.engine, ray=ray)
    if args.command == "refresh":
        return cmd_refresh(config, api_key(os.environ), watcher(), args.older_than)
    if args.command == "status":
        return cmd_status(config)
    if args.command == "repair":
        return cmd_repair(config)
    # DuckDB and pyarrow load in about a second: only for the commands that use them.
    if args.command == "export":
        from crawler.cli.export import cmd_export

        return cmd_export(config, args.to, args.format, args.full, args.file_mb)
    if args.command == "sql":
        from crawler.cli.sql import cmd_sql

        return cmd_sql(config, args.query, args.format)
    return cmd_verify(config)


def setup_logging(options: LogOptions, key: str | None) -> StderrHandler:
    """Text or JSON lines on stderr, as `options` say; the key is redacted from every line."""
    return logs.configure(log, options, redact=functools.partial(redact, key=key))


def redact(text: str, key: str | None) -> str:
    """Belt and braces: the key is never put into messages, but never let one through."""
    return text.replace(key, "[redacted]") if key else text


if __name__ == "__main__":
    sys.exit(main())
