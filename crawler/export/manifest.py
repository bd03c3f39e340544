"""`manifest.json` in the export dir: what has been exported, per format, so the next export
writes only what is new.

For every format it lists the files that make up the export and, per archive
segment, how many committed bytes and lines are in them. Segments only ever grow
(and a closed one never changes), so what is new is each segment's committed
bytes past that mark. The manifest is replaced atomically after the files it
lists are durable: a crash before leaves the previous export intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from crawler.archive.fs import write_atomic
from crawler.errors import OutputError, StateError
from crawler.export.files import Written

MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class Mark:
    """How much of one segment is exported: its first `bytes` bytes, `lines` lines."""

    bytes: int
    lines: int


@dataclass(slots=True)
class Exported:
    """One format's export: its files and the part of each segment they hold."""

    schema_version: int
    files: list[Written] = field(default_factory=list)
    segments: dict[str, Mark] = field(default_factory=dict)
    exported_at: str = ""

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(slots=True)
class Manifest:
    source: str  # the output dir exported (resolved path)
    formats: dict[str, Exported] = field(default_factory=dict)  # the images, per format
    # The observations of `harvest refresh` (their own files and marks over the refresh
    # segments), per format, and the file of the latest observation per id, per format.
    observations: dict[str, Exported] = field(default_factory=dict)
    latest: dict[str, Written] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        path = folder / MANIFEST
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise StateError(f"{path}: unreadable export manifest: {exc}; export again with --full") from None
        try:
            return cls(
                str(data["source"]),
                {k: _exported(v) for k, v in data["formats"].items()},
                {k: _exported(v) for k, v in data.get("observations", {}).items()},
                {k: _written(v) for k, v in data.get("latest", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"{path}: unreadable export manifest ({exc!r}); export again with --full"
            ) from None

    def save(self, folder: Path) -> None:
        data = {
            "source": self.source,
            "formats": {k: _plain(v) for k, v in self.formats.items()},
            "observations": {k: _plain(v) for k, v in self.observations.items()},
            "latest": {k: {"name": f.name, "rows": f.rows, "bytes": f.bytes} for k, f in self.latest.items()},
        }
        body = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"

        def fill(raw: BinaryIO) -> None:
            raw.write(body)

        try:
            write_atomic(folder / MANIFEST, fill)
        except OSError as exc:
            raise OutputError(f"{folder / MANIFEST}: cannot write: {exc.strerror or exc}") from None


def _exported(data: dict[str, Any]) -> Exported:
    return Exported(
        schema_version=int(data["schema_version"]),
        files=[_written(f) for f in data["files"]],
        segments={str(k): Mark(int(v["bytes"]), int(v["lines"])) for k, v in data["segments"].items()},
        exported_at=str(data.get("exported_at", "")),
    )


def _written(data: dict[str, Any]) -> Written:
    return Written(str(data["name"]), int(data["rows"]), int(data["bytes"]))


def _plain(exported: Exported) -> dict[str, Any]:
    return {
        "schema_version": exported.schema_version,
        "exported_at": exported.exported_at,
        "rows": exported.rows,
        "files": [{"name": f.name, "rows": f.rows, "bytes": f.bytes} for f in exported.files],
        "segments": {k: {"bytes": m.bytes, "lines": m.lines} for k, m in exported.segments.items()},
    }
