"""A fake Civitai images API, shipped so users can test a harvest offline.

async with serve(Dataset(default_spec())) as api:
    ...  # point the harvester at api.base_url
"""

from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.dataset import (
    Dataset,
    DatasetSpec,
    ImageQuery,
    ModelSpec,
    VersionSpec,
    default_spec,
)
from crawler.testing.fakeapi.faults import HOSTILE as HOSTILE_KINDS
from crawler.testing.fakeapi.faults import KINDS as FAULT_KINDS
from crawler.testing.fakeapi.faults import FaultInjector, FaultSpec, RateLimit
from crawler.testing.fakeapi.server import (
    FakeServer,
    RequestLog,
    RequestRecord,
    ServerOptions,
    SlowSearch,
    make_app,
    serve,
)

__all__ = [
    "FAULT_KINDS",
    "HOSTILE_KINDS",
    "Dataset",
    "DatasetSpec",
    "FakeServer",
    "FaultInjector",
    "FaultSpec",
    "ImageQuery",
    "ModelSpec",
    "RateLimit",
    "RequestLog",
    "RequestRecord",
    "ServerOptions",
    "ServerThread",
    "SlowSearch",
    "VersionSpec",
    "default_spec",
    "make_app",
    "serve",
]
