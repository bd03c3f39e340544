"""A real S3-compatible store on 127.0.0.1 for the tests: moto's server, behind a fault proxy.

`moto_server` (session): `python -m moto.server` from the installed `moto[server]`, in its own
process on a free loopback port, and in front of it `FaultProxy`, a small aiohttp reverse
proxy (its own thread and loop) that forwards every request and can fail the next N of a
kind with a 500 (S3's InternalError), or hold one (before it is forwarded: the client is then
mid-upload; or once the store has answered: the object is stored and the client has not heard;
either for a `kill -9`), or hold the bucket to a quota (moto has none: the proxy answers as MinIO does once
a bucket's quota is used up), and logs what passed.

`objectstore` (per test): a fresh bucket, and the standard AWS environment variables set
(`monkeypatch`, so child `harvest` processes inherit them) to talk to the proxy with test
credentials; nothing is read from the machine's own `~/.aws`. Its `objects()`, `sizes()`,
`unfinished()` look at the bucket directly (past the proxy, no faults).

Registered for every test module by `tests/conftest.py` (`pytest_plugins`).
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from crawler.archive.store import ObjectStore, StoreUrl

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "expect", "te", "upgrade"}
_INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
# MinIO's answer to a PUT past a bucket's quota (`mc quota set`): a 400, so no client retries it.
_QUOTA_EXCEEDED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>XMinioAdminBucketQuotaExceeded</Code>'
    b"<Message>Bucket quota exceeded</Message></Error>"
)
_STOP_WAIT = 10  # seconds moto's server gets to exit on SIGTERM before it is killed
_PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True, slots=True)
class Passed:
    """One request the proxy answered."""

    method: str
    path: str  # /bucket/key
    query: str
    status: int
    injected: bool  # the proxy's own fault, never sent to the store

    @property
    def creates(self) -> bool:
        """Whether this request made an object (a whole PUT, or the completion of a multipart one)."""
        whole_put = self.method == "PUT" and "partNumber" not in self.query and "uploadId" not in self.query
        completion = self.method == "POST" and "uploadId=" in self.query
        return 200 <= self.status < 300 and not self.injected and (whole_put or completion)


Match = Callable[[str, str, str], bool]  # (method, path, query) -> whether a rule applies


def puts(method: str, path: str, query: str) -> bool:
    """Every PUT: whole objects and the parts of multipart uploads."""
    return method == "PUT"


@dataclass
class _Rule:
    match: Match
    left: int  # requests still to fail or hold


@dataclass
class FaultProxy:
    """A reverse proxy to `upstream` on 127.0.0.1 with scripted faults; start() before use."""

    upstream: str
    port: int = 0
    log: list[Passed] = field(default_factory=list)
    _fail: list[_Rule] = field(default_factory=list)
    _hold: list[_Rule] = field(default_factory=list)  # before the request is forwarded
    _hold_answer: list[_Rule] = field(default_factory=list)  # after the store answered it
    _held: threading.Event = field(default_factory=threading.Event)
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _quota: int | None = None  # bytes the PUTs may still store, None: no quota

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, count: int, match: Match = puts) -> None:
        """Answer the next `count` matching requests with a 500 InternalError (not forwarded)."""
        with self._lock:
            self._fail.append(_Rule(match, count))

    def hold_next(self, match: Match = puts, *, answered: bool = False) -> None:
        """Keep the next matching request waiting until `release()`: its body unread (the client
        is mid-upload), or with `answered` once the store has it and has answered, the answer
        held back (the object is stored, the client has not heard so)."""
        with self._lock:
            self._held.clear()
            self._release.clear()
            (self._hold_answer if answered else self._hold).append(_Rule(match, 1))

    def wait_held(self, timeout: float = 60) -> bool:
        """Whether a request (or its answer) is being held now, waiting up to `timeout`."""
        return self._held.wait(timeout)

    def release(self) -> None:
        self._release.set()

    def quota(self, limit: int | None) -> None:
        """Let PUTs (whole objects and parts) store at most `limit` more bytes; None lifts it."""
        with self._lock:
            self._quota = limit

    def _over_quota(self, method: str, size: int) -> bool:
        with self._lock:
            if method != "PUT" or self._quota is None:
                return False
            if size > self._quota:
                return True
            self._quota -= size  # counted when let through: a PUT the store then fails is rare here
            return False

    def reset(self) -> None:
        with self._lock:
            self._fail.clear()
            self._hold.clear()
            self._hold_answer.clear()
            self.log.clear()
            self._quota = None
        self._release.set()

    def created(self) -> dict[str, int]:
        """How many times each object (/bucket/key) was created through the proxy."""
        counts: dict[str, int] = {}
        for passed in list(self.log):
            if passed.creates:
                counts[passed.path] = counts.get(passed.path, 0) + 1
        return counts

    def _take(self, rules: list[_Rule], method: str, path: str, query: str) -> bool:
        with self._lock:
            for rule in rules:
                if rule.left > 0 and rule.match(method, path, query):
                    rule.left -= 1
                    return True
        return False

    # -- the server ---------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the S3 fault proxy did not start")

    def stop(self) -> None:
        self._release.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)

    _loop: asyncio.AbstractEventLoop | None = None

    def _serve(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with aiohttp.ClientSession(auto_decompress=False) as self._session:
            ready.set()
            await self._stopping.wait()
            await runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        method, path, query = request.method, request.path, request.query_string
        if self._take(self._hold, method, path, query):
            await self._hold_here()  # the client waits mid-upload (or is killed)
        try:
            body = await request.read()
        except ConnectionError:  # the client was killed mid-upload
            raise web.HTTPBadRequest() from None
        if self._take(self._fail, method, path, query):
            self.log.append(Passed(method, path, query, 500, injected=True))
            return web.Response(status=500, body=_INTERNAL_ERROR, content_type="application/xml")
        if self._over_quota(method, len(body)):
            self.log.append(Passed(method, path, query, 400, injected=True))
            return web.Response(status=400, body=_QUOTA_EXCEEDED, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Host"] = request.host
        async with self._session.request(
            method,
            self.upstream + request.path_qs,
            headers=headers,
            data=io.BytesIO(body),
            allow_redirects=False,
        ) as answer:
            data = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            self.log.append(Passed(method, path, query, answer.status, injected=False))
            if self._take(self._hold_answer, method, path, query):
                await self._hold_here()  # the store has it; the client waits for word (or is killed)
            if method == "HEAD":  # no body, but the object's length is the answer
                if "Content-Length" in answer.headers:
                    out["Content-Length"] = answer.headers["Content-Length"]
                return web.Response(status=answer.status, headers=out)
            return web.Response(status=answer.status, body=data, headers=out)

    async def _hold_here(self) -> None:
        self._held.set()
        while not self._release.is_set():  # polled: the event is a thread's, not this loop's
            await asyncio.sleep(0.01)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    """moto's S3 in its own process on 127.0.0.1, and the fault proxy in front of it."""

    endpoint: str  # moto itself
    proxy: FaultProxy
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        """An s3fs filesystem that talks to moto directly (no faults)."""
        import s3fs

        return s3fs.S3FileSystem(
            key="test",
            secret="test",
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": "us-east-1"},
            skip_instance_cache=True,
            use_listings_cache=False,
        )


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto's server did not answer within 60 s") from None
            time.sleep(0.05)


