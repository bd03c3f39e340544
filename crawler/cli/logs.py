"""Logging for `harvest`: text or JSON lines on stderr, and which progress watcher a run gets.

- `--log-format text` (the default): `12:00:01 INFO shard ... done`.
- `--log-format json`: one JSON object a line (`ts` ISO 8601 UTC, `level`, `msg`,
  then any structured fields), for log shippers. Every line on stderr is then
  JSON: the lines the CLI prints itself (the run summary, `harvest: error: ...`)
  are turned into records too.
- `--progress-every SECONDS`: on a terminal (text format, not `-q`) a live rich
  table; elsewhere an INFO line with the totals every SECONDS (default 30).
  0 turns progress output off.

The command line is read once into a frozen `LogOptions`; `configure()` and
`new_progress()` take it (and the handler) as arguments, so nothing here is set
aside in module state between a parse and a run.

Whatever is written goes through a `redact` function last, so the API key cannot
leak through a message, a structured field or a traceback.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from crawler.cli.progress import LiveProgress, LogProgress
from crawler.crawl.watch import NoProgress, Progress

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
TEXT_DATEFMT = "%H:%M:%S"
DEFAULT_PROGRESS_EVERY = 30.0

Redact = Callable[[str], str]


def _keep(text: str) -> str:
    return text


# -- the options ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogOptions:
    """How the command being run logs and shows progress; built once from its command line."""

    log_format: str = "text"  # one of LOG_FORMATS
    verbose: bool = False  # DEBUG: every page, the traceback of an internal error
    quiet: bool = False  # WARNING and up; no progress
    progress_every: float = DEFAULT_PROGRESS_EVERY  # seconds; 0: no progress

    @property
    def level(self) -> int:
        return logging.DEBUG if self.verbose else logging.WARNING if self.quiet else logging.INFO


# -- formatters -----------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """`12:00:01 INFO message`, redacted."""

    def __init__(self, redact: Redact = _keep) -> None:
        super().__init__(TEXT_FORMAT, TEXT_DATEFMT)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object: `ts` (ISO 8601 UTC), `level`, `msg`, the record's extra fields, `exc`."""

    def __init__(self, redact: Redact = _keep) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        doc: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RESERVED and not name.startswith("_") and name not in doc:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        try:
            line = orjson.dumps(_scrub(doc, self.redact), default=str, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # a lone surrogate (a file name that is not UTF-8): U+FFFD, not a traceback
            scrubbed = _scrub(doc, lambda text: _encodable(self.redact(text)))
            line = orjson.dumps(
                scrubbed, default=lambda v: _encodable(str(v)), option=orjson.OPT_NON_STR_KEYS
            )
        return self.redact(line.decode())


def _encodable(text: str) -> str:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _scrub(value: Any, redact: Redact) -> Any:
    """Redact every string in a JSON-able value (before escaping could hide a secret)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, redact) for v in value]
    return value


# -- the handler ----------------------------------------------------------------------


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to stderr; while a live display is up, prints through its rich console instead."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.console: Any = None

    def use_console(self, console: Any) -> None:
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        console = self.console
        if console is None:
            super().emit(record)
            return
        try:
            console.out(self.format(record), highlight=False)  # no markup, no wrapping: the line as is
        except Exception:
            self.handleError(record)


def _level_of(line: str) -> int:
    """The level of a line the CLI prints itself (`harvest: error: ...`)."""
    if line.startswith(("harvest: error:", "harvest: internal error:", "harvest: failed:")):
        return logging.ERROR
    if line.startswith("harvest: interrupted"):
        return logging.WARNING
    return logging.INFO


class LinesToRecords(io.TextIOBase):
    """`sys.stderr` in json mode: every line printed to it becomes a log record.

    Records go to the handler directly, so `-q` does not hide the summary or an
    error, just as it does not in text mode.
    """

    def __init__(self, handler: logging.Handler, wrapped: TextIO, name: str = "harvest") -> None:
        super().__init__()
        self.handler = handler
        self.wrapped = wrapped
        self.name = name
        self._pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.wrapped.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.wrapped.encoding

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self.emit_line(line)
        return len(text)

    def flush(self) -> None:
        self.wrapped.flush()

    def emit_line(self, line: str, fields: dict[str, Any] | None = None) -> None:
        if not line.strip():
            return
        record = logging.LogRecord(self.name, _level_of(line), __file__, 0, line, None, None)
        record.__dict__.update(fields or {})
        self.handler.handle(record)


# -- setting it up --------------------------------------------------------------------


def configure(logger: logging.Logger, options: LogOptions, redact: Redact = _keep) -> StderrHandler:
    """Send `logger` to stderr in the chosen format; in json mode every stderr line is JSON.

    Returns the handler: a live display routes log lines through it (`new_progress`).
    """
    stream = sys.stderr
    if isinstance(stream, LinesToRecords):  # configured before, in this process
        stream = stream.wrapped
        sys.stderr = stream
    handler = StderrHandler(stream)
    json_lines = options.log_format == "json"
    handler.setFormatter(JsonFormatter(redact) if json_lines else TextFormatter(redact))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(options.level)
    if json_lines:
        sys.stderr = LinesToRecords(handler, stream, logger.name)
    return handler


def log_summary(summary: Any, config: Any, exit_code: int, out: TextIO | None = None) -> None:
    """`report.print_summary` as JSON records: the summary line carries every figure as a field."""
    from crawler.cli.report import print_summary, summary_dict

    text = io.StringIO()
    print_summary(summary, config, out=text)
    lines = text.getvalue().splitlines()
    target = sys.stderr
    if not isinstance(target, LinesToRecords):  # not in json mode: print as usual
        print(text.getvalue(), end="", file=out or target)
        return
    fields = {"event": "summary", **summary_dict(summary, exit_code), "output_dir": str(config.output.dir)}
    for index, line in enumerate(lines):
        target.emit_line(line, fields if index == 0 else None)


def new_progress(options: LogOptions, handler: StderrHandler) -> Progress:
    """The watcher for one run: nothing, a log line every N seconds, or a live table on a terminal."""
    if options.quiet or options.progress_every <= 0:
        return NoProgress()
    if options.log_format == "text" and _is_terminal(handler.stream):
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal and not console.is_dumb_terminal:
            return LiveProgress(console, route=handler)
    return LogProgress(options.progress_every)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
