"""Publishing to object storage through the real CLI, against moto on 127.0.0.1 (tests/objectstore.py):
closed segments and media files once each, byte-exact, through kill -9 mid-upload and 500s."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import HARVEST, harvest, make_dataset, media_table, write_config
from crawler.config import parse_config
from crawler.errors import ConfigError, ExitCode
from crawler.testing.fakeapi import Dataset, FakeServer, ServerOptions
from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdnfiles import CdnOptions
from objectstore import ObjectStoreFixture

QUERY = {"modelId": 500, "sort": "Newest", "browsingLevel": 31}


def _dataset() -> Dataset:
    return make_dataset({5001: 50, 5002: 30})


def _config(
    path: Path,
    api: FakeServer,
    store: ObjectStoreFixture,
    *,
    keep_local: bool = False,
    segment_items: int = 25,
    compress: str = "zstd",
    **media: Any,
) -> Path:
    output = {
        "segment_items": segment_items,
        "compress": compress,
        "publish": store.url,
        "keep_local": keep_local,
    }
    return write_config(path, api.base_url, [QUERY], output=output, media=media_table(api, **media))


def _rows(out: Path, table: str) -> list[dict[str, Any]]:
    with sqlite3.connect(out / "harvest.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(f"SELECT * FROM {table}")]


def _lines(name: str, data: bytes) -> list[bytes]:
    if name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data.splitlines(keepends=True)


def assert_published(api: FakeServer, out: Path, store: ObjectStoreFixture, *, keep_local: bool) -> None:
    """The store holds every closed segment and every media file done, once, byte-exact; nothing
    else; with keep_local = false their local copies are gone."""
    assert api.cdn is not None
    objects = store.objects()
    segments = [{**s, "file": s["file"] or s["name"]} for s in _rows(out, "segments") if s["closed"]]
    media = [m for m in _rows(out, "media") if m["status"] == "done"]
    prefix = store.root.prefix
    expected = {f"{prefix}/{s['file']}" for s in segments} | {f"{prefix}/media/{m['path']}" for m in media}
    assert segments and media and set(objects) == expected
    assert store.unfinished() == []
    # Each created once, over every run of the test: nothing was uploaded twice.
    assert sorted(store.proxy.created().values()) == [1] * len(expected)
    ids: list[int] = []
    for segment in segments:
        lines = _lines(segment["file"], objects[f"{prefix}/{segment['file']}"])
        assert len(lines) == segment["items"] and sum(map(len, lines)) == segment["size"]
        ids += [orjson.loads(line)["id"] for line in lines]
        assert (out / segment["file"]).exists() == keep_local
    assert len(ids) == len(set(ids))
    for row in media:
        data = objects[f"{prefix}/media/{row['path']}"]
        assert len(data) == row["size"] and hashlib.sha256(data).hexdigest() == row["sha256"]
        assert (out / "media" / row["path"]).exists() == keep_local
    published = _rows(out, "published")
    assert len(published) == len(expected) and all(p["local"] == int(keep_local) for p in published)


def test_run_publishes_once_and_status_verify_sql_read_the_store(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    with ServerThread(_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _config(tmp_path / "c.toml", api, objectstore)
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        out = tmp_path / "out"
        assert_published(api, out, objectstore, keep_local=False)
        again = harvest("run", config)  # a new pass: nothing new to publish, nothing sent twice
        assert again.code == ExitCode.OK, again.stderr
        assert_published(api, out, objectstore, keep_local=False)
        status = harvest("status", config)
        assert status.code == ExitCode.OK and "missing" not in status.stdout
        closed = sum(s["closed"] for s in _rows(out, "segments"))
        assert (
            f"published: {closed} segments" in status.stdout
            and f"{closed} only in the store" in status.stdout
        )
        verify = harvest("verify", config)
        assert verify.code == ExitCode.OK, verify.stdout + verify.stderr
        assert "read from the object store" in verify.stdout
        total = len(_rows(out, "seen"))
        sql = harvest(
            "sql", config, "SELECT count(*) AS n, count(DISTINCT id) AS d FROM images", "--format", "json"
        )
        assert sql.code == ExitCode.OK, sql.stderr
        assert orjson.loads(sql.stdout) == [{"n": total, "d": total}]


def test_verify_names_an_object_changed_or_gone_in_the_store(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    with ServerThread(_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _config(tmp_path / "c.toml", api, objectstore, types=["image"])
        assert harvest("run", config).code == ExitCode.OK
    fs = objectstore.server.client()
    segment = next(k for k in objectstore.sizes() if k.endswith(".zst"))
    image = next(k for k in objectstore.sizes() if "/media/" in k)
    fs.pipe_file(f"{objectstore.bucket}/{segment}", b"not the segment")
    fs.rm_file(f"{objectstore.bucket}/{image}")
    verify = harvest("verify", config)
    assert verify.code == ExitCode.ERROR
    assert f"s3://{objectstore.bucket}/{segment}: 15 bytes" in verify.stdout
    assert f"s3://{objectstore.bucket}/{image}: missing from the store" in verify.stdout


def _start(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    return subprocess.Popen(
        [HARVEST, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )


def _kill_while_held(
    objectstore: ObjectStoreFixture, config: Path, match: Any, *, answered: bool = False
) -> None:
    """`harvest run` killed (-9) while the store's proxy holds the first request `match` takes
    (its body unread, or with `answered` its answer held back); then the proxy lets go."""
    objectstore.proxy.hold_next(match, answered=answered)
    proc = _start(config)
    try:
        assert objectstore.proxy.wait_held(timeout=120), "no request was held"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    objectstore.proxy.release()


def _segment_put(method: str, path: str, query: str) -> bool:
    return method == "PUT" and path.endswith(".ndjson.zst")


def _second_part(method: str, path: str, query: str) -> bool:
    return method == "PUT" and "partNumber=2" in query


@pytest.mark.parametrize(
    ("match", "video_mb"),
    [(_segment_put, None), (_second_part, 17.0)],
    ids=["segment-put", "media-multipart"],
)
def test_kill_mid_upload_then_resume_every_object_once(
    objectstore: ObjectStoreFixture, tmp_path: Path, match: Any, video_mb: float | None
) -> None:
    options = ServerOptions(cdn=CdnOptions(seed=3, video_mb=video_mb, gone_rate=0, cache_miss_rate=0))
    dataset = make_dataset({5001: 20}) if video_mb else _dataset()
    with ServerThread(dataset, options=options) as api:
        types = ["video"] if video_mb else ["image", "video"]
        config = _config(tmp_path / "c.toml", api, objectstore, types=types, segment_items=5)
        _kill_while_held(objectstore, config, match)
        held = [p for p in objectstore.proxy.log if match(p.method, p.path, p.query)]
        assert not any(p.creates for p in held)  # the held request never reached the store
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        assert_published(api, tmp_path / "out", objectstore, keep_local=False)
        if video_mb:
            parts = [p for p in objectstore.proxy.log if "partNumber=" in p.query]
            assert parts, "the video went up in parts"


def test_kill_after_the_store_has_a_segment_before_it_is_recorded_then_resume_uploads_nothing_twice(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    """The window between the store and the state: a closed segment's PUT reaches the store (the
    object is there, whole) and its answer is held back; `kill -9` then. The rerun finds the
    object by a HEAD (size and ETag as the local file's), records it, and does not send it again."""
    options = ServerOptions(cdn=CdnOptions(seed=3, gone_rate=0, cache_miss_rate=0))
    with ServerThread(_dataset(), options=options) as api:
        config = _config(tmp_path / "c.toml", api, objectstore, types=["image"], segment_items=5)
        _kill_while_held(objectstore, config, _segment_put, answered=True)
        (held,) = [p for p in objectstore.proxy.log if _segment_put(p.method, p.path, p.query)]
        assert held.creates  # the store has the object ...
        key = held.path.removeprefix(f"/{objectstore.bucket}/")
        assert key in objectstore.sizes()
        out = tmp_path / "out"
        url = f"s3://{objectstore.bucket}/{key}"
        assert url not in {row["url"] for row in _rows(out, "published")}  # ... the state does not
        killed_at = len(objectstore.proxy.log)
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        assert_published(api, out, objectstore, keep_local=False)
        rerun = objectstore.proxy.log[killed_at:]
        assert any(p.method == "HEAD" and p.path == held.path for p in rerun)  # found in the store
        puts: dict[str, int] = {}
        for passed in objectstore.proxy.log:
            if passed.method == "PUT":
                puts[passed.path] = puts.get(passed.path, 0) + 1
        assert puts[held.path] == 1 and set(puts.values()) == {1}  # each key PUT once, over both runs
    verify = harvest("verify", config)
    assert verify.code == ExitCode.OK, verify.stdout + verify.stderr


def test_a_500_from_the_store_is_retried_and_one_that_lasts_stops_the_run(
    objectstore: ObjectStoreFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ServerThread(_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _config(tmp_path / "c.toml", api, objectstore, keep_local=True, types=["image"])
        objectstore.proxy.fail_next(1000)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore gives up at once: the run must stop
        stopped = harvest("run", config)
        assert stopped.code == ExitCode.ERROR
        (line,) = [line for line in stopped.stderr.splitlines() if "error" in line]
        assert f"s3://{objectstore.bucket}/archive/" in line and "upload failed" in line
        assert objectstore.sizes() == {} and _rows(tmp_path / "out", "published") == []
        objectstore.proxy.reset()
        monkeypatch.delenv("AWS_MAX_ATTEMPTS")
        objectstore.proxy.fail_next(3)  # a few 500s: botocore retries them, the run goes on
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        assert [p.status for p in objectstore.proxy.log if p.injected] == [500, 500, 500]
        assert_published(api, tmp_path / "out", objectstore, keep_local=True)


def test_a_full_bucket_quota_stops_the_run_keeping_what_is_not_published_and_a_rerun_completes(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    with ServerThread(_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _config(tmp_path / "c.toml", api, objectstore, types=["image"])
        objectstore.proxy.quota(150_000)  # room for some of the objects, not all
        stopped = harvest("run", config)
        assert stopped.code == ExitCode.ERROR, stopped.stderr
        (line,) = [line for line in stopped.stderr.splitlines() if "error" in line]
        assert "upload failed" in line and "quota exceeded" in line.lower(), line
        assert any(p.injected and p.status == 400 for p in objectstore.proxy.log)
        out = tmp_path / "out"
        published = _rows(out, "published")
        stored = {f"s3://{objectstore.bucket}/{key}" for key in objectstore.sizes()}
        assert published and {row["url"] for row in published} <= stored
        dropped = {row["url"].rsplit("/", 1)[1] for row in published if not row["local"]}
        for segment in _rows(out, "segments"):  # a local copy is dropped only once it is in the store
            file = segment["file"] or segment["name"]
            assert (out / file).exists() or file in dropped, file
        for row in _rows(out, "media"):
            if row["status"] == "done":
                assert (out / "media" / row["path"]).exists() or row["path"].rsplit("/", 1)[-1] in dropped
        objectstore.proxy.quota(None)  # the quota raised
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        assert_published(api, out, objectstore, keep_local=False)


def test_publish_and_keep_local_turned_on_for_an_existing_archive(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    with ServerThread(_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _config(
            tmp_path / "c.toml", api, objectstore, keep_local=True, types=["image"], compress="none"
        )
        text = config.read_text()
        config.write_text(text.replace(f'publish = "{objectstore.url}"\nkeep_local = true\n', ""))
        assert harvest("run", config).code == ExitCode.OK  # no publish: nothing in the store
        assert objectstore.sizes() == {}
        config.write_text(text)  # publish, keeping the local copies
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        assert_published(api, tmp_path / "out", objectstore, keep_local=True)
        config.write_text(text.replace("keep_local = true", "keep_local = false"))
        result = harvest("run", config)
        assert result.code == ExitCode.OK, result.stderr
        assert_published(api, tmp_path / "out", objectstore, keep_local=False)
        again = harvest("run", config)  # plain segments only in the store: the files still agree
        assert again.code == ExitCode.OK, again.stderr
    verify = harvest("verify", config)
    assert verify.code == ExitCode.OK, verify.stdout + verify.stderr
    assert "read from the object store" in verify.stdout


def test_refresh_segments_go_to_the_store_and_export_writes_parquet_there(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    target = f"s3://{objectstore.bucket}/exports/images"
    with ServerThread(_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _config(tmp_path / "c.toml", api, objectstore, download=False)
        assert harvest("run", config).code == ExitCode.OK
        assert harvest("refresh", config).code == ExitCode.OK
        result = harvest("export", config, "--to", target)
        assert result.code == ExitCode.OK, result.stderr
        assert result.stderr.rstrip().endswith(f"images in {target}"), result.stderr  # the URL as given
        again = harvest("export", config, "--to", target)  # incremental: nothing new
        assert again.code == ExitCode.OK, again.stderr
        first = objectstore.objects()
        # A second pass starts with the first's closed refresh segment only in the store.
        second = harvest("refresh", config)
        assert second.code == ExitCode.OK, second.stderr
        third = harvest("export", config, "--to", target)  # new observations: latest is replaced
        assert third.code == ExitCode.OK, third.stderr
    out, prefix = tmp_path / "out", objectstore.root.prefix
    ids, segments = len(_rows(out, "seen")), _rows(out, "refresh_segments")
    closed = [s for s in segments if s["closed"]]
    assert len(closed) == 2  # a batch (up to 100 ids) is appended whole: each pass filled one
    objects = objectstore.objects()
    for segment in closed:
        assert not (out / segment["file"]).exists()
        lines = _lines(segment["file"], objects[f"{prefix}/{segment['file']}"])
        assert len(lines) == segment["items"] and sum(map(len, lines)) == segment["size"]
    archive = {
        k: n
        for k, n in objectstore.proxy.created().items()
        if k.startswith(f"/{objectstore.bucket}/{prefix}/")
    }
    assert len(archive) == len([k for k in objects if k.startswith(f"{prefix}/")])
    assert set(archive.values()) == {1}  # nothing published twice
    assert {s["name"] for s in closed} <= {p["name"] for p in _rows(out, "published")}
    verify = harvest("verify", config)
    assert verify.code == ExitCode.OK, verify.stdout + verify.stderr
    assert f"{2 * ids} observations in {len(segments)} refresh segment(s): sound" in verify.stdout
    assert "refresh-000001.ndjson.zst: read from the object store" in verify.stdout
    query = "SELECT count(*) AS n, count(DISTINCT id) AS d FROM observations"
    sql = harvest("sql", config, query, "--format", "json")
    assert sql.code == ExitCode.OK, sql.stderr
    assert orjson.loads(sql.stdout) == [{"n": 2 * ids, "d": ids}]
    # The export in the store: images once, every observation, the latest one per id.
    files = sorted(k for k in objects if k.startswith("exports/images/") and k.endswith(".parquet"))
    images = [k for k in files if k.count("/") == 2]
    assert images and sorted(k for k in objects if k.startswith("exports/")) == sorted(
        [*files, "exports/images/manifest.json"]
    )
    assert {k for k in first if k.startswith("exports/images/images-")} == set(images)  # none written again
    table = pq.read_table(io.BytesIO(objects[images[0]]))
    rows = sum(pq.read_table(io.BytesIO(objects[f])).num_rows for f in images)
    assert rows == ids and "prompt" in table.column_names
    observed = [k for k in files if k.startswith("exports/images/observations/")]
    assert sum(pq.read_table(io.BytesIO(objects[f])).num_rows for f in observed) == 2 * ids
    (latest,) = [k for k in files if k.startswith("exports/images/latest/")]  # the replaced one is gone
    assert latest not in first
    assert set(pq.read_table(io.BytesIO(objects[latest])).column("pass").to_pylist()) == {2}
    manifest = orjson.loads(objects["exports/images/manifest.json"])
    assert f"exports/images/latest/{manifest['latest']['parquet']['name']}" == latest


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"publish": "https://bucket/x"}, 'output.publish: expected an "s3://bucket/prefix" URL'),
        ({"publish": "s3://Bad_Bucket/x"}, "output.publish: "),
        ({"publish": "s3://key:secret@bucket/x"}, "output.publish: credentials don't belong in the URL"),
        ({"keep_local": False}, "output.keep_local: keep_local = false needs publish"),
        ({"publish": "s3://b1/x", "keep_local": "no"}, "output.keep_local: expected true or false"),
    ],
)
def test_bad_publish_settings_are_one_line_naming_the_key(output: dict[str, Any], message: str) -> None:
    data = {"output": {"dir": "out", **output}, "queries": [{"modelId": 1}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, Path("c.toml"))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "secret" not in str(caught.value)
