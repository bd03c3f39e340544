"""`harvest media --engine ray --address ray://HOST:PORT`: the Ray Client way in (the `client` part of
the ray extra), against a Ray head on 127.0.0.1 with its Ray Client server on a free port. The
harvest's driver then runs in that server, not in the harvest process: the work list, the results
and the recording still go through it, so the run ends as with a local Ray."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import harvest
from crawler.errors import ExitCode
from crawler.testing.fakeapi import ServerOptions
from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdnfiles import CdnOptions
from objectstore import free_port
from test_media import assert_complete, media_config, media_dataset, media_rows

# Ray takes the machine's address for its processes unless told this is a one-machine cluster.
_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def ray_client_address() -> Iterator[str]:
    """A Ray head of 1 CPU on 127.0.0.1 with a Ray Client server: its ray://127.0.0.1:PORT."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _LOOPBACK.items():
            patch.setenv(name, value)  # the head's processes inherit it
        from ray.cluster_utils import Cluster

        head = {
            "num_cpus": 1,
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
            "ray_client_server_port": port,
        }
        with warnings.catch_warnings():
            # Ray (2.60) drops the log file it opens for its Ray Client server without closing
            # it: Ray's leak, not ours, and an error under `filterwarnings = error` when collected.
            warnings.simplefilter("ignore", ResourceWarning)
            cluster = Cluster(initialize_head=True, head_node_args=head)
            gc.collect()
        try:
            yield f"ray://127.0.0.1:{port}"
        finally:
            cluster.shutdown()  # type: ignore[no-untyped-call]


def test_media_through_a_ray_client_address(ray_client_address: str, tmp_path: Path) -> None:
    with ServerThread(media_dataset(), options=ServerOptions(cdn=CdnOptions(seed=3))) as api:
        config = media_config(tmp_path / "c.toml", api, download=False, concurrency=2)
        assert harvest("run", config).code == ExitCode.OK
        args = ["--engine", "ray", "--address", ray_client_address, "--task-items", "20"]
        result = harvest("media", config, *args, env=_LOOPBACK, timeout=180)
        assert result.code == ExitCode.OK, result.stderr
        assert "Traceback" not in result.stderr and "WARNING" not in result.stderr
        out = tmp_path / "out"
        assert_complete(api, out)
        assert {row["tries"] for row in media_rows(out).values()} == {1}
        assert harvest("verify", config).code == ExitCode.OK
