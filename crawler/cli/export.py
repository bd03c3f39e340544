"""`harvest export CONFIG`: the archive's committed images as typed Parquet (or gzipped JSON lines).

Only what is new since the last export into the same dir is written, unless `--full`.
A harvest may run meanwhile: only committed lines are read.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from crawler.archive.state import State
from crawler.archive.store import SCHEME, StoreUrl, parse_url
from crawler.config import Config
from crawler.errors import ConfigError, ExitCode
from crawler.export.export import Result, export
from crawler.export.remote import export_to_store

EXPORT_DIR = "export"  # default: beside the segments, in the output dir
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # RFC 3986 scheme, then "//"


def default_dir(config: Config) -> Path:
    return config.output.dir / EXPORT_DIR


def cmd_export(config: Config, to: str | None, fmt: str, full: bool, file_mb: float) -> int:
    where = destination(to) if to is not None else default_dir(config)  # refused before anything is read
    with State.open(config.output.dir, create=False) as state:
        try:
            if isinstance(where, StoreUrl):
                result = export_to_store(config.output.dir, state, where, fmt, full=full, file_mb=file_mb)
            else:
                result = export(config.output.dir, state, where, fmt, full=full, file_mb=file_mb)
        except KeyboardInterrupt:
            print("harvest: export interrupted; nothing of it was kept (run it again)", file=sys.stderr)
            return ExitCode.SIGINT
    _summary(result, fmt, to if to is not None else str(where))  # a URL as given: Path("s3://b") is "s3:/b"
    return ExitCode.OK


def destination(to: str) -> StoreUrl | Path:
    """`--to`: an `s3://` URL, or a local dir (made if missing); any other `scheme://`, and a
    path that is, or lies under, something other than a dir, is the user's to fix."""
    if to.startswith(SCHEME):
        try:
            return parse_url(to)
        except ValueError as error:
            raise ConfigError(f"--to {to}: {error}") from None
    if _URL.match(to):  # else `ftp://x/y` would quietly become a local dir "ftp:"
        raise ConfigError(f'--to {to}: not a local dir, and the only URLs taken are "{SCHEME}bucket/prefix"')
    folder = Path(to)
    for place in (folder, *folder.parents):
        if place.exists():
            if not place.is_dir():
                shown = "" if place == folder else f" ({place} is not a directory)"
                raise ConfigError(f"--to {to}: not a directory{shown}")
            break
    return folder


def _summary(result: Result, fmt: str, where: str) -> None:
    seen = f"; {result.observations} new observations (refresh)" if result.observations else ""
    total = f"{result.total_rows} images in {where}"
    if not result.files:
        what = f"exported {result.observations} new observations (refresh), no new images" if seen else ""
        print(f"harvest: {what or 'nothing new to export'}; {total}", file=sys.stderr)
        return
    ratio = f" ({result.bytes / result.source_bytes:.0%} of the NDJSON)" if result.source_bytes else ""
    print(
        f"harvest: exported {result.rows} {'' if result.full else 'new '}images to {len(result.files)} "
        f"{fmt} file(s), {_size(result.bytes)} from {_size(result.source_bytes)} of NDJSON{ratio} "
        f"in {result.seconds:.1f} s{seen}; {total}",
        file=sys.stderr,
    )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
