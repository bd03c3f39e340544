"""`harvest export CONFIG`: the archive's committed images as typed Parquet (or gzipped JSON lines).

Only what is new since the last export into the same dir is written, unless `--full`.
A harvest may run meanwhile: only committed lines are read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from crawler.archive.state import State
from crawler.archive.store import SCHEME, parse_url
from crawler.config import Config
from crawler.errors import ConfigError, ExitCode
from crawler.export.export import Result, export
from crawler.export.remote import export_to_store

EXPORT_DIR = "export"  # default: beside the segments, in the output dir


def default_dir(config: Config) -> Path:
    return config.output.dir / EXPORT_DIR


def cmd_export(config: Config, to: str | None, fmt: str, full: bool, file_mb: float) -> int:
    folder = Path(to) if to is not None else default_dir(config)
    with State.open(config.output.dir, create=False) as state:
        try:
            if to is not None and to.startswith(SCHEME):
                result = _to_store(config, state, to, fmt, full, file_mb)
                folder = Path(to)  # for the line below: the URL as given
            else:
                result = export(config.output.dir, state, folder, fmt, full=full, file_mb=file_mb)
        except KeyboardInterrupt:
            print("harvest: export interrupted; nothing of it was kept (run it again)", file=sys.stderr)
            return ExitCode.SIGINT
    seen = f"; {result.observations} new observations (refresh)" if result.observations else ""
    total = f"{result.total_rows} images in {folder}"
    if not result.files:
        what = f"exported {result.observations} new observations (refresh), no new images" if seen else ""
        print(f"harvest: {what or 'nothing new to export'}; {total}", file=sys.stderr)
        return ExitCode.OK
    ratio = f" ({result.bytes / result.source_bytes:.0%} of the NDJSON)" if result.source_bytes else ""
    print(
        f"harvest: exported {result.rows} {'' if result.full else 'new '}images to {len(result.files)} "
        f"{fmt} file(s), {_size(result.bytes)} from {_size(result.source_bytes)} of NDJSON{ratio} "
        f"in {result.seconds:.1f} s{seen}; {total}",
        file=sys.stderr,
    )
    return ExitCode.OK


def _to_store(config: Config, state: State, to: str, fmt: str, full: bool, file_mb: float) -> Result:
    try:
        url = parse_url(to)
    except ValueError as error:
        raise ConfigError(f"--to {to}: {error}") from None
    return export_to_store(config.output.dir, state, url, fmt, full=full, file_mb=file_mb)


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
