"""`harvest export` and `harvest sql` (issue 13), through the real CLI against the fake API.

Every exported row is compared, column by column, with what a plain-Python reading
of the served line says it must be (`expected_row`: the schema's rules written out
the simple way), for ordinary items and for hostile ones spliced into the pages
as raw bytes: a seed beyond 64 bits, lone surrogates, values of the wrong type,
the legacy path's nested meta, a line DuckDB would spell differently.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import math
import re
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import harvest
from crawler import exactjson
from crawler.archive.reader import committed_lines
from crawler.archive.state import STATE_FILE, State
from crawler.export import lines, typed
from crawler.export.schema import (
    CIVITAI_RESOURCE_KEYS,
    OBSERVATION_COLUMNS,
    SCHEMA,
    STATS_KEYS,
    markdown_table,
)
from crawler.export.sql import names_images
from crawler.testing import configs
from crawler.testing.fakeapi import Dataset, ImageQuery, ServerOptions, ServerThread
from crawler.testing.fakeapi.cdnfiles import CdnOptions
from crawler.testing.fakeapi.dataset import DatasetSpec

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = {5001: 230, 5002: 170, 5003: 90}

BIG_SEED = (
    b'{"id":77000001,"url":"https://image.civitai.com/k/u/original=true/u.jpeg","hash":"LKO2?U%2Tw=w",'
    b'"width":832,"height":1216,"nsfwLevel":"None","type":"image","nsfw":false,"browsingLevel":1,'
    b'"createdAt":"2024-05-01T12:00:00.123Z","postId":100001,"stats":{"cryCount":1,"laughCount":2,'
    b'"likeCount":3,"dislikeCount":0,"heartCount":4,"commentCount":5},"meta":{"seed":18446744073709552000,'
    b'"big":123456789012345678901234567890,"prompt":"a seed beyond 64 bits","steps":30,"cfgScale":7.5,'
    b'"clipSkip":2,"Size":"832x1216","sampler":"Euler a","resources":[{"name":"ponyRealism","type":"model",'
    b'"hash":"abc123","weight":1}],"civitaiResources":[{"type":"checkpoint","modelVersionId":5001,'
    b'"modelVersionName":"v1.0"},{"type":"lora","weight":0.65,"modelVersionId":18446744073709551616}]},'
    b'"username":"Ajuro","baseModel":"Pony","modelVersionIds":[5001,18446744073709551616]}'
)
SURROGATE = (
    b'{"id":77000002,"createdAt":"2024-05-02T00:00:00Z","postId":100002,"meta":{"prompt":"cut inside an '
    b'emoji \\ud83d","negativePrompt":"\\udc00 and a pair \\ud83d\\ude00, an escaped \\\\ud83d",'
    b'"seed":"123"},'
    b'"username":"caf\\u00e9 \\ud800","tags":[{"id":5133,"name":"woman"},7,null]}'
)
WRONG_TYPES = (
    b'{"id": 77000003, "width": 7.5, "height": "768", "nsfw": "false", "browsingLevel": true, '
    b'"createdAt": "not a date", "postId": 1e3, "stats": {"likeCount": "9", "heartCount": 2.0}, '
    b'"modelVersionIds": ["5001", 5002, null], "tags": {"id": 1}, '
    b'"meta": {"steps": "20", "cfgScale": "abc", "clipSkip": 2.0, "Size": 832, "seed": 1.5, '
    b'"sampler": null, "prompt": ["a"], "resources": [{"name": 1, "weight": "0.5"}, "x"], '
    b'"civitaiResources": [{"type": 1, "weight": "0.5", "modelVersionId": "5001", "modelVersionName": 2}, '
    b"7]}}"
)
LEGACY = b'{"id":77000004,"meta":{"id":77000004,"meta":{"prompt":"nested by the legacy path","seed":42}}}'
STRANGE_META = b'{"id":77000005,"meta":"just a string","stats":5}'
NO_META = b'{"id":77000006,"meta":null,"tags":[]}'
RAW = (
    ("modelVersionId", "5001", BIG_SEED),
    ("modelVersionId", "5002", SURROGATE),
    ("modelVersionId", "5002", WRONG_TYPES),
    ("modelVersionId", "5003", LEGACY),
    ("modelVersionId", "5003", STRANGE_META),
    ("modelVersionId", "5003", NO_META),
)


# -- the schema's rules, the simple way ------------------------------------------------


def _int(v: Any) -> int | None:
    return v if type(v) is int and -(2**63) <= v < 2**63 else None


def _num(v: Any) -> float | None:
    if type(v) not in (int, float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _str(v: Any) -> str | None:
    # A lone surrogate cannot be UTF-8: it becomes U+FFFD (the `meta` column keeps the escape).
    return re.sub("[\ud800-\udfff]", "\ufffd", v) if type(v) is str else None


def _bool(v: Any) -> bool | None:
    return v if type(v) is bool else None


def _seed(v: Any) -> str | None:
    if type(v) is int:
        return str(v)
    return v if type(v) is str and re.fullmatch(r"-?[0-9]+", v) else None


def _time(v: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(v).astimezone(dt.UTC) if type(v) is str else None
    except ValueError:
        return None


def _objects(v: Any, keys: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    if type(v) is not list:
        return None
    return [{k: f(x.get(k)) if type(x) is dict else None for k, f in keys.items()} for x in v]


def expected_row(line: bytes, segment: str, number: int) -> dict[str, Any]:
    """What the export must hold for one stored line."""
    item = exactjson.loads(line)
    meta = item.get("meta")
    gen = meta if type(meta) is dict else {}
    if gen.get("id") is not None and type(gen.get("meta")) is dict:
        gen = gen["meta"]  # the legacy path's envelope
    stats = item.get("stats")
    raw_meta = exactjson.member_bytes(line, "meta")
    mvids = item.get("modelVersionIds")
    return {
        "id": item["id"],
        **{k: _str(item.get(k)) for k in ("url", "hash", "nsfwLevel")},
        "width": _int(item.get("width")),
        "height": _int(item.get("height")),
        "nsfw": _bool(item.get("nsfw")),
        "browsingLevel": _int(item.get("browsingLevel")),
        "type": _str(item.get("type")),
        "createdAt": _time(item.get("createdAt")),
        "postId": _int(item.get("postId")),
        "username": _str(item.get("username")),
        "baseModel": _str(item.get("baseModel")),
        "modelVersionIds": [_int(x) for x in mvids] if type(mvids) is list else None,
        "stats": None
        if stats is None
        else {k: _int(stats.get(k)) if type(stats) is dict else None for k in STATS_KEYS},
        "tags": _objects(item.get("tags"), {"id": _int, "name": _str}),
        "prompt": _str(gen.get("prompt")),
        "negativePrompt": _str(gen.get("negativePrompt")),
        "seed": _seed(gen.get("seed")),
        "steps": _int(gen.get("steps")),
        "sampler": _str(gen.get("sampler")),
        "cfgScale": _num(gen.get("cfgScale")),
        "clipSkip": _int(gen.get("clipSkip")),
        "Size": _str(gen.get("Size")),
        "resources": _objects(
            gen.get("resources"), {"name": _str, "type": _str, "weight": _num, "hash": _str}
        ),
        "civitaiResources": _objects(
            gen.get("civitaiResources"),
            {"type": _str, "weight": _num, "modelVersionId": _int, "modelVersionName": _str},
        ),
        "meta": None if raw_meta in (None, b"null") else raw_meta.decode(),
        **dict.fromkeys(("query", "shard")),
        "segment": segment,
        "line": number,
        **dict.fromkeys(("media_path", "media_size", "media_sha256", "media_content_type", "media_status")),
    }


def expected_rows(out: Path) -> dict[int, dict[str, Any]]:
    """The rows of every committed line, with the shard that wrote it and its media, read from the
    state's tables the plain way."""
    with State.open(out, create=False) as state:
        lines = list(committed_lines(out, state))
    with sqlite3.connect(out / "harvest.sqlite") as conn:
        runs = conn.execute(
            "SELECT segment, first_line, lines, shard, query FROM runs JOIN shards ON key = shard"
        ).fetchall()
        media = {
            r[0]: r[1:]
            for r in conn.execute("SELECT id, path, size, sha256, content_type, status FROM media")
        }
    rows = []
    for line in lines:
        row = expected_row(line.data.rstrip(b"\n"), line.segment, line.number)
        [(shard, query)] = [
            (r[3], r[4]) for r in runs if r[0] == line.segment and r[1] <= line.number < r[1] + r[2]
        ]
        row["shard"], row["query"] = shard, query
        names = ("media_path", "media_size", "media_sha256", "media_content_type", "media_status")
        row.update(zip(names, media.get(row["id"], (None,) * 5), strict=True))
        rows.append(row)
    return {row["id"]: row for row in rows}


