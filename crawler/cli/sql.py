"""`harvest sql CONFIG "SELECT ..."`: SQL over the harvest in an embedded DuckDB.

The result is a table (rich) by default, or CSV or a JSON array with `--format`.
A query DuckDB refuses, or one with no statement in it, is one line (`harvest: error: SQL: ...`)
and exit status 2.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import duckdb
import orjson
from rich.console import Console
from rich.table import Table

from crawler.archive.state import State
from crawler.config import Config
from crawler.errors import ConfigError, ExitCode
from crawler.export.options import SQL_OUTPUT_FORMATS
from crawler.export.sql import names_cached, session

OUTPUT_FORMATS = SQL_OUTPUT_FORMATS
TABLE_ROWS = 1000  # a table shows this many rows at most; csv and json show all
_BATCH = 10_000


def cmd_sql(config: Config, query: str, fmt: str) -> int:
    try:
        return _sql(config, query, fmt)
    except KeyboardInterrupt:
        print("harvest: sql interrupted", file=sys.stderr)
        return ExitCode.SIGINT


def _sql(config: Config, query: str, fmt: str) -> int:
    _statements(query)
    with State.open(config.output.dir, create=False) as state:
        con = session(config.output.dir, state, images=names_cached(query))
    with con:
        try:
            cursor = con.execute(query)
            names = [d[0] for d in cursor.description or ()]
            rows = _rows(cursor)
            first = next(rows, None)  # DuckDB may fail only once rows are asked for
        except duckdb.Error as exc:
            raise ConfigError(f"SQL: {_one_line(exc)}") from None
        try:
            _print(fmt, names, _chain(first, rows))
        except duckdb.Error as exc:
            raise ConfigError(f"SQL: {_one_line(exc)}") from None
        except BrokenPipeError:  # `harvest sql ... | head`: the reader has gone, as intended
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return ExitCode.OK


def _statements(query: str) -> None:
    """Refuse a query with no statement in it ("", blanks, only comments) before the cache is
    brought up to date for it: DuckDB runs it as nothing and gives no result to print."""
    try:
        with duckdb.connect() as parser:  # in memory: parsing needs no archive
            count = len(parser.extract_statements(query))
    except duckdb.Error:
        return  # a syntax error: the query itself reports it below, as any other
    if not count:
        raise ConfigError(
            "SQL: the query holds no statement (it is empty, blank or only comments); "
            'give one, e.g. "SELECT count(*) FROM images"'
        )


def _rows(cursor: duckdb.DuckDBPyConnection) -> Iterator[tuple[Any, ...]]:
    while batch := cursor.fetchmany(_BATCH):
        yield from batch


def _chain(first: tuple[Any, ...] | None, rest: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    if first is not None:
        yield first
        yield from rest


def _one_line(exc: duckdb.Error) -> str:
    """DuckDB's message without the echo of the query under it, on one line."""
    kept = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            kept.append(line.strip())
    return " ".join(kept) or type(exc).__name__


def _print(fmt: str, names: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
    out = sys.stdout
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([_text(v, "") for v in row] for row in rows)
    elif fmt == "json":
        _print_json(out, names, rows)
    else:
        _print_table(out, names, rows)
    out.flush()


def _print_json(out: TextIO, names: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
    out.write("[")
    for n, row in enumerate(rows):
        out.write(",\n" if n else "\n")
        out.write(_json({name: _plain(value) for name, value in zip(names, row, strict=True)}))
    out.write("\n]\n")


def _print_table(out: TextIO, names: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
    table = Table(*names, show_lines=False)
    shown = 0
    for row in rows:
        if shown == TABLE_ROWS:
            print(
                f"harvest: showing the first {TABLE_ROWS} rows; --format csv or json gives all",
                file=sys.stderr,
            )
            break
        table.add_row(*(_text(v, "NULL") for v in row))
        shown += 1
    # Off a terminal nothing is wrapped: a pipe or a file gets whole values.
    console = Console(file=out, width=None if out.isatty() else 100_000, soft_wrap=not out.isatty())
    console.print(table, markup=False, highlight=False)


def _text(value: Any, null: str) -> str:
    """One value as CSV or a table cell shows it: nested values as JSON."""
    if value is None:
        return null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return _json(_plain(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def _plain(value: Any) -> Any:
    """A query result value as plain JSON data: exact integers, ISO times, nested values kept."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # UUID, interval, ...


def _json(data: Any) -> str:
    try:
        return orjson.dumps(data).decode()
    except TypeError:  # an integer beyond 64 bits (HUGEINT): the standard library writes it exactly
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
