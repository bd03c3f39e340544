"""Lines -> rows of the export schema, in DuckDB: each block of lines is one SQL query.

DuckDB parses every line once (`json_transform`), keeping each value as its own
JSON text, and types it by what that text is: an integer column takes only an
integer literal, a string column only a string, so `"steps": "20"` is null in
`steps` (not 20) and `"width": 7.5` null in `width` (not 8). The typing is plain
SQL over short strings, run in parallel on every core.

`meta` must be the bytes as served. DuckDB hands back its own serialisation, which
is those bytes whenever serialising the whole line reproduces the line (the API's
compact output nearly always does: checked per line). For any other line (another
spelling of a number, spaces, a lone surrogate replaced for DuckDB's sake) `meta`
is cut from the stored line itself (`exactjson.member_bytes`).
"""

from __future__ import annotations

import json
import os

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from crawler import exactjson
from crawler.errors import StateError
from crawler.export.lines import Block
from crawler.export.schema import (
    CIVITAI_RESOURCE_KEYS,
    GENERATION,
    MEDIA_SCHEMA,
    OBSERVATION_SCHEMA,
    SCHEMA,
    STATS_KEYS,
)

# Typing one value from its JSON text (DuckDB writes it compactly, so the first
# character tells its kind). Strings are unescaped by DuckDB's JSON reader.
_MACROS = r"""
CREATE MACRO j_int(v) AS CASE WHEN regexp_full_match(v::VARCHAR, '-?[0-9]+')
    THEN TRY_CAST(v::VARCHAR AS BIGINT) END;
CREATE MACRO j_num(v) AS CASE WHEN regexp_full_match(v::VARCHAR, '-?[0-9][0-9.eE+-]*')
    AND isfinite(TRY_CAST(v::VARCHAR AS DOUBLE)) THEN TRY_CAST(v::VARCHAR AS DOUBLE) END;
CREATE MACRO j_str(v) AS CASE WHEN starts_with(v::VARCHAR, '"') THEN json_extract_string(v, '$') END;
CREATE MACRO j_bool(v) AS CASE v::VARCHAR WHEN 'true' THEN true WHEN 'false' THEN false END;
CREATE MACRO j_digits(v) AS CASE
    WHEN regexp_full_match(v::VARCHAR, '-?[0-9]+') THEN v::VARCHAR
    WHEN regexp_full_match(v::VARCHAR, '"-?[0-9]+"') THEN json_extract_string(v, '$') END;
"""

_SCALARS = ("id", "url", "hash", "width", "height", "nsfwLevel", "nsfw", "browsingLevel", "type", "createdAt")
_ITEM = {
    **dict.fromkeys((*_SCALARS, "postId", "username", "baseModel", "meta"), "JSON"),
    "stats": dict.fromkeys(STATS_KEYS, "JSON"),
    "modelVersionIds": ["JSON"],
    "tags": [{"id": "JSON", "name": "JSON"}],
}
# The generation fields; `id` and `meta` tell the legacy path's envelope {"id": …, "meta": {…}}.
_GEN = {
    **dict.fromkeys(("id", "meta", *GENERATION), "JSON"),
    "resources": [dict.fromkeys(("name", "type", "weight", "hash"), "JSON")],
    "civitaiResources": [dict.fromkeys(CIVITAI_RESOURCE_KEYS, "JSON")],
}


def _structure(spec: object) -> str:
    """A json_transform structure as an SQL string literal's contents."""
    return json.dumps(spec, separators=(",", ":")).replace("'", "''")


_STATS = ", ".join(f"{k} := j_int(t.stats.{k})" for k in STATS_KEYS)