# -- the DuckDB typing against the rules, on any item -------------------------------------

TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud83d", "\udc00 x", "a\\ud83d", "café ✨", "\x00"]))
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.sampled_from(["20", "-7", "7.5", "18446744073709552000"]),
)
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=12,
)
WHEN = st.sampled_from(
    ["2024-05-01T12:00:00.123Z", "2023-01-01T00:00:00+02:00", "2024-02-30T00:00:00Z", "soon", 5]
)
RESOURCE = st.fixed_dictionaries({}, optional=dict.fromkeys(("name", "type", "weight", "hash"), VALUE))
CIVITAI_RESOURCE = st.fixed_dictionaries({}, optional=dict.fromkeys(CIVITAI_RESOURCE_KEYS, VALUE))
GEN = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(
            ("prompt", "negativePrompt", "seed", "steps", "sampler", "cfgScale", "clipSkip", "Size"), VALUE
        ),
        "resources": st.one_of(VALUE, st.lists(st.one_of(RESOURCE, VALUE), max_size=3)),
        "civitaiResources": st.one_of(VALUE, st.lists(st.one_of(CIVITAI_RESOURCE, VALUE), max_size=3)),
    },
)
META = st.one_of(VALUE, GEN, st.builds(lambda g: {"id": 1, "meta": g}, GEN))
FIELDS = (
    "url",
    "hash",
    "width",
    "height",
    "nsfwLevel",
    "nsfw",
    "browsingLevel",
    "type",
    "postId",
    "username",
)
ITEM = st.fixed_dictionaries(
    {"id": st.integers(1, 2**62)},
    optional={
        **dict.fromkeys(FIELDS, VALUE),
        "baseModel": VALUE,
        "createdAt": WHEN,
        "stats": st.one_of(VALUE, st.fixed_dictionaries({}, optional=dict.fromkeys(STATS_KEYS, VALUE))),
        "meta": META,
        "modelVersionIds": st.one_of(VALUE, st.lists(VALUE, max_size=3)),
        "tags": st.one_of(
            VALUE, st.lists(st.one_of(VALUE, st.fixed_dictionaries({"id": VALUE, "name": VALUE})))
        ),
    },
)
_CON: list[duckdb.DuckDBPyConnection] = []


