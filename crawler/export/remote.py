"""`harvest export --to s3://bucket/prefix`: the export, written to the object store.

The export is made as usual in a local staging dir (`OUTPUT_DIR/export-store/<bucket>/<prefix>`,
which keeps the manifest, so the next export is incremental), then each file the manifest
lists is uploaded (`ObjectStore.upload`: checked, idempotent) and its local copy removed, and
`manifest.json` goes up last. A reader of the store sees the old manifest or the new one,
each naming files that are all there. An export killed part way leaves files in the staging
dir: the next export uploads them before anything else changes. With `--full`, objects of
the format the new manifest no longer lists are removed from the store after it is up.

The observations of `harvest refresh` go to `observations/` the same way. The file of the
latest observation per id (`latest/latest.parquet` or `.jsonl.gz`, replaced by each export
that has new observations) is uploaded and kept in the staging dir too: the next export builds the new one
from it and the new observations; the one it replaced is removed from the store after the
manifest.
"""

from __future__ import annotations

from pathlib import Path

from crawler.archive.state import State
from crawler.archive.store import ObjectStore, StoreUrl
from crawler.errors import StateError
from crawler.export.export import LATEST_DIR, OBSERVATIONS_DIR, Result, export
from crawler.export.files import JsonLinesFiles, ParquetFiles
from crawler.export.manifest import MANIFEST, Manifest
from crawler.export.options import DEFAULT_FILE_MB

STAGING = "export-store"  # under the output dir


def staging_dir(out_dir: Path, url: StoreUrl) -> Path:
    return out_dir / STAGING / url.bucket / (url.prefix or "_root")


def export_to_store(
    out_dir: Path,
    state: State,
    url: StoreUrl,
    fmt: str = "parquet",
    *,
    full: bool = False,
    file_mb: float = DEFAULT_FILE_MB,
) -> Result:
    """Export what is new (everything with `full`) to the store under `url`."""
    staging = staging_dir(out_dir, url)
    result = export(out_dir, state, staging, fmt, full=full, file_mb=file_mb)
    store = ObjectStore(url)
    manifest = Manifest.load(staging)
    if manifest is None:
        raise StateError(f"{staging / MANIFEST}: missing after the export")
    listed = {f.name for exported in manifest.formats.values() for f in exported.files}
    listed |= {f"{OBSERVATIONS_DIR}/{f.name}" for seen in manifest.observations.values() for f in seen.files}
    for name in sorted(listed):
        local = staging / name
        if local.exists():  # not uploaded yet (this export's, or one killed before its upload)
            store.upload(local, name)
            local.unlink()
    latest = {f"{LATEST_DIR}/{f.name}" for f in manifest.latest.values()}
    for name in sorted(latest):  # kept locally: the next export's latest is made from it
        store.upload(staging / name, name)  # sends nothing when it is there already
    store.upload(staging / MANIFEST, MANIFEST)
    suffix = ParquetFiles.suffix if fmt == "parquet" else JsonLinesFiles.suffix
    for name in store.sizes():
        if name.endswith(suffix) and name not in listed | latest and _exported_name(name):
            store.remove(name)  # replaced (by --full, or a newer latest), or left by a killed export
    return result


def _exported_name(name: str) -> bool:
    """Whether `name` (relative to the export's prefix) is where an export puts its files."""
    folder, _, _ = name.rpartition("/")
    return folder in ("", OBSERVATIONS_DIR, LATEST_DIR)
