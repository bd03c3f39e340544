"""Shared harness: the bundled fake API on 127.0.0.1 in a background thread
(`ServerThread`), and the real `harvest` console script run as a subprocess against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from crawler.testing import configs
from crawler.testing.configs import expected_ids as expected_ids  # re-exported for the tests
from crawler.testing.configs import toml_value
from crawler.testing.fakeapi import Dataset, DatasetSpec, FakeServer, ServerOptions
from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdnfiles import CACHE_PREFIX

# The local S3 server (moto behind a fault proxy) and its per-test bucket: tests/objectstore.py.
pytest_plugins = ("objectstore",)

HARVEST = str(Path(sys.executable).with_name("harvest"))


def make_dataset(versions: Mapping[int, int] | None = None, **spec: Any) -> Dataset:
    """Model 500 with the given {versionId: images}; other spec fields as keywords."""
    versions = versions or {5001: 230, 5002: 170, 5003: 90}
    spec = {
        "seed": 7,
        "models": {"500": {"versions": [{"id": v, "images": n} for v, n in versions.items()]}},
        "posts": 8,
        "users": 5,
        "hidden_rate": 0.05,
        **spec,
    }
    return Dataset(DatasetSpec.from_dict(spec))


@pytest.fixture
def dataset() -> Dataset:
    return make_dataset()


@pytest.fixture
def api(dataset: Dataset) -> Iterator[FakeServer]:
    with ServerThread(dataset) as server:
        yield server


_toml_value = toml_value  # the name older test modules import


def media_table(api: FakeServer, **media: Any) -> dict[str, Any]:
    """A [media] table against the fake CDN: downloads on, fast retries unless overridden."""
    return {
        "download": True,
        "requests_per_second": 500,
        "concurrency": 4,
        "timeout": 5,
        "max_backoff": 0.05,
        "video_base": api.cdn_url + CACHE_PREFIX.rstrip("/"),
        **media,
    }


def write_config(
    path: Path,
    base_url: str,
    queries: Sequence[Mapping[str, Any]],
    out: str = "out",
    *,
    output: Mapping[str, Any] | None = None,
    media: Mapping[str, Any] | None = None,
    **api: Any,
) -> Path:
    """A config file whose output dir is `path.parent / out`; fast retries unless overridden."""
    api = {"requests_per_second": 500, "concurrency": 4, "timeout": 5, "max_backoff": 0.05, **api}
    return configs.write_config(path, base_url, queries, out, output, media=media, **api)


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def harvest(
    *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> Result:
    """The real console script, as a user runs it (in `cwd`, when relative paths matter)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    full_env.update(env or {})
    proc = subprocess.run(
        [HARVEST, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def read_items(out_dir: Path) -> list[dict[str, Any]]:
    """Every line of every segment, parsed; fails on a torn or non-JSON line."""
    items = []
    for segment in sorted(out_dir.glob("images-*.ndjson")):
        data = segment.read_bytes()
        assert not data or data.endswith(b"\n"), f"{segment.name} ends in a torn line"
        items += [orjson.loads(line) for line in data.splitlines()]
    return items


def ids_of(items: Sequence[Mapping[str, Any]]) -> list[int]:
    return [item["id"] for item in items]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client, for tests that talk to the fake API directly."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def options() -> ServerOptions:
    return ServerOptions()


@dataclass(frozen=True)
class Batch:
    """A page as the archive takes it: ids and each item's line, serialised as the API does."""

    ids: list[int]
    lines: list[bytes]


def batch(items: Sequence[Mapping[str, Any]]) -> Batch:
    def line(item: Mapping[str, Any]) -> bytes:
        try:
            return orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE)
        except (TypeError, orjson.JSONEncodeError):  # lone surrogates, integers past 64 bits
            return json.dumps(item, separators=(",", ":")).encode() + b"\n"

    return Batch([item["id"] for item in items], [line(item) for item in items])
