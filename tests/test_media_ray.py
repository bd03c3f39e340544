"""`harvest media --engine ray` on a local Ray cluster (a head and 2 worker nodes on 127.0.0.1),
against the fake CDN and the local S3 server: a worker killed mid-task, every file in the bucket
once and byte-exact, and each item recorded done once."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import HARVEST, harvest, media_table, read_items, write_config
from crawler.archive.media_ledger import DONE, MediaLedger, MediaRef, MediaResult
from crawler.archive.state import State
from crawler.crawl.media_ray import TASK_NAME
from crawler.errors import ExitCode
from crawler.testing.fakeapi import FakeServer, ServerOptions
from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdnfiles import CdnOptions
from objectstore import MotoServer, ObjectStoreFixture
from test_media import QUERY, assert_complete, media_config, media_dataset, media_rows

TASK_ITEMS = 5

# Ray takes the machine's address for its processes unless told this is a one-machine cluster:
# with this, the head, the nodes and the harvest's driver all listen and dial on 127.0.0.1.
_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's host:port, for --address
    raylets: frozenset[int]  # the worker nodes' raylet pids: their workers are their children


@pytest.fixture(scope="module")
def ray_cluster(moto_server: MotoServer) -> Iterator[RayCluster]:
    """A Ray head (no CPUs: it schedules nothing) and 2 worker nodes of 1 CPU. The nodes' workers
    talk to the local S3 server through its fault proxy, with test credentials and 2 attempts
    a request (a lasting fault is one quickly)."""
    env = {
        **_LOOPBACK,
        "AWS_ENDPOINT_URL": moto_server.proxy.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "2",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)  # the cluster's processes inherit it
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
        )
        try:
            nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
            cluster.wait_for_nodes()
            raylets = frozenset(p.process.pid for node in nodes for p in node.all_processes["raylet"])
            yield RayCluster(cluster.address, raylets)
        finally:
            cluster.shutdown()  # type: ignore[no-untyped-call]


def _media(config: Path, address: str, *extra: str) -> list[str]:
    return [
        "media",
        str(config),
        "--engine",
        "ray",
        "--address",
        address,
        "--task-items",
        str(TASK_ITEMS),
        *extra,
    ]


def _start_media(config: Path, address: str, *, stderr: int) -> subprocess.Popen[bytes]:
    """`harvest media --engine ray` in the background, to be killed mid-run."""
    return subprocess.Popen(
        [HARVEST, *_media(config, address)], env=_env(), stdout=subprocess.DEVNULL, stderr=stderr
    )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
    return {**env, **_LOOPBACK}


def _task_workers(cluster: RayCluster) -> list[int]:
    """Pids of the cluster's Ray workers running a media task now (children of its raylets whose
    process title is ray::<task name>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        parent = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
        if parent in cluster.raylets and title.startswith(f"ray::{TASK_NAME}".encode()):
            pids.append(int(entry.name))
    return pids


def _wanted_order(api: FakeServer, out: Path) -> list[dict[str, Any]]:
    """The items in the order the coordinator hands them out (committed line order)."""
    return [item for item in read_items(out) if item["type"] in ("image", "video")]


def test_a_local_ray_into_the_media_dir(tmp_path: Path) -> None:
    """No --address: a Ray of this machine for the run; no publish: the workers write the media
    dir. Everything as the single-process engine leaves it."""
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = media_config(tmp_path / "c.toml", api, download=False, concurrency=2)
        assert harvest("run", config).code == ExitCode.OK
        ray = ["--engine", "ray", "--workers", "2", "--task-items", str(TASK_ITEMS)]
        result = harvest("media", config, *ray, timeout=300)
        assert result.code == ExitCode.OK, result.stderr
        assert "WARNING" not in result.stderr  # Ray's own notes stay out of the harvest's output
        assert_complete(api, tmp_path / "out")
        assert {row["tries"] for row in media_rows(tmp_path / "out").values()} == {1}
        assert harvest("verify", config).code == ExitCode.OK