def node_line(item: Any, style: str) -> bytes:
    """As Node writes it ("node"), all non-ASCII escaped ("ascii") or with spaces ("spaced")."""
    if style == "ascii":
        return json.dumps(item, separators=(",", ":")).encode()
    text = json.dumps(item, ensure_ascii=False, separators=(", ", ": ") if style == "spaced" else (",", ":"))
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text).encode()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(ITEM, st.sampled_from(["node", "ascii", "spaced"])), min_size=1, max_size=6))
def test_duckdb_types_every_value_by_the_rules(items: list[tuple[dict[str, Any], str]]) -> None:
    stored = [node_line(item, style) for item, style in items]
    text, changed = lines._replace_lone_surrogates(b"\n".join(stored) + b"\n")
    block = lines.Block("images-000007.ndjson", 11, lines._split(text, "s", 11), len(text), changed)
    if not _CON:
        _CON.append(typed.connect())
    got = typed.rows(_CON[0], block).to_pylist()
    want = [expected_row(line, "images-000007.ndjson", 11 + n) for n, line in enumerate(stored)]
    for row, expected in zip(got, want, strict=True):
        for column, value in expected.items():
            assert row[column] == value or (value != value and row[column] != row[column]), (
                column,
                row,
                value,
            )


# -- helpers ---------------------------------------------------------------------------


def dataset() -> Dataset:
    spec = {
        "seed": 7,
        "models": {"500": {"versions": [{"id": v, "images": n} for v, n in VERSIONS.items()]}},
        "posts": 8,
        "users": 5,
        "hidden_rate": 0.05,
    }
    return Dataset(DatasetSpec.from_dict(spec))


