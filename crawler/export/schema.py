"""The export's columns: one stable, documented schema for Parquet, JSON lines and `harvest sql`.

Every column has a fixed type whatever the items carried. A value that does not
fit its column (a `steps` of "20" or "abc", a `width` of 7.5) is null there, never
an error; `meta` keeps the generation data exactly as served, so nothing is lost.
Changing a column's name or type bumps `SCHEMA_VERSION`: an incremental export
never mixes two versions in one export dir.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 3  # 2: query, shard and media_* filled; media_status; observations. 3: civitaiResources

STATS_KEYS = ("likeCount", "heartCount", "laughCount", "cryCount", "dislikeCount", "commentCount")

_STATS = pa.struct([(key, pa.int64()) for key in STATS_KEYS])
_TAG = pa.struct([("id", pa.int64()), ("name", pa.string())])
_RESOURCE = pa.struct(
    [("name", pa.string()), ("type", pa.string()), ("weight", pa.float64()), ("hash", pa.string())]
)
# What on-site generations list in `meta.civitaiResources` (their `meta.resources` is empty):
# the version used, by id, as the real items and the fake API carry it.
CIVITAI_RESOURCE_KEYS = ("type", "weight", "modelVersionId", "modelVersionName")
_CIVITAI_RESOURCE = pa.struct(
    [
        ("type", pa.string()),
        ("weight", pa.float64()),
        ("modelVersionId", pa.int64()),
        ("modelVersionName", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its name, Arrow type, the type as the README shows it, and where it comes from."""

    name: str
    type: pa.DataType
    shown: str
    source: str


COLUMNS: tuple[Column, ...] = (
    Column("id", pa.int64(), "int64", "`id`: the image id, unique in an export"),
    Column("url", pa.string(), "string", "`url`"),
    Column("hash", pa.string(), "string", "`hash` (a BlurHash preview, not a content hash)"),
    Column("width", pa.int64(), "int64", "`width`"),
    Column("height", pa.int64(), "int64", "`height`"),
    Column("nsfwLevel", pa.string(), "string", '`nsfwLevel` ("None", "Soft", "Mature", "X")'),
    Column("nsfw", pa.bool_(), "bool", "`nsfw`"),
    Column("browsingLevel", pa.int64(), "int64", "`browsingLevel` (1 PG, 2 PG-13, 4 R, 8 X, 16 XXX)"),
    Column("type", pa.string(), "string", '`type` ("image", "video", "audio")'),
    Column("createdAt", pa.timestamp("us", tz="UTC"), "timestamp[us, UTC]", "`createdAt`"),
    Column("postId", pa.int64(), "int64", "`postId`"),
    Column("username", pa.string(), "string", '`username` ("unknown" for deleted accounts)'),
    Column("baseModel", pa.string(), "string", "`baseModel` (may be null or empty)"),
    Column("modelVersionIds", pa.list_(pa.int64()), "list<int64>", "`modelVersionIds` (auto-detected only)"),
    Column(
        "stats",
        _STATS,
        "struct<" + ", ".join(f"{k}: int64" for k in STATS_KEYS) + ">",
        "`stats` as first harvested; null when absent",
    ),
    Column("tags", pa.list_(_TAG), "list<struct<id: int64, name: string>>", "`tags`; null unless `withTags`"),
    Column("prompt", pa.string(), "string", "`meta.prompt`"),
    Column("negativePrompt", pa.string(), "string", "`meta.negativePrompt`"),
    Column(
        "seed",
        pa.string(),
        "string",
        "`meta.seed`: an integer's exact digits (even beyond 64 bits), or a string of digits",
    ),
    Column("steps", pa.int64(), "int64", "`meta.steps`"),
    Column("sampler", pa.string(), "string", "`meta.sampler`"),
    Column("cfgScale", pa.float64(), "double", "`meta.cfgScale`"),
    Column("clipSkip", pa.int64(), "int64", "`meta.clipSkip`"),
    Column("Size", pa.string(), "string", '`meta.Size` ("832x1216")'),
    Column(
        "resources",
        pa.list_(_RESOURCE),
        "list<struct<name: string, type: string, weight: double, hash: string>>",
        "`meta.resources`",
    ),
    Column(
        "civitaiResources",
        pa.list_(_CIVITAI_RESOURCE),
        "list<struct<type: string, weight: double, modelVersionId: int64, modelVersionName: string>>",
        "`meta.civitaiResources`: what an on-site generation used (its `resources` is empty)",
    ),
    Column("meta", pa.string(), "string (JSON)", "`meta` exactly as served (its bytes); null when null"),
    Column("query", pa.string(), "string", "the query (its `name`) whose shard wrote the image's line"),
    Column(
        "shard",
        pa.string(),
        "string",
        "that shard's key (`browsingLevel=31&modelVersionId=5001&sort=Newest`)",
    ),
    Column(
        "segment",
        pa.string(),
        "string",
        "the archive segment holding the image's line (`images-NNNNNN.ndjson`)",
    ),
    Column("line", pa.int64(), "int64", "the line's number in that segment, from 1"),
    Column("media_path", pa.string(), "string", "`[media]`: the file, relative to the media dir"),
    Column("media_size", pa.int64(), "int64", "`[media]`: its size in bytes"),
    Column("media_sha256", pa.string(), "string", "`[media]`: its SHA-256 (hex)"),
    Column("media_content_type", pa.string(), "string", '`[media]`: what its bytes are ("image/webp")'),
    Column(
        "media_status",
        pa.string(),
        "string",
        '`[media]`: "done", "gone", "failed", "fetching"; null: not yet',
    ),
)

