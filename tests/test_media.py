"""Media through the real CLI against the fake API's CDN: every file once, byte-exact, verified."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from conftest import Result, harvest, make_dataset, media_table, read_items, write_config
from crawler.errors import ExitCode
from crawler.testing.fakeapi import Dataset, FakeServer, ServerOptions
from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdnfiles import CdnFaults, CdnOptions

KEY = "sekret-media-key-123"
QUERY = {"modelId": 500, "sort": "Newest", "browsingLevel": 31}


def media_dataset() -> Dataset:
    return make_dataset({5001: 60, 5002: 40})


@pytest.fixture
def cdn_api() -> Iterator[FakeServer]:
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as server:
        yield server


def media_config(path: Path, api: FakeServer, **media: Any) -> Path:
    return write_config(path, api.base_url, [QUERY], media=media_table(api, **media))


def media_rows(out: Path) -> dict[int, dict[str, Any]]:
    with sqlite3.connect(out / "harvest.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in conn.execute("SELECT * FROM media")}


def assert_complete(api: FakeServer, out: Path, types: tuple[str, ...] = ("image", "video")) -> None:
    """Every wanted item's media is on disk byte-exact as its record says, or recorded gone."""
    assert api.cdn is not None
    files = api.cdn.files
    rows = media_rows(out)
    wanted = [item for item in read_items(out) if item["type"] in types]
    assert wanted and set(rows) == {item["id"] for item in wanted}
    for item in wanted:
        row = rows[item["id"]]
        uuid = item["url"].split("/")[4]
        if files.gone(uuid):
            assert row["status"] == "gone", item
            continue
        expected = files.for_item(item)
        assert row["status"] == "done", row
        data = (out / "media" / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected.sha256() == row["sha256"]
        assert len(data) == row["size"]
        assert row["content_type"] == expected.content_type
        assert row["path"].endswith(f"/{item['id']}.{_ext(expected.content_type)}")


def _ext(content_type: str) -> str:
    return {"image/jpeg": "jpeg"}.get(content_type, content_type.split("/")[1])


def run(config: Path, *args: str, env: Mapping[str, str] | None = None) -> Result:
    return harvest("run", config, *args, env=env)


def test_run_fetches_every_file_once_byte_exact(cdn_api: FakeServer, tmp_path: Path) -> None:
    config = media_config(tmp_path / "c.toml", cdn_api)
    result = run(config)
    assert result.code == ExitCode.OK, result.stderr
    out = tmp_path / "out"
    assert_complete(cdn_api, out)
    rows = media_rows(out).values()
    assert {r["content_type"] for r in rows if r["status"] == "done"} >= {"image/png", "image/jpeg"}
    assert any(r["type"] == "video" and r["content_type"].startswith("video/") for r in rows)
    summary = orjson.loads((out / "last-run.json").read_bytes())
    assert summary["media"]["done"] == sum(r["status"] == "done" for r in rows)
    assert "media:" in result.stderr

    assert cdn_api.cdn is not None
    asked = len(cdn_api.cdn.log)
    again = run(config)
    assert again.code == ExitCode.OK, again.stderr
    assert len(cdn_api.cdn.log) == asked  # nothing fetched twice, gone media not asked again


def test_the_key_never_reaches_the_cdn(tmp_path: Path) -> None:
    options = ServerOptions(cdn=CdnOptions(seed=4))
    with ServerThread(media_dataset(), api_key=KEY, options=options) as api:
        result = run(media_config(tmp_path / "c.toml", api), env={"CIVITAI_API_KEY": KEY})
        assert result.code == ExitCode.OK, result.stderr
        assert api.cdn is not None and len(api.cdn.log) > 50
        assert api.cdn.log.mentioning(KEY) == []
        assert all(r.header("Authorization") is None for r in api.cdn.log)


def _gone_and_candidates(api: FakeServer, out: Path) -> None:
    assert api.cdn is not None
    rows = media_rows(out)
    gone = [r for r in rows.values() if r["status"] == "gone"]
    assert gone, "the dataset should hold some gone media"
    for row in gone:
        uuid = row["url"].split("/")[4]
        asked = len(api.cdn.log.for_uuid(uuid))
        assert asked == (2 if row["type"] == "video" else 1), row  # every URL form once, no retries


def test_gone_media_is_asked_once_and_again_only_on_request(cdn_api: FakeServer, tmp_path: Path) -> None:
    config = media_config(tmp_path / "c.toml", cdn_api)
    assert run(config).code == ExitCode.OK
    _gone_and_candidates(cdn_api, tmp_path / "out")
    assert cdn_api.cdn is not None
    asked = len(cdn_api.cdn.log)
    status = harvest("status", config)
    gone = sum(r["status"] == "gone" for r in media_rows(tmp_path / "out").values())
    assert f"{gone} gone" in status.stdout
    again = harvest("media", config, "--retry-gone")
    assert again.code == ExitCode.OK, again.stderr
    assert len(cdn_api.cdn.log) > asked  # asked again, and still gone
    assert sum(r["status"] == "gone" for r in media_rows(tmp_path / "out").values()) == gone


def test_media_alone_on_an_archive_harvested_without_it(cdn_api: FakeServer, tmp_path: Path) -> None:
    config = media_config(tmp_path / "c.toml", cdn_api, download=False, types=["image"])
    assert run(config).code == ExitCode.OK
    assert cdn_api.cdn is not None and len(cdn_api.cdn.log) == 0  # run fetched no media
    result = harvest("media", config)
    assert result.code == ExitCode.OK, result.stderr
    assert_complete(cdn_api, tmp_path / "out", types=("image",))
    assert all(r["type"] == "image" for r in media_rows(tmp_path / "out").values())
    summary = orjson.loads((tmp_path / "out" / "last-run.json").read_bytes())
    assert summary["command"] == "media" and summary["media"]["done"] > 0


def test_verify_names_a_changed_and_a_vanished_file(cdn_api: FakeServer, tmp_path: Path) -> None:
    config = media_config(tmp_path / "c.toml", cdn_api)
    assert run(config).code == ExitCode.OK
    assert harvest("verify", config).code == ExitCode.OK
    done = [r for r in media_rows(tmp_path / "out").values() if r["status"] == "done"]
    flipped, vanished = (tmp_path / "out" / "media" / done[0]["path"]), done[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    (tmp_path / "out" / "media" / vanished["path"]).unlink()
    result = harvest("verify", config)
    assert result.code == ExitCode.ERROR
    assert f"media {done[0]['id']}: {flipped}: the file changed" in result.stdout
    assert f"media {vanished['id']}:" in result.stdout and "missing" in result.stdout
    assert "NOT sound: 2 problem(s)" in result.stdout


def test_faults_are_retried_and_every_file_still_arrives_whole(tmp_path: Path) -> None:
    rates = (("429", 0.01), ("503", 0.01), ("500", 0.01), ("reset", 0.01), ("cut", 0.02), ("challenge", 0.01))
    faults = CdnFaults(seed=9, rates=rates, retry_after=0)
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=5, faults=faults))) as api:
        config = media_config(tmp_path / "c.toml", api, max_retries=8)
        result = run(config)
        assert result.code == ExitCode.OK, result.stderr
        assert api.cdn is not None
        kinds = {r.fault for r in api.cdn.log if r.fault}
        assert {"cut", "challenge"} <= kinds and len(kinds) >= 3
        assert_complete(api, tmp_path / "out")
        assert any(r.status == 206 for r in api.cdn.log)  # a cut body was continued, not refetched
        assert harvest("verify", config).code == ExitCode.OK