def config(tmp_path: Path, base_url: str, output: Mapping[str, Any] | None = None, **query: Any) -> Path:
    queries = [
        {"modelId": 500, "browsingLevel": 31, "withMeta": True, "withTags": True, "sort": "Newest", **query}
    ]
    api: dict[str, Any] = {"requests_per_second": 500, "concurrency": 4, "timeout": 5, "max_backoff": 0.05}
    return configs.write_config(tmp_path / "cfg.toml", base_url, queries, "out", output, **api)


def harvested(
    tmp_path: Path, data: Dataset | None = None, output: Mapping[str, Any] | None = None, **query: Any
) -> Path:
    data = data or dataset()
    with ServerThread(data, options=ServerOptions(raw_items=RAW)) as api:
        cfg = config(tmp_path, api.base_url, output, **query)
        result = harvest("run", cfg)
    assert result.code == 0, result.stderr
    # Complete: the spliced raw items, served at the head of every page from both ends, end no
    # walk early (the values below are compared with the archive; this, with the server).
    served = {
        i for v in VERSIONS for i in data.walk_ids(ImageQuery(model_version_id=v, levels=31, sort="Newest"))
    }
    with sqlite3.connect(tmp_path / "out" / STATE_FILE) as conn:
        harvested_ids = {row[0] for row in conn.execute("SELECT id FROM seen")}
    assert harvested_ids == served | {int(re.findall(rb'"id": ?(\d+)', raw)[0]) for _, _, raw in RAW}
    return cfg


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def read_parquet(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in parquet_files(folder)])


def by_id(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    found = {row["id"]: dict(row) for row in rows}
    assert len(found) == len(rows), "an id is exported twice"
    return found


def assert_rows_equal(got: Mapping[int, Mapping[str, Any]], want: Mapping[int, Mapping[str, Any]]) -> None:
    assert set(got) == set(want)
    for image_id, row in want.items():
        for column, value in row.items():
            assert got[image_id][column] == value, (image_id, column, got[image_id][column], value)


def export(cfg: Path, *args: str) -> str:
    result = harvest("export", cfg, *args)
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def sql(cfg: Path, query: str, fmt: str = "json") -> Any:
    result = harvest("sql", cfg, query, "--format", fmt)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout) if fmt == "json" else result.stdout


# -- export ----------------------------------------------------------------------------


def test_export_holds_every_served_value_typed_by_the_schema(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    out = tmp_path / "out"
    want = expected_rows(out)
    assert f"exported {len(want)} new images to 1 parquet file(s)" in export(cfg)
    table = read_parquet(out / "export")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"civitai-harvest.schema"] == b"3"
    assert_rows_equal(by_id(table.to_pylist()), want)
    # The hostile items, spelled out: exact digits, lone surrogates, wrong types made null.
    big, cut, odd, legacy = (want[i] for i in (77000001, 77000002, 77000003, 77000004))
    assert big["seed"] == "18446744073709552000" and big["modelVersionIds"] == [5001, None]
    assert big["meta"] == BIG_SEED.split(b'"meta":')[1].split(b',"username"')[0].decode()
    assert cut["prompt"] == "cut inside an emoji \ufffd" and cut["seed"] == "123"
    assert "\\ud83d" in cut["meta"] and cut["username"] == "café \ufffd"
    assert (
        odd["width"] is None and odd["steps"] is None and odd["cfgScale"] is None and odd["clipSkip"] is None
    )
    assert odd["meta"].startswith('{"steps": "20"')  # as stored, spaces and all
    assert legacy["prompt"] == "nested by the legacy path" and legacy["seed"] == "42"
    assert big["civitaiResources"] == [
        {"type": "checkpoint", "weight": None, "modelVersionId": 5001, "modelVersionName": "v1.0"},
        {"type": "lora", "weight": 0.65, "modelVersionId": None, "modelVersionName": None},  # > 64 bits
    ]
    assert odd["civitaiResources"] == [
        dict.fromkeys(CIVITAI_RESOURCE_KEYS),
        dict.fromkeys(CIVITAI_RESOURCE_KEYS),
    ]
    # The fake's on-site generations: `resources` empty, what they used in `civitaiResources`.
    served = [r for i, r in want.items() if i < 77000000 and r["civitaiResources"]]
    assert served and all(r["resources"] == [] for r in served)
    assert {c["type"] for r in served for c in r["civitaiResources"]} >= {"checkpoint", "lora"}
    # Each line names the shard whose page wrote it: the raw items were served to one version each.
    assert "modelVersionId=5001" in big["shard"] and "modelVersionId=5003" in legacy["shard"]
    assert {r["query"] for r in want.values()} == {"query-1"}
    # The file: zstd-compressed, and the same rows through DuckDB's own Parquet reader.
    column = pq.ParquetFile(parquet_files(out / "export")[0]).metadata.row_group(0).column(0)
    assert column.compression == "ZSTD"
    glob = str(out / "export" / "*.parquet")
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        cursor = con.execute(f"SELECT * FROM read_parquet('{glob}')")
        names = [d[0] for d in cursor.description or ()]
        rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    assert names == SCHEMA.names
    assert_rows_equal(by_id(rows), want)