def test_the_coordinator_killed_mid_run_and_a_rerun_completes(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """kill -9 of the harvest (the coordinator) while a task is mid-file: the rerun hands out
    again what was not recorded, and ends with every file once, byte-exact."""
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        assert api.cdn is not None
        config = media_config(tmp_path / "c.toml", api, download=False, concurrency=2)
        assert harvest("run", config).code == ExitCode.OK
        out = tmp_path / "out"
        order = _wanted_order(api, out)
        held = next(i for i in order[TASK_ITEMS * 3 :] if not api.cdn.files.gone(_uuid(i)))
        api.cdn.transfers.hold(_uuid(held), api.cdn.files.for_item(held).size // 2)
        proc = _start_media(config, ray_cluster.address, stderr=subprocess.DEVNULL)
        try:
            assert api.cdn.transfers.wait_paused(_uuid(held), timeout=120), "the held transfer never began"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        api.cdn.transfers.release(_uuid(held))
        recorded = {i for i, row in media_rows(out).items() if row["status"] != "fetching"}
        assert 0 < len(recorded) < len(order)  # some tasks were recorded, the held one's not
        result = harvest(*_media(config, ray_cluster.address), env=_LOOPBACK, timeout=300)
        assert result.code == ExitCode.OK, result.stderr
        assert_complete(api, out)
        assert harvest("verify", config).code == ExitCode.OK


def test_a_worker_killed_mid_task_every_file_in_the_bucket_once(
    ray_cluster: RayCluster, objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        assert api.cdn is not None
        files = api.cdn.files
        config = _store_config(tmp_path / "c.toml", api, objectstore)
        assert harvest("run", config).code == ExitCode.OK
        out = tmp_path / "out"
        # One download per worker at a time: the 3rd item of the first task is held half way,
        # after the task's first two files are in the bucket (but not yet reported).
        order = _wanted_order(api, out)
        held = next(
            item for item in order[2:TASK_ITEMS] if item["type"] == "image" and not files.gone(_uuid(item))
        )
        size = files.for_item(held).size
        api.cdn.transfers.hold(_uuid(held), size // 2)
        objectstore.proxy.reset()
        proc = _start_media(config, ray_cluster.address, stderr=subprocess.PIPE)
        try:
            assert api.cdn.transfers.wait_paused(_uuid(held), timeout=120), "the held transfer never began"
            killed = _task_workers(ray_cluster)
            assert killed, "no Ray worker is running a media task"
            for pid in killed:  # every worker mid-task now, the held transfer's among them
                os.kill(pid, signal.SIGKILL)
            api.cdn.transfers.release(_uuid(held))
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == ExitCode.OK, stderr.decode()
        for pid in killed:  # what the killed attempts left in their scratch folders was swept
            assert not list(Path(tempfile.gettempdir()).glob(f"harvest-media-{pid}-*"))
        # The killed task ran again: the files its first attempt had fetched were fetched twice
        # (and uploaded once: below). The held one's cut body may count as whole too (written
        # into the socket's buffer as the killed worker's end went away): not counted here.
        before = [i for i in order[: order.index(held)] if not files.gone(_uuid(i))]
        assert before and all(_whole(api, i) == 2 for i in before), [_whole(api, i) for i in before]
        rows = media_rows(out)
        assert {item["id"] for item in order} == set(rows)
        assert {row["tries"] for row in rows.values()} == {1}  # handed out once, recorded once
        objects = objectstore.objects()
        published = _published(out)
        created = objectstore.proxy.created()
        root = objectstore.root
        for item in order:
            row = rows[item["id"]]
            if files.gone(_uuid(item)):
                assert row["status"] == "gone", row
                continue
            assert row["status"] == DONE, row
            key = root.key(f"media/{row['path']}")
            data = objects[key]
            expected = files.for_item(item)
            assert hashlib.sha256(data).hexdigest() == expected.sha256() == row["sha256"]
            assert len(data) == row["size"]
            assert created.get(f"/{objectstore.bucket}/{key}") == 1, key  # uploaded once, retry or not
            assert published[str(item["id"])] == (f"s3://{objectstore.bucket}/{key}", 0)
            assert not (out / "media" / row["path"]).exists()  # straight to the store
        media_keys = {k for k in objects if k.startswith(root.key("media/"))}
        assert len(media_keys) == sum(1 for r in rows.values() if r["status"] == DONE)
        assert harvest("verify", config).code == ExitCode.OK


def test_a_lasting_store_failure_stops_the_run_with_one_line_and_a_rerun_completes(
    ray_cluster: RayCluster, objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = _store_config(tmp_path / "c.toml", api, objectstore)
        assert harvest("run", config).code == ExitCode.OK
        objectstore.proxy.fail_next(10_000)  # every PUT answers 500 (both attempts of each)
        result = harvest(*_media(config, ray_cluster.address), env=_LOOPBACK, timeout=300)
        assert result.code == ExitCode.ERROR, result.stderr
        (line,) = [text for text in result.stderr.splitlines() if text.startswith("harvest: error:")]
        assert f"s3://{objectstore.bucket}/archive/media/" in line and "upload failed" in line, line
        assert "Traceback" not in result.stderr
        objectstore.proxy.reset()
        result = harvest(*_media(config, ray_cluster.address), env=_LOOPBACK, timeout=300)
        assert result.code == ExitCode.OK, result.stderr
        rows = media_rows(tmp_path / "out")
        done = [row for row in rows.values() if row["status"] == DONE]
        assert done and all(row["status"] in (DONE, "gone") for row in rows.values())
        objects = objectstore.objects()
        for row in done:
            data = objects[objectstore.root.key(f"media/{row['path']}")]
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert harvest("verify", config).code == ExitCode.OK


def test_a_result_reported_again_is_recorded_once(tmp_path: Path) -> None:
    """A retried task's results for items already done change nothing and are not counted."""
    State.open(tmp_path).close()
    with MediaLedger.open(tmp_path) as ledger:
        refs = [MediaRef(i, f"https://cdn/{i}.jpeg", "image") for i in (1, 2)]
        ledger.begin_many(refs)
        first = [MediaResult(1, DONE, "000/000/1.jpeg", 3, "a" * 64, "image/jpeg")]
        assert ledger.record(first) == first
        again = [MediaResult(1, DONE, "000/000/1.jpeg", 3, "a" * 64, "image/jpeg")]
        other = MediaResult(2, "failed", error="timeout")
        assert ledger.record([*again, other]) == [other]
        assert ledger.counts().done == 1 and ledger.counts().failed == 1


def _published(out: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(out / "harvest.sqlite") as conn:
        rows = conn.execute("SELECT name, url, local FROM published WHERE kind='media'").fetchall()
    return {name: (url, local) for name, url, local in rows}


def _whole(api: FakeServer, item: dict[str, Any]) -> int:
    """How many whole answers the CDN gave for the item's file."""
    assert api.cdn is not None
    return len([r for r in api.cdn.log.for_uuid(_uuid(item)) if r.complete and r.status in (200, 206)])


def _uuid(item: dict[str, Any]) -> str:
    return str(item["url"]).split("/")[4]


def _store_config(path: Path, api: FakeServer, store: ObjectStoreFixture) -> Path:
    """test_media's config (no media download in `harvest run`, 2 downloads at a time), publishing."""
    output = {"publish": store.url, "keep_local": False}
    media = media_table(api, download=False, concurrency=2)
    return write_config(path, api.base_url, [QUERY], output=output, media=media)
