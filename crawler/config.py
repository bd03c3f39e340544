"""Read and check the harvest config (TOML) before a single request is made.

Every problem becomes one `ConfigError` line: the config path as the user gave
it, the culprit's location (`queries[2].limit`, 1-based) and what is wrong, with
a suggestion when a near match exists. Query values come out wire-ready, so the
client never formats a parameter itself.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import json
import math
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from crawler.errors import ConfigError

ParamValue = str | tuple[str, ...]

SORTS: tuple[str, ...] = ("Most Reactions", "Most Comments", "Most Collected", "Newest", "Oldest", "Random")
PERIODS: tuple[str, ...] = ("Day", "Week", "Month", "Year", "AllTime")
TYPES: tuple[str, ...] = ("image", "video", "audio")
NSFW_LEVELS: tuple[str, ...] = ("None", "Soft", "Mature", "X")
LIST_KEYS: frozenset[str] = frozenset({"postId", "modelVersionId", "userId", "modelId", "username"})
DEFAULT_LIMIT = 200  # the API's maximum: fewer requests for the same items
API_KEY_ENV = "CIVITAI_API_KEY"


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = "https://civitai.com/api/v1"
    requests_per_second: float = 2.0
    concurrency: int = 4
    timeout: float = 30.0
    max_retries: int = 8
    max_backoff: float = 30.0


COMPRESSIONS: tuple[str, ...] = ("none", "zstd", "gzip")


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: Path  # absolute, resolved against the config file's directory
    segment_items: int = 100_000  # a segment is closed after this many images (0: no limit)
    segment_mb: float = 0.0  # ... or once it holds this many MiB (0: no limit)
    compress: str = "none"  # closed segments: "zstd" (.ndjson.zst), "gzip" (.ndjson.gz) or "none"


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    params: tuple[tuple[str, ParamValue], ...]  # sorted by key, values as sent on the wire

    def get(self, key: str) -> ParamValue | None:
        return next((value for name, value in self.params if name == key), None)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path  # the config file as given
    api: ApiConfig
    output: OutputConfig
    queries: tuple[Query, ...]


class _Invalid(Exception):
    """A problem found deep down; `at` grows as it unwinds to where the value lives."""

    def __init__(self, reason: str, at: str = "") -> None:
        super().__init__(reason, at)
        self.reason, self.at = reason, at


@contextmanager
def _at(prefix: str) -> Iterator[None]:
    try:
        yield
    except _Invalid as error:
        raise _Invalid(error.reason, prefix + error.at) from None


# Order matters: bool is an int, datetime is a date.
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (dt.datetime, "datetime"),
    (dt.date, "date"),
    (dt.time, "time"),
)


def _show(value: Any) -> str:
    """The value as TOML spells it, escaped and cut short so the message stays one line."""
    if isinstance(value, list):
        text = "[" + ", ".join(map(_show, value)) + "]"
    elif isinstance(value, (bool, str)):
        text = json.dumps(value, ensure_ascii=False)  # JSON's true/false and "..." are TOML's too
    else:
        text = "{...}" if isinstance(value, dict) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: Any) -> str:
    kind = next((name for cls, name in _TOML_TYPES if isinstance(value, cls)), type(value).__name__)
    return f"got {_show(value)} ({kind})"


def _quoted(words: Iterable[str]) -> str:
    return ", ".join(f'"{word}"' for word in words)


def _suggest(word: str, choices: Iterable[str]) -> str:
    """`; did you mean "X"?` for the nearest choice, case-insensitively, or nothing."""
    by_fold = {choice.casefold(): choice for choice in choices}
    close = difflib.get_close_matches(word.casefold(), list(by_fold), n=1)
    return f'; did you mean "{by_fold[close[0]]}"?' if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def _int(value: Any, low: int, high: int | None = None) -> int:
    if _is_int(value) and value >= low and (high is None or value <= high):
        return int(value)
    wanted = (
        f"an integer from {low} to {high}"
        if high is not None
        else "a positive integer"
        if low == 1
        else f"an integer >= {low}"
    )
    raise _Invalid(f"expected {wanted}, {_got(value)}")


def _positive_number(value: Any) -> float:
    if (_is_int(value) or isinstance(value, float)) and 0 < value < math.inf:
        return float(value)
    raise _Invalid(f"expected a number > 0, {_got(value)}")


def _text(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _Invalid(f"expected a non-empty string, {_got(value)}")


def _each(values: list[Any], check: Callable[[Any], str]) -> tuple[str, ...]:
    """Checks every item, naming the bad one; drops repeats, keeps order."""
    out: dict[str, None] = {}
    for index, value in enumerate(values, 1):
        with _at(f"[{index}]"):
            out[check(value)] = None
    return tuple(out)


def _base_url(value: Any) -> str:
    try:
        parts = urlsplit(_text(value).strip())
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
        usable = parts.scheme in ("http", "https") and parts.hostname and not (parts.query or parts.fragment)
    except ValueError:
        usable = False
    if not usable:
        raise _Invalid(f"expected an http(s) URL with a host (and no query), {_got(value)}")
    return parts.geturl().rstrip("/")


def _wire_id(value: Any) -> str:
    return str(_int(value, 1))


def _wire_bool(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    raise _Invalid(f"expected true or false, {_got(value)}")


def _wire_enum(choices: tuple[str, ...], value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected one of {_quoted(choices)}, {_got(value)}")
    if value not in choices:
        raise _Invalid(f"{_show(value)} is not one of {_quoted(choices)}{_suggest(value, choices)}")
    return value


def _wire_nsfw(value: Any) -> str:
    if isinstance(value, bool):
        return _wire_bool(value)
    if isinstance(value, str):
        return _wire_enum(NSFW_LEVELS, value)
    raise _Invalid(f"expected true, false or one of {_quoted(NSFW_LEVELS)}, {_got(value)}")


def _wire_tags(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(_each(value, _wire_id))
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
            return ",".join(dict.fromkeys(str(int(part)) for part in parts))
    if _is_int(value) and value > 0:
        return str(value)
    raise _Invalid(f"expected a tag id, a list of them or a comma-separated string of them, {_got(value)}")


def _wire_base_models(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(_each(value, _text))
    if isinstance(value, str):
        return _text(value)
    raise _Invalid(f"expected a string or a non-empty list of strings, {_got(value)}")


_QUERY_CHECKS: dict[str, Callable[[Any], str]] = {
    "limit": lambda value: str(_int(value, 1, 200)),
    **dict.fromkeys(("postId", "modelId", "modelVersionId", "imageId", "userId"), _wire_id),
    "username": _text,
    "period": functools.partial(_wire_enum, PERIODS),
    "sort": functools.partial(_wire_enum, SORTS),
    "type": functools.partial(_wire_enum, TYPES),
    "nsfw": _wire_nsfw,
    "browsingLevel": lambda value: str(_int(value, 1, 31)),
    "tags": _wire_tags,
    "baseModels": _wire_base_models,
    **dict.fromkeys(("withMeta", "withTags"), _wire_bool),
}
QUERY_KEYS: frozenset[str] = frozenset(_QUERY_CHECKS) | {"name"}
_WALKED = "the harvester walks cursors itself; remove it"
_QUERY_REFUSED = {"page": _WALKED, "cursor": _WALKED}

_API_CHECKS: dict[str, Callable[[Any], Any]] = {
    "base_url": _base_url,
    "requests_per_second": _positive_number,
    "concurrency": functools.partial(_int, low=1),
    "timeout": _positive_number,
    "max_retries": functools.partial(_int, low=0),
    "max_backoff": _positive_number,
}


def _is_secret(key: str) -> bool:
    flat = key.casefold().replace("_", "").replace("-", "")
    return "token" in flat or "apikey" in flat or flat in {"key", "auth", "authorization", "bearer", "secret"}


def _check_keys(
    table: Mapping[str, Any], known: Iterable[str], refused: Mapping[str, str] | None = None
) -> None:
    known = tuple(known)
    for key in table:
        if _is_secret(key):
            raise _Invalid(
                f"the API key never goes in the config; set the environment variable {API_KEY_ENV}", f".{key}"
            )
        if refused and key in refused:
            raise _Invalid(refused[key], f".{key}")
        if key not in known:
            raise _Invalid(f"unknown key {_show(key)}{_suggest(key, known)}")


def _table(value: Any, spelled: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise _Invalid(f"expected a table ({spelled}), {_got(value)}")


def _parse_api(raw: Any) -> ApiConfig:
    table = _table(raw, "[api]")
    _check_keys(table, _API_CHECKS)
    values: dict[str, Any] = {}
    for key, value in table.items():
        with _at(f".{key}"):
            values[key] = _API_CHECKS[key](value)
    return ApiConfig(**values)


def _non_negative(value: Any) -> float:
    if (_is_int(value) or isinstance(value, float)) and 0 <= value < math.inf:
        return float(value)
    raise _Invalid(f"expected a number >= 0, {_got(value)}")


_OUTPUT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "segment_items": functools.partial(_int, low=0),
    "segment_mb": _non_negative,
    "compress": functools.partial(_wire_enum, COMPRESSIONS),
}


def _parse_output(raw: Any, config_path: Path) -> OutputConfig:
    table = _table(raw, "[output]")
    _check_keys(table, ("dir", *_OUTPUT_CHECKS))
    if "dir" not in table:
        raise _Invalid('missing key "dir" (where the harvest is written)')
    values: dict[str, Any] = {}
    for key in _OUTPUT_CHECKS.keys() & table.keys():
        with _at(f".{key}"):
            values[key] = _OUTPUT_CHECKS[key](table[key])
    with _at(".dir"):
        return OutputConfig(_output_dir(table["dir"], config_path), **values)


def _output_dir(value: Any, config_path: Path) -> Path:
    try:
        # Relative to the config file, not the cwd, so cron and the shell agree.
        return (config_path.absolute().parent / Path(_text(value)).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError) as error:  # NUL byte, symlink loop
        raise _Invalid(f"unusable path ({error}), {_got(value)}") from None


def _parse_query(raw: Any, position: int) -> Query:
    table = _table(raw, "[[queries]]")
    _check_keys(table, sorted(QUERY_KEYS), _QUERY_REFUSED)
    params: dict[str, ParamValue] = {"limit": str(DEFAULT_LIMIT)}
    list_key: str | None = None
    for key, value in table.items():
        if key == "name":
            continue
        with _at(f".{key}"):
            if key in LIST_KEYS and isinstance(value, list):
                if not value:
                    raise _Invalid(f"expected a non-empty list, {_got(value)}")
                params[key] = _each(value, _QUERY_CHECKS[key])
            else:
                params[key] = _QUERY_CHECKS[key](value)
        if isinstance(params[key], tuple):
            if list_key is not None:
                raise _Invalid(
                    f'"{list_key}" and "{key}" are both lists; only one key per query may be a list'
                )
            list_key = key
    with _at(".name"):
        name = _text(table.get("name", f"query-{position}"))
    return Query(name, tuple(sorted(params.items())))


def _parse_queries(raw: Any) -> tuple[Query, ...]:
    if not isinstance(raw, list):
        raise _Invalid(f"expected an array of tables ([[queries]]), {_got(raw)}")
    queries: list[Query] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(raw, 1):
        with _at(f"[{position}]"):
            query = _parse_query(item, position)
            if query.name in seen:
                raise _Invalid(f'"{query.name}" is already the name of queries[{seen[query.name]}]', ".name")
        seen[query.name] = position
        queries.append(query)
    return tuple(queries)


def _parse(data: Any, path: Path) -> Config:
    table = _table(data, "the whole file")
    _check_keys(table, ("api", "output", "queries"))
    with _at("api"):
        api = _parse_api(table.get("api", {}))
    if "output" not in table:
        raise _Invalid("missing [output] table (with dir = where the harvest is written)")
    with _at("output"):
        output = _parse_output(table["output"], path)
    if table.get("queries") in (None, []):
        raise _Invalid("no queries: add at least one [[queries]] table")
    with _at("queries"):
        queries = _parse_queries(table["queries"])
    return Config(path, api, output, queries)


_READ_ERRORS: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "no such file"),
    (IsADirectoryError, "is a directory, not a config file"),
    (PermissionError, "cannot read it (permission denied)"),
)


def _fail(shown: str, reason: str, at: str = "") -> ConfigError:
    where = at.lstrip(".")
    line = f"{shown}: {where}: {reason}" if where else f"{shown}: {reason}"
    return ConfigError(" ".join(line.splitlines()))


def parse_config(data: dict[str, Any], path: Path, *, shown: str | None = None) -> Config:
    """Validates an already-parsed TOML dict; `shown` is the path as the user spelled it."""
    try:
        return _parse(data, Path(path))
    except _Invalid as error:
        raise _fail(shown or str(path), error.reason, error.at) from None


def load_config(path: str | Path) -> Config:
    """Reads and validates the config file; any problem is one ConfigError line."""
    shown = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as error:
        known = next((message for cls, message in _READ_ERRORS if isinstance(error, cls)), None)
        raise _fail(shown, known or f"cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise _fail(shown, f"not UTF-8 text (bad byte at offset {error.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _fail(shown, f"invalid TOML: {error}") from None
    return parse_config(data, Path(path), shown=shown)