def test_a_second_export_writes_only_what_is_new_and_full_rewrites(tmp_path: Path) -> None:
    data = dataset()
    cfg = harvested(tmp_path, data)
    folder = tmp_path / "out" / "export"
    export(cfg)
    first = read_parquet(folder).num_rows
    added = set(data.add_images(5002, 25))
    harvested(tmp_path, data)
    assert "exported 25 new images to 1 parquet file(s)" in export(cfg)
    assert [p.name for p in parquet_files(folder)] == ["images-000001.parquet", "images-000002.parquet"]
    assert set(pq.read_table(folder / "images-000002.parquet").column("id").to_pylist()) == added
    rows = by_id(read_parquet(folder).to_pylist())
    assert_rows_equal(rows, expected_rows(tmp_path / "out"))
    total = first + 25
    assert len(rows) == total and f"nothing new to export; {total} images" in export(cfg)
    assert len(parquet_files(folder)) == 2
    manifest = orjson.loads((folder / "manifest.json").read_bytes())["formats"]["parquet"]
    assert manifest["rows"] == total and [f["rows"] for f in manifest["files"]] == [first, 25]
    assert f"exported {total} images to 1 parquet file(s)" in export(cfg, "--full")
    assert [p.name for p in parquet_files(folder)] == ["images-000003.parquet"]
    assert_rows_equal(by_id(read_parquet(folder).to_pylist()), rows)


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_compressed_segments_export_and_an_uncommitted_tail_does_not(tmp_path: Path, codec: str) -> None:
    # 470 images in pages of at most 50 new ones (53 with the spliced raw items): two closed
    # segments of 160..212 hold 320..424, the rest (46..150) never closes, so an active segment
    # is left whatever order the pages are committed in.
    cfg = harvested(tmp_path, output={"segment_items": 160, "compress": codec}, limit=50)
    out = tmp_path / "out"
    suffix = {"zstd": ".zst", "gzip": ".gz"}[codec]
    assert len(list(out.glob(f"images-*.ndjson{suffix}"))) >= 2
    [active] = out.glob("images-*.ndjson")
    with active.open("ab") as f:  # a page written, never committed, torn
        f.write(b'{"id":99000001,"meta":null}\n{"id":99000002,"me')
    export(cfg, "--file-mb", "0.02")  # small files: the export is split in several
    folder = out / "export"
    assert len(parquet_files(folder)) > 1
    got = by_id(read_parquet(folder).to_pylist())
    assert 99000001 not in got
    assert_rows_equal(got, expected_rows(out))
    assert sql(cfg, "SELECT count(*) AS n, max(id) AS top FROM images") == [{"n": len(got), "top": max(got)}]