def test_a_still_where_the_video_was_due_is_a_failed_attempt(tmp_path: Path) -> None:
    """A video source answering a JPEG (the original=true form of a video is a still): refused,
    and the video comes from the fallback URL."""
    still = bytes.fromhex("ffd8ffe000104a464946") + bytes(4000)

    async def jpeg(request: web.Request) -> web.Response:
        return web.Response(body=still, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", jpeg)
    with (
        ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api,
        _serving(app) as url,
    ):
        config = media_config(tmp_path / "c.toml", api, types=["video"], video_base=url, max_retries=1)
        result = run(config, "-v")
        assert result.code == ExitCode.OK, result.stderr
        assert "a still (image/jpeg) where the video was due" in result.stderr
        assert_complete(api, tmp_path / "out", types=("video",))
        assert all(
            r["content_type"].startswith("video/") for r in media_rows(tmp_path / "out").values() if r["path"]
        )


@contextlib.contextmanager
def _serving(app: web.Application) -> Iterator[str]:
    """A small aiohttp server of the test's own on 127.0.0.1, in a thread."""
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/file/civitai-media-cache"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.mark.parametrize("command", ["run", "media"])
def test_disk_full_stops_cleanly_and_a_rerun_completes(
    cdn_api: FakeServer, tmp_path: Path, command: str
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        config = media_config(
            tmp_path / "c.toml", cdn_api, dir=str(disk / "media"), download=command == "run"
        )
        if command == "media":
            assert run(config).code == ExitCode.OK  # the metadata; then the media stage alone
        full = harvest(command, config)
        assert full.code == ExitCode.ERROR, full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("harvest: error:") and "no space left on device" in last
        assert str(disk / "media") in last and "Traceback" not in full.stderr
        out = tmp_path / "out"
        recorded = [r for r in media_rows(out).values() if r["status"] == "done"]
        for row in recorded:  # nothing recorded that is not whole on disk
            data = (disk / "media" / row["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = harvest(command, config)
        assert again.code == ExitCode.OK, again.stderr
        rows = media_rows(out)
        assert all(r["status"] in ("done", "gone") for r in rows.values())
        assert harvest("verify", config).code == ExitCode.OK
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"variant": "big"}, 'media.variant: expected "original" or a width in pixels'),
        ({"types": ["images"]}, 'media.types[1]: "images" is not one of "image", "video", "audio"'),
        ({"types": []}, "media.types: expected a non-empty list"),
        ({"concurrency": 0}, "media.concurrency: expected an integer from 1 to 256"),
        ({"downlaod": True}, 'media: unknown key "downlaod"; did you mean "download"?'),
        ({"video_base": "ftp://x"}, "media.video_base: expected an http(s) URL"),
        ({"api_key": "x"}, "media.api_key: the API key never goes in the config"),
    ],
)
def test_bad_media_config_is_one_line(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    config = write_config(tmp_path / "c.toml", "http://127.0.0.1:9/api/v1", [QUERY], media=table)
    result = harvest("media", config)
    assert result.code == ExitCode.USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"harvest: error: {config}: {message}"), lines


