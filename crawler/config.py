"""Read and check the harvest config (TOML) before a single request is made.

Every problem becomes one `ConfigError` line: the config path as the user gave
it, the culprit's location (`queries[2].limit`, 1-based) and what is wrong, with
a suggestion when a near match exists. Query values come out wire-ready, so the
client never formats a parameter itself. What a [[queries]] table may hold, and
how each value is checked, is the images endpoint's (`crawler.civitai.images`);
this module adds the query's `name` and keeps API keys out of the file.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from crawler import checks
from crawler.archive.store import StoreUrl, parse_url
from crawler.civitai.endpoint import ParamValue
from crawler.civitai.images import IMAGES
from crawler.civitai.media import MEDIA_TYPES, ORIGINAL, VIDEO_BASE
from crawler.errors import ConfigError

API_KEY_ENV = "CIVITAI_API_KEY"


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = "https://civitai.com/api/v1"
    requests_per_second: float = 2.0
    concurrency: int | None = None  # requests in flight at most; None ("auto"): rate x p90 latency
    timeout: float = 30.0
    max_retries: int = 8
    max_backoff: float = 30.0
    walk_cap: int = 50_000  # positions deep the server lets one walk go (see api-facts: walks are capped)
    max_page_mb: float = 64.0  # MiB: a larger answer (decompressed) is a failed attempt
    max_wait: float = 900.0  # seconds: a longer pause demanded by the server stops the shard
    max_pages_without_new: int = 1000  # pages in a row with no image new to the walk stop the shard


COMPRESSIONS: tuple[str, ...] = ("none", "zstd", "gzip")


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: Path  # absolute, resolved against the config file's directory
    segment_items: int = 100_000  # a segment is closed after this many images (0: no limit)
    segment_mb: float = 0.0  # ... or once it holds this many MiB (0: no limit)
    compress: str = "none"  # closed segments: "zstd" (.ndjson.zst), "gzip" (.ndjson.gz) or "none"
    publish: StoreUrl | None = None  # closed segments and media files are uploaded here (s3://...)
    keep_local: bool = True  # false: local copies of what is published are deleted once recorded


@dataclass(frozen=True, slots=True)
class MediaConfig:
    """`[media]`: the files the items point to, fetched from the CDN under a budget of its own."""

    dir: Path  # absolute, resolved against output.dir
    download: bool = False  # `harvest run` also fetches media (`harvest media` always does)
    variant: str | int = ORIGINAL  # "original", or a width: the CDN's resized form
    types: tuple[str, ...] = ("image", "video")  # the item types whose media is fetched
    requests_per_second: float = 10.0  # the CDN's own budget, apart from the API's
    concurrency: int = 8  # downloads in flight at most
    timeout: float = 60.0  # seconds without a byte (connecting, or in a body) fail an attempt
    max_retries: int = 5  # retries of one file after its first attempt; then it is `failed`
    max_backoff: float = 30.0  # seconds: cap of the exponential backoff
    video_base: str = VIDEO_BASE  # where videos themselves are served


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
    media: MediaConfig  # the defaults (under output.dir/media, download off) without a [media] table


def api_key(environ: Mapping[str, str]) -> str | None:
    """The API key from `CIVITAI_API_KEY`, or None when it is unset or blank.

    Surrounding whitespace goes (`$(cat keyfile)`, a secrets file, a pasted line
    end); any other control character, or anything outside printable ASCII, cannot
    be sent in a header and is refused by the variable's name, never its value.
    """
    key = environ.get(API_KEY_ENV, "").strip()
    if not all(" " <= char <= "~" for char in key):
        raise ConfigError(
            f"the environment variable {API_KEY_ENV} holds a control character or a character that "
            "cannot be sent in an HTTP header; set it to the key alone"
        )
    return key or None


def _has_credentials(url: str) -> bool:
    """`user:password@` in the authority, found without parsing (a broken URL may hold one too)."""
    authority = url.strip().split("://", 1)[-1]
    return "@" in re.split(r"[/?#]", authority, maxsplit=1)[0]


def _base_url(value: Any) -> str:
    if isinstance(value, str) and _has_credentials(value):
        # Never echoed: the value holds a password. The key has its own place.
        raise checks.Invalid(
            "credentials (user:password) don't belong in the URL; the API key goes in the "
            f"environment variable {API_KEY_ENV}"
        )
    try:
        parts = urlsplit(checks.text(value).strip())
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
        usable = parts.scheme in ("http", "https") and parts.hostname and not (parts.query or parts.fragment)
    except ValueError:
        usable = False
    if not usable:
        raise checks.Invalid(f"expected an http(s) URL with a host (and no query), {checks.got(value)}")
    return parts.geturl().rstrip("/")


AUTO = "auto"
# Requests in flight at most: as for media downloads, more than this is a typo, not a budget (each
# one holds a connection and queue room, and at 2 req/s and 8 s p95 even 64 is plenty).
MAX_CONCURRENCY = 256


def _concurrency(value: Any) -> int | None:
    """An integer from 1 to MAX_CONCURRENCY (a hard cap), or "auto": follow the rate and the latency
    observed."""
    if value == AUTO:
        return None
    if checks.is_int(value) and 1 <= value <= MAX_CONCURRENCY:
        return int(value)
    raise checks.Invalid(f'expected an integer from 1 to {MAX_CONCURRENCY} or "{AUTO}", {checks.got(value)}')


# Slower than one request in 1000 s is a mistake, and a pace near 0 never sends (or divides by 0).
MIN_REQUESTS_PER_SECOND = 0.001

QUERY_KEYS: frozenset[str] = frozenset(IMAGES.params) | {"name"}  # what a [[queries]] table may hold

_API_CHECKS: dict[str, Callable[[Any], Any]] = {
    "base_url": _base_url,
    "requests_per_second": functools.partial(checks.at_least, low=MIN_REQUESTS_PER_SECOND),
    "concurrency": _concurrency,
    "timeout": checks.positive_number,
    "max_retries": functools.partial(checks.integer, low=0),
    "max_backoff": checks.positive_number,
    "walk_cap": functools.partial(checks.integer, low=1),
    "max_page_mb": checks.positive_number,
    "max_wait": checks.non_negative,
    "max_pages_without_new": functools.partial(checks.integer, low=1),
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
            raise checks.Invalid(
                f"the API key never goes in the config; set the environment variable {API_KEY_ENV}", f".{key}"
            )
        if refused and key in refused:
            raise checks.Invalid(refused[key], f".{key}")
        if key not in known:
            raise checks.Invalid(f"unknown key {checks.show(key)}{checks.suggest(key, known)}")


def _table(value: Any, spelled: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise checks.Invalid(f"expected a table ({spelled}), {checks.got(value)}")


def _parse_api(raw: Any) -> ApiConfig:
    table = _table(raw, "[api]")
    _check_keys(table, _API_CHECKS)
    values: dict[str, Any] = {}
    for key, value in table.items():
        with checks.at(f".{key}"):
            values[key] = _API_CHECKS[key](value)
    return ApiConfig(**values)


def _store_url(value: Any) -> StoreUrl:
    """`s3://bucket/prefix`; where the store is and the credentials come from AWS_* only."""
    if isinstance(value, str) and _has_credentials(value):
        raise checks.Invalid(
            "credentials don't belong in the URL; they come from the AWS environment variables "
            "(AWS_ACCESS_KEY_ID, ...) or ~/.aws"
        )
    try:
        return parse_url(checks.text(value).strip())
    except ValueError as error:
        raise checks.Invalid(f"{error}, {checks.got(value)}") from None


_OUTPUT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "segment_items": functools.partial(checks.integer, low=0),
    "segment_mb": checks.non_negative,
    "compress": functools.partial(checks.one_of, COMPRESSIONS),
    "publish": _store_url,
    "keep_local": lambda value: _boolean(value),
}


def _parse_output(raw: Any, config_path: Path) -> OutputConfig:
    table = _table(raw, "[output]")
    _check_keys(table, ("dir", *_OUTPUT_CHECKS))
    if "dir" not in table:
        raise checks.Invalid('missing key "dir" (where the harvest is written)')
    values: dict[str, Any] = {}
    for key in _OUTPUT_CHECKS.keys() & table.keys():
        with checks.at(f".{key}"):
            values[key] = _OUTPUT_CHECKS[key](table[key])
    if values.get("keep_local") is False and "publish" not in values:
        raise checks.Invalid(
            'keep_local = false needs publish = "s3://bucket/prefix" (the local files are the only copy)',
            ".keep_local",
        )
    with checks.at(".dir"):
        return OutputConfig(_output_dir(table["dir"], config_path), **values)


def _output_dir(value: Any, config_path: Path) -> Path:
    # Relative to the config file, not the cwd, so cron and the shell agree.
    return _resolved(value, config_path.absolute().parent)


def _resolved(value: Any, base: Path) -> Path:
    try:
        return (base / Path(checks.text(value)).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError) as error:  # NUL byte, symlink loop
        raise checks.Invalid(f"unusable path ({error}), {checks.got(value)}") from None


def _variant(value: Any) -> str | int:
    """ "original", or a width in pixels (the CDN snaps it to its ladder)."""
    if value == ORIGINAL:
        return ORIGINAL
    if checks.is_int(value) and 1 <= value <= 10_000:
        return int(value)
    raise checks.Invalid(f'expected "{ORIGINAL}" or a width in pixels (e.g. 450, 1200), {checks.got(value)}')


def _media_types(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise checks.Invalid(
            f"expected a non-empty list of item types {checks.quoted(MEDIA_TYPES)}, {checks.got(value)}"
        )
    return checks.each(value, functools.partial(checks.one_of, MEDIA_TYPES))


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise checks.Invalid(f"expected true or false, {checks.got(value)}")


_MEDIA_CHECKS: dict[str, Callable[[Any], Any]] = {
    "download": _boolean,
    "variant": _variant,
    "types": _media_types,
    "requests_per_second": functools.partial(checks.at_least, low=MIN_REQUESTS_PER_SECOND),
    "concurrency": functools.partial(checks.integer, low=1, high=MAX_CONCURRENCY),
    "timeout": checks.positive_number,
    "max_retries": functools.partial(checks.integer, low=0),
    "max_backoff": checks.positive_number,
    "video_base": _base_url,
}


def _parse_media(raw: Any, out_dir: Path) -> MediaConfig:
    table = _table(raw, "[media]")
    _check_keys(table, ("dir", *_MEDIA_CHECKS))
    values: dict[str, Any] = {}
    for key in _MEDIA_CHECKS.keys() & table.keys():
        with checks.at(f".{key}"):
            values[key] = _MEDIA_CHECKS[key](table[key])
    with checks.at(".dir"):
        # Relative to the output dir: the media belong to that archive.
        folder = _resolved(table.get("dir", "media"), out_dir)
    return MediaConfig(folder, **values)


def _parse_query(raw: Any, position: int) -> Query:
    table = _table(raw, "[[queries]]")
    _check_keys(table, sorted(QUERY_KEYS), IMAGES.refused)
    params = IMAGES.check_params({key: value for key, value in table.items() if key != "name"})
    with checks.at(".name"):
        name = checks.text(table.get("name", f"query-{position}"))
    return Query(name, params)


def _parse_queries(raw: Any) -> tuple[Query, ...]:
    if not isinstance(raw, list):
        raise checks.Invalid(f"expected an array of tables ([[queries]]), {checks.got(raw)}")
    queries: list[Query] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(raw, 1):
        with checks.at(f"[{position}]"):
            query = _parse_query(item, position)
            if query.name in seen:
                raise checks.Invalid(
                    f'"{query.name}" is already the name of queries[{seen[query.name]}]', ".name"
                )
        seen[query.name] = position
        queries.append(query)
    return tuple(queries)


def _parse(data: Any, path: Path) -> Config:
    table = _table(data, "the whole file")
    _check_keys(table, ("api", "output", "queries", "media"))
    with checks.at("api"):
        api = _parse_api(table.get("api", {}))
    if "output" not in table:
        raise checks.Invalid("missing [output] table (with dir = where the harvest is written)")
    with checks.at("output"):
        output = _parse_output(table["output"], path)
    if table.get("queries") in (None, []):
        raise checks.Invalid("no queries: add at least one [[queries]] table")
    with checks.at("queries"):
        queries = _parse_queries(table["queries"])
    with checks.at("media"):
        media = _parse_media(table.get("media", {}), output.dir)
    return Config(path, api, output, queries, media)


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
    except checks.Invalid as error:
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