def test_jsonl_gz_holds_the_same_rows(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    export(cfg, "--format", "jsonl.gz", "--to", str(tmp_path / "json"))
    export(cfg, "--to", str(tmp_path / "json"))  # both formats in one dir, each with its own files
    folder = tmp_path / "json"
    [packed] = sorted(folder.glob("*.jsonl.gz"))
    lines = gzip.decompress(packed.read_bytes()).decode().splitlines()
    rows = by_id([json.loads(line) for line in lines])
    parquet = by_id(read_parquet(folder).to_pylist())
    assert list(rows[77000001]) == SCHEMA.names
    for image_id, row in parquet.items():
        created = row["createdAt"]
        row["createdAt"] = None if created is None else created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert rows[image_id] == row, image_id
    assert rows[77000001]["seed"] == "18446744073709552000"


def test_files_an_interrupted_export_left_are_swept(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    folder = tmp_path / "out" / "export"
    export(cfg)
    (folder / "images-000002.parquet").write_bytes(b"half a file from a killed export")
    (folder / "images-000003.parquet.part").write_bytes(b"partial")
    (folder / "notes.txt").write_text("the user's own")
    assert "nothing new" in export(cfg)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".export.lock",
        "images-000001.parquet",
        "manifest.json",
        "notes.txt",
    ]


def test_an_export_dir_of_another_archive_is_refused(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    folder = tmp_path / "shared-export"
    export(cfg, "--to", str(folder))
    manifest = orjson.loads((folder / "manifest.json").read_bytes())
    manifest["source"] = "/somewhere/else"
    (folder / "manifest.json").write_bytes(orjson.dumps(manifest))
    result = harvest("export", cfg, "--to", folder)
    assert result.code == 2 and "holds an export of /somewhere/else" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "exported" in export(cfg, "--to", str(folder), "--full")


def test_a_bad_to_is_one_line_and_exit_2_and_makes_nothing(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    (tmp_path / "a-file").write_text("not a dir")
    before = sorted(tmp_path.rglob("*"))
    for to, message in [
        ("ftp://x/y", 'ftp://x/y: not a local dir, and the only URLs taken are "s3://bucket/prefix"'),
        ("HTTPS://host/x", "HTTPS://host/x: not a local dir"),
        ("s3://Bad_Bucket/x", 's3://Bad_Bucket/x: "Bad_Bucket" is not a bucket name'),
        (str(tmp_path / "a-file"), f"--to {tmp_path / 'a-file'}: not a directory"),
        (str(tmp_path / "a-file" / "sub"), f"not a directory ({tmp_path / 'a-file'} is not a directory)"),
    ]:
        result = harvest("export", cfg, "--to", to, cwd=tmp_path)  # a relative "ftp:" would land here
        assert result.code == 2, (to, result.stderr)
        assert result.stderr.startswith("harvest: error: --to ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no "ftp:" dir, no export dir, no lock file
    assert f"images in {tmp_path / 'ok'}/" in export(cfg, "--to", f"{tmp_path / 'ok'}/")  # as given


def test_export_before_any_harvest_is_one_line(tmp_path: Path) -> None:
    cfg = config(tmp_path, "http://127.0.0.1:9/api/v1")
    result = harvest("export", cfg)
    assert result.code == 1 and "no harvest state here yet" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- sql -------------------------------------------------------------------------------


def test_sql_views_over_the_archive(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    export(cfg)
    parquet = by_id(read_parquet(tmp_path / "out" / "export").to_pylist())
    rows = sql(cfg, "SELECT id, seed, prompt, meta, steps, line FROM images ORDER BY id")
    assert [r["id"] for r in rows] == sorted(parquet)
    for row in rows:
        assert {k: parquet[row["id"]][k] for k in row} == row
    assert sql(cfg, "SELECT count(meta) AS with_meta FROM images")[0]["with_meta"] == sum(
        1 for r in parquet.values() if r["meta"] is not None
    )
    shards = sql(cfg, "SELECT query, status, items FROM shards ORDER BY key")
    assert len(shards) >= 3 and {s["status"] for s in shards} == {"done"}  # 3 versions, their other ends
    assert sum(s["items"] for s in shards) == len(parquet)
    assert sql(cfg, "SELECT count(*) AS n FROM media") == [{"n": 0}]
    assert sql(cfg, "SELECT count(*) AS n FROM observations") == [{"n": 0}]  # no refresh yet
    assert sql(cfg, "SELECT count(gone) AS n FROM images") == [{"n": 0}]
    assert sql(cfg, "SELECT sum(items) AS n FROM segments") == [{"n": len(parquet)}]
    monthly = sql(
        cfg,
        "SELECT baseModel, date_trunc('month', createdAt) AS month, count(*) AS images FROM images "
        "GROUP BY ALL ORDER BY month, baseModel NULLS FIRST",
    )
    assert sum(m["images"] for m in monthly) == len(parquet)
    csv_text = sql(cfg, "SELECT id, seed FROM images WHERE id = 77000001", "csv")
    assert csv_text == "id,seed\n77000001,18446744073709552000\n"
    table = sql(cfg, "SELECT id, prompt FROM images WHERE id = 77000002", "table")
    assert "77000002" in table and "cut inside an emoji \ufffd" in table


def test_sql_types_only_what_was_committed_since_its_last_call(tmp_path: Path) -> None:
    data = dataset()
    cfg = harvested(tmp_path, data)
    count = "SELECT count(*) AS n FROM images"
    first = sql(cfg, count)[0]["n"]
    cache = tmp_path / "out" / "sql-cache"
    data.add_images(5003, 9)
    harvested(tmp_path, data)
    assert sql(cfg, count) == [{"n": first + 9}]
    manifest = orjson.loads((cache / "manifest.json").read_bytes())
    assert [f["rows"] for f in manifest["formats"]["parquet"]["files"]] == [first, 9]
    manifest["formats"]["parquet"]["schema_version"] = 0  # a cache from another harvest version
    (cache / "manifest.json").write_bytes(orjson.dumps(manifest))
    assert sql(cfg, count) == [{"n": first + 9}]  # started over, not refused
    assert [p.name for p in parquet_files(cache)] == ["images-000003.parquet"]
    assert harvest("verify", cfg).code == 0  # the cache is no part of the archive


def test_images_is_made_only_for_a_query_that_names_it() -> None:
    assert names_images('SELECT count(*) FROM "Images"') and names_images("select * from images;")
    assert not names_images("SELECT * FROM shards WHERE query = 'my_images_2'")
    assert not names_images("SELECT key, status FROM shards")


def test_sql_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = harvested(tmp_path)
    for query, message in [
        ("SELEC 1", 'syntax error at or near "SELEC"'),
        ("SELECT * FROM imgs", 'Did you mean "images"?'),
        ("SELECT CAST(prompt AS INTEGER) FROM images WHERE prompt IS NOT NULL", "Conversion Error"),
        ("", "the query holds no statement"),
        ("   \n ", "the query holds no statement"),
        ("-- nothing", "the query holds no statement"),
        ("/* x */ ;", "the query holds no statement"),
    ]:
        result = harvest("sql", cfg, query)
        assert result.code == 2, result.stderr
        assert result.stderr.startswith("harvest: error: SQL: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stdout == ""


# -- docs ------------------------------------------------------------------------------


def test_the_readme_shows_the_schema_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme
    assert markdown_table(OBSERVATION_COLUMNS, "what it is") in readme


# -- media -----------------------------------------------------------------------------


def test_media_columns_carry_the_ledger_and_sql_shows_it_as_it_is_now(tmp_path: Path) -> None:
    from test_media import media_config, media_dataset, media_rows

    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        cfg = media_config(tmp_path / "c.toml", api, download=False)
        assert harvest("run", cfg).code == 0
        out = tmp_path / "out"
        export(cfg, "--to", str(tmp_path / "before"))  # before any media: the columns are null
        before = read_parquet(tmp_path / "before").to_pylist()
        assert {(r["media_path"], r["media_status"]) for r in before} == {(None, None)}
        fetched = harvest("media", cfg)
        assert fetched.code == 0, fetched.stderr
    export(cfg)
    ledger = media_rows(out)
    rows = by_id(read_parquet(out / "export").to_pylist())
    assert_rows_equal(rows, expected_rows(out))
    done = [r for r in rows.values() if r["media_status"] == "done"]
    assert done and {r["media_status"] for r in rows.values()} <= {"done", "gone", None}
    for row in done:
        data = (out / "media" / row["media_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["media_sha256"] == ledger[row["id"]]["sha256"]
        assert (
            len(data) == row["media_size"] and row["media_content_type"] == ledger[row["id"]]["content_type"]
        )
    # The export written before the media keeps its nulls (incremental: nothing new); `harvest sql`
    # joins the ledger as it is now.
    assert "nothing new" in export(cfg, "--to", str(tmp_path / "before"))
    query = "SELECT id, media_path, media_sha256, media_status FROM images ORDER BY id"
    now = sql(cfg, query)
    assert [r["id"] for r in now] == sorted(rows)
    for r in now:
        assert (r["media_path"], r["media_sha256"], r["media_status"]) == (
            rows[r["id"]]["media_path"],
            rows[r["id"]]["media_sha256"],
            rows[r["id"]]["media_status"],
        )
    assert sql(cfg, "SELECT count(*) AS n FROM media WHERE status = 'done'") == [{"n": len(done)}]