def test_a_cron_run_fetches_the_new_images_media_and_what_failed(cdn_api: FakeServer, tmp_path: Path) -> None:
    assert cdn_api.cdn is not None
    config = media_config(tmp_path / "c.toml", cdn_api, download=False, types=["image"], max_retries=1)
    assert run(config).code == ExitCode.OK
    items = [i for i in read_items(tmp_path / "out") if i["type"] == "image"]
    unlucky = next(i for i in items if not cdn_api.cdn.files.gone(i["url"].split("/")[4]))
    cdn_api.cdn.faults.queue("500", "502", uuid=unlucky["url"].split("/")[4])
    media_config(tmp_path / "c.toml", cdn_api, types=["image"], max_retries=1)  # download = true
    first = run(config)
    assert first.code == ExitCode.SHARDS_FAILED, first.stderr
    assert f"media {unlucky['id']}: " in first.stderr and "gave up after 2 attempts" in first.stderr
    assert media_rows(tmp_path / "out")[unlucky["id"]]["status"] == "failed"
    added = set(cdn_api.dataset.add_images(5002, 5))
    cdn_api.cdn.log.clear()
    second = run(config)
    assert second.code == ExitCode.OK, second.stderr
    new_images = [i for i in read_items(tmp_path / "out") if i["id"] in added and i["type"] == "image"]
    asked = {r.uuid for r in cdn_api.cdn.log}
    assert asked == {i["url"].split("/")[4] for i in [*new_images, unlucky]}
    assert_complete(cdn_api, tmp_path / "out", types=("image",))