# After `meta`: where the line came from (`query`, `shard`: null here, filled from the state's
# runs by `rows`, in Arrow: a join in SQL costs more) and where it is; then its media, as the
# media ledger (`media_now`) records it (joined only when it has rows: `$media`).
_QUERY = f"""
WITH a AS (
    SELECT n, line, json_transform(line, '{_structure(_ITEM)}') AS t FROM lines
), b AS (
    SELECT *, json_transform(t.meta, '{_structure(_GEN)}') AS g0 FROM a
), c AS (
    SELECT *, CASE WHEN g0.id IS NOT NULL AND starts_with(g0.meta::VARCHAR, '{{')
        THEN json_transform(g0.meta, '{_structure(_GEN)}') ELSE g0 END AS g FROM b
)
SELECT
    j_int(t.id) AS id, j_str(t.url) AS url, j_str(t.hash) AS hash,
    j_int(t.width) AS width, j_int(t.height) AS height,
    j_str(t.nsfwLevel) AS nsfwLevel, j_bool(t.nsfw) AS nsfw, j_int(t.browsingLevel) AS browsingLevel,
    j_str(t.type) AS type, TRY_CAST(j_str(t.createdAt) AS TIMESTAMPTZ) AS createdAt,
    j_int(t.postId) AS postId, j_str(t.username) AS username, j_str(t.baseModel) AS baseModel,
    list_transform(t.modelVersionIds, lambda x: j_int(x)) AS modelVersionIds,
    CASE WHEN t.stats IS NOT NULL THEN struct_pack({_STATS}) END AS stats,
    list_transform(t.tags, lambda x: struct_pack(id := j_int(x.id), name := j_str(x.name))) AS tags,
    j_str(g.prompt) AS prompt, j_str(g.negativePrompt) AS negativePrompt, j_digits(g.seed) AS seed,
    j_int(g.steps) AS steps, j_str(g.sampler) AS sampler, j_num(g.cfgScale) AS cfgScale,
    j_int(g.clipSkip) AS clipSkip, j_str(g.Size) AS Size,
    list_transform(g.resources, lambda x: struct_pack(
        name := j_str(x.name), type := j_str(x.type), weight := j_num(x.weight), hash := j_str(x.hash)
    )) AS resources,
    list_transform(g.civitaiResources, lambda x: struct_pack(
        type := j_str(x.type), weight := j_num(x.weight), modelVersionId := j_int(x.modelVersionId),
        modelVersionName := j_str(x.modelVersionName)
    )) AS civitaiResources,
    t.meta::VARCHAR AS meta,
    NULL::VARCHAR AS query, NULL::VARCHAR AS shard, $segment AS segment, n AS line,
    $media_columns,
    json(line)::VARCHAR = line AS canonical
FROM c $media_join
"""
_MEDIA = ("path", "size", "sha256", "content_type", "status")
QUERY = _QUERY.replace("$media_columns", ", ".join(f"m.{c} AS media_{c}" for c in _MEDIA)).replace(
    "$media_join", "LEFT JOIN media_now m ON m.id = j_int(c.t.id)"
)
QUERY_NO_MEDIA = _QUERY.replace(
    "$media_columns",
    ", ".join(f"NULL::{'BIGINT' if c == 'size' else 'VARCHAR'} AS media_{c}" for c in _MEDIA),
).replace("$media_join", "")

# An observation line of `harvest refresh` (archive/observations.py) as a row of OBSERVATION_SCHEMA.
_OBSERVATION = {
    **dict.fromkeys(("id", "observed_at", "pass", "gone", "nsfwLevel", "browsingLevel"), "JSON"),
    "stats": dict.fromkeys(STATS_KEYS, "JSON"),
}
OBSERVATION_QUERY = f"""
WITH a AS (SELECT n, json_transform(line, '{_structure(_OBSERVATION)}') AS t FROM lines)
SELECT j_int(t.id) AS id, TRY_CAST(j_str(t.observed_at) AS TIMESTAMPTZ) AS observed_at,
    j_int(t.pass) AS pass, j_bool(t.gone) AS gone,
    j_str(t.nsfwLevel) AS nsfwLevel, j_int(t.browsingLevel) AS browsingLevel,
    CASE WHEN t.stats IS NOT NULL THEN struct_pack({_STATS}) END AS stats,
    $segment AS segment, n AS line
FROM a
"""


_BATCH_ROWS = 4096