def _die_with_parent() -> Callable[[], None] | None:
    """What the child runs before exec (Linux): SIGKILL when the test session dies, however it
    dies, so a killed pytest leaves no server behind. libc is loaded here, in the parent: the
    child between fork and exec only makes the one call."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL when that is not enough: a hung server never outlives the session."""
    process.terminate()
    try:
        process.wait(_STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent(),
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_ready(endpoint, process)
        proxy = FaultProxy(endpoint)
        proxy.start()
        try:
            yield MotoServer(endpoint, proxy, process)
        finally:
            proxy.stop()
    finally:
        _stop(process)


_BUCKETS = itertools.count(1)


@dataclass
class ObjectStoreFixture:
    """One test's bucket on the local S3 server, and the environment that points at it."""

    server: MotoServer
    bucket: str
    url: str  # s3://bucket/archive: what a config's `publish` is set to
    env: dict[str, str]  # the AWS_* variables set for this test (and its child processes)

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    @property
    def root(self) -> StoreUrl:
        return StoreUrl(self.bucket, self.url.split("/", 3)[3])

    def store(self) -> ObjectStore:
        """The harvest's own client for `url` (through the proxy, like the harvest)."""
        return ObjectStore(self.url)

    def _keys(self) -> dict[str, int]:
        fs = self.server.client()
        found = fs.find(self.bucket, detail=True)
        return {path.removeprefix(self.bucket + "/"): int(info["size"]) for path, info in found.items()}

    def sizes(self) -> dict[str, int]:
        """Every object in the bucket by key: its size (read from moto directly)."""
        return self._keys()

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket by key: its bytes (read from moto directly)."""
        fs = self.server.client()
        return {key: bytes(fs.cat_file(f"{self.bucket}/{key}")) for key in self._keys()}

    def unfinished(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        fs = self.server.client()
        answer = fs.call_s3("list_multipart_uploads", Bucket=self.bucket)
        return [upload["Key"] for upload in answer.get("Uploads", [])]


@pytest.fixture
def objectstore(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ObjectStoreFixture]:
    moto_server.proxy.reset()
    bucket = f"harvest-test-{os.getpid()}-{next(_BUCKETS)}"
    moto_server.client().call_s3("create_bucket", Bucket=bucket)
    nothing = tmp_path_factory.mktemp("aws") / "none"
    env = {
        "AWS_ENDPOINT_URL": moto_server.proxy.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(nothing),  # the machine's ~/.aws stays out of the tests
        "AWS_SHARED_CREDENTIALS_FILE": str(nothing),
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance metadata address
    }
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield ObjectStoreFixture(moto_server, bucket, f"s3://{bucket}/archive", env)
    moto_server.proxy.reset()


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    """A file of `size` deterministic bytes (for upload tests); returns them."""
    block = bytes((seed + i * 7) % 251 for i in range(4096))
    data = (block * (size // len(block) + 1))[:size]
    path.write_bytes(data)
    return data
