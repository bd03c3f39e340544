"""Harvest configs and expectations that the tests and the benchmark share.

A config is written as a user would write it (a TOML file beside its output dir),
so every test and benchmark runs the real `harvest` on a real file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from crawler.testing.fakeapi import Dataset


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return orjson.dumps(value).decode()  # a JSON string is a TOML basic string
    return repr(value)


def write_config(
    path: Path,
    base_url: str,
    queries: Iterable[Mapping[str, Any]],
    out: str = "out",
    output: Mapping[str, Any] | None = None,
    *,
    media: Mapping[str, Any] | None = None,
    **api: Any,
) -> Path:
    """A config file at `path` whose output dir is `path.parent / out` (with a [media] table
    when `media` is given)."""
    lines = ["[api]", f"base_url = {toml_value(base_url)}", *_pairs(api)]
    lines += ["", "[output]", f"dir = {toml_value(out)}", *_pairs(output or {})]
    lines += ["", "[media]", *_pairs(media)] if media is not None else []
    for query in queries:
        lines += ["", "[[queries]]", *_pairs(query)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(table: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {toml_value(value)}" for key, value in table.items()]


def expected_ids(dataset: Dataset, versions: Sequence[int], levels: int = 31) -> set[int]:
    """Every image id the fake API serves for these model versions at these browsing levels."""
    return {i for v in versions for i in dataset.version_image_ids(v, levels=levels)}