def connect(media: pa.Table | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the typing macros, timestamps read in UTC, every core in use;
    `media` (rows of MEDIA_SCHEMA: the media ledger) is what the image rows' media_* come from."""
    con = duckdb.connect(config={"threads": os.cpu_count() or 1})
    con.execute("SET TimeZone = 'UTC'")
    con.execute(_MACROS)
    con.register("media_now", MEDIA_SCHEMA.empty_table() if media is None else media)
    return con


def rows(
    con: duckdb.DuckDBPyConnection, block: Block, runs: pa.Table | None = None, media: bool = False
) -> pa.Table:
    """The block's lines as rows of `SCHEMA`, in line order; `media`: join the connection's media
    ledger (`connect(media)`; without it media_* are null); `runs` (RUNS_SCHEMA, ordered by
    first_line) says which shard wrote which lines of the block's segment."""
    table = _typed(con, block, QUERY if media else QUERY_NO_MEDIA)
    if runs is not None and len(runs):
        query, shard = _origins(block, runs)
        table = table.set_column(table.schema.get_field_index("query"), "query", query)
        table = table.set_column(table.schema.get_field_index("shard"), "shard", shard)
    _check_ids(table, block)
    table = _exact_meta(table, block)
    return table.cast(SCHEMA)


def _origins(block: Block, runs: pa.Table) -> tuple[pa.Array, pa.Array]:
    """The query and shard of each line of the block: the run (first_line, lines) holding it."""
    first, count = block.first, len(block)
    index: list[int | None] = [None] * count
    for k, (start, lines) in enumerate(
        zip(runs.column("first_line").to_pylist(), runs.column("lines").to_pylist(), strict=True)
    ):
        lo, hi = max(start, first), min(start + lines, first + count)
        if lo < hi:
            index[lo - first : hi - first] = [k] * (hi - lo)
    picks = pa.array(index, pa.int32())
    return pc.take(runs.column("query"), picks), pc.take(runs.column("shard"), picks)


def observation_rows(con: duckdb.DuckDBPyConnection, block: Block) -> pa.Table:
    """A block of observation lines as rows of `OBSERVATION_SCHEMA`, in line order."""
    table = _typed(con, block, OBSERVATION_QUERY)
    _check_ids(table, block)
    return table.cast(OBSERVATION_SCHEMA)


def _typed(con: duckdb.DuckDBPyConnection, block: Block, query: str) -> pa.Table:
    """`query` over the block's lines (table `lines`: n, line), its rows in line order."""
    numbers = pa.array(range(block.first, block.first + len(block)), pa.int64())
    # DuckDB scans an Arrow table one record batch per thread: several batches, every core busy.
    batches = pa.table({"n": numbers, "line": block.text}).to_batches(max_chunksize=_BATCH_ROWS)
    con.register("lines", pa.Table.from_batches(batches))
    try:
        table = con.sql(query.replace("$segment", _literal(block.segment))).to_arrow_table()
    except duckdb.Error as exc:
        raise _broken(con, block, exc) from None
    finally:
        con.unregister("lines")
    if not pc.all(pc.equal(table.column("line"), numbers)).as_py():
        table = table.sort_by("line")  # joins may reorder the rows: they are put back in line order
    return table


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _exact_meta(table: pa.Table, block: Block) -> pa.Table:
    """Replace `meta` where DuckDB's serialisation may differ from the stored bytes."""
    redo = pc.invert(table.column("canonical").combine_chunks())
    if block.changed:
        mask = [False] * len(block)
        for index in block.changed:
            mask[index] = True
        redo = pc.or_(redo, pa.array(mask))
    table = table.drop_columns(["canonical"])
    indices = pc.indices_nonzero(redo).to_pylist()
    if not indices:
        return table
    exact = [_stored_meta(block, index) for index in indices]
    metas = pc.replace_with_mask(table.column("meta").combine_chunks(), redo, pa.array(exact, pa.string()))
    return table.set_column(table.schema.get_field_index("meta"), "meta", metas)


def _stored_meta(block: Block, index: int) -> str | None:
    raw = exactjson.member_bytes(block.original(index), "meta")
    return None if raw is None or raw == b"null" else raw.decode("utf-8")


def _check_ids(table: pa.Table, block: Block) -> None:
    missing = table.column("id").null_count
    if missing:
        index = pc.indices_nonzero(pc.is_null(table.column("id"))).to_pylist()[0]
        raise StateError(f"{block.segment}:{block.first + index}: not an image with an integer id")


def _broken(con: duckdb.DuckDBPyConnection, block: Block, exc: duckdb.Error) -> StateError:
    """The first line DuckDB cannot read, named; the archive is broken there."""
    found = con.execute("SELECT min(n) FROM lines WHERE NOT json_valid(line)").fetchone()
    if found is not None and found[0] is not None:
        return StateError(f"{block.segment}:{found[0]}: not JSON")
    return StateError(
        f"{block.segment}: cannot read lines {block.first}-{block.first + len(block) - 1}: {exc}"
    )