# The columns read from `meta` (from `meta.meta` on the legacy path, which nests it).
GENERATION = (
    "prompt",
    "negativePrompt",
    "seed",
    "steps",
    "sampler",
    "cfgScale",
    "clipSkip",
    "Size",
    "resources",
    "civitaiResources",
)

SCHEMA = pa.schema(
    [pa.field(c.name, c.type) for c in COLUMNS],
    metadata={"civitai-harvest.schema": str(SCHEMA_VERSION)},
)

# The media ledger's rows, as the export joins them and `harvest sql` shows them (`media`).
MEDIA_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("type", pa.string()),
        ("status", pa.string()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
        ("content_type", pa.string()),
        ("url", pa.string()),
        ("error", pa.string()),
    ]
)
MEDIA_COLUMNS = "id, type, status, path, size, sha256, content_type, url, error"

# Which shard wrote which lines of a segment (from the state's `runs`), as the export joins them.
RUNS_SCHEMA = pa.schema(
    [("first_line", pa.int64()), ("lines", pa.int64()), ("shard", pa.string()), ("query", pa.string())]
)

# One observation of `harvest refresh` (the files under `observations/`, and `latest/`: the
# latest observation per id). The observed fields are as served, typed like the image columns.
OBSERVATION_COLUMNS: tuple[Column, ...] = (
    Column("id", pa.int64(), "int64", "the image id"),
    Column("observed_at", pa.timestamp("us", tz="UTC"), "timestamp[us, UTC]", "when the API answered"),
    Column("pass", pa.int64(), "int64", "the refresh pass (1, 2, ...): each id once per pass"),
    Column(
        "gone", pa.bool_(), "bool", "absent from the answer: hidden or deleted (the API does not say which)"
    ),
    Column("nsfwLevel", pa.string(), "string", "`nsfwLevel` as observed; null when gone"),
    Column("browsingLevel", pa.int64(), "int64", "`browsingLevel` as observed; null when gone"),
    Column(
        "stats",
        _STATS,
        "struct<" + ", ".join(f"{k}: int64" for k in STATS_KEYS) + ">",
        "`stats` as observed; null when gone",
    ),
    Column(
        "segment", pa.string(), "string", "the refresh segment holding the line (`refresh-NNNNNN.ndjson`)"
    ),
    Column("line", pa.int64(), "int64", "the line's number in that segment, from 1"),
)
OBSERVATION_SCHEMA = pa.schema(
    [pa.field(c.name, c.type) for c in OBSERVATION_COLUMNS],
    metadata={"civitai-harvest.schema": str(SCHEMA_VERSION)},
)


def markdown_table(columns: tuple[Column, ...] = COLUMNS, source: str = "from the item") -> str:
    """A schema as the README's table shows it (a test keeps the two the same)."""
    rows = [f"| column | type | {source} |", "|---|---|---|"]
    rows += [f"| `{c.name}` | `{c.shown}` | {c.source} |" for c in columns]
    return "\n".join(rows)
