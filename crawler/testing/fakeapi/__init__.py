"""A fake Civitai images API, shipped so users can test a harvest offline.

async with serve(Dataset(default_spec())) as api:
    ...  # point the harvester at api.base_url

With ServerOptions(cdn=CdnOptions()) the image CDN runs too, on api.cdn_url, and items'
`url` point at it; api.cdn.files says what any of its URLs serves, byte for byte.
"""

from crawler.testing.fakeapi.background import ServerThread
from crawler.testing.fakeapi.cdn import CdnInjector, CdnServer, make_cdn_app, serve_cdn
from crawler.testing.fakeapi.cdnfiles import (
    CDN_KINDS,
    LADDER,
    WIDTH_CAP,
    CdnFaults,
    CdnFiles,
    CdnOptions,
    MediaFile,
    snap_width,
)
from crawler.testing.fakeapi.cdnlog import CdnLog, CdnRecord, Transfers
from crawler.testing.fakeapi.cursors import FeedCursors
from crawler.testing.fakeapi.dataset import (
    Dataset,
    DatasetSpec,
    ImageQuery,
    ModelSpec,
    VersionSpec,
    default_spec,
    skewed_versions,
)
from crawler.testing.fakeapi.faults import HOSTILE as HOSTILE_KINDS
from crawler.testing.fakeapi.faults import KINDS as FAULT_KINDS
from crawler.testing.fakeapi.faults import KINDS_2026 as FAULT_KINDS_2026
from crawler.testing.fakeapi.faults import FaultInjector, FaultSpec, RateLimit
from crawler.testing.fakeapi.server import (
    FakeServer,
    Latency,
    RequestLog,
    RequestRecord,
    ServerOptions,
    SlowSearch,
    cursors_of,
    make_app,
    serve,
)

__all__ = [
    "CDN_KINDS",
    "LADDER",
    "WIDTH_CAP",
    "CdnFaults",
    "CdnFiles",
    "CdnInjector",
    "CdnLog",
    "CdnOptions",
    "CdnRecord",
    "CdnServer",
    "MediaFile",
    "Transfers",
    "make_cdn_app",
    "serve_cdn",
    "snap_width",
    "FAULT_KINDS",
    "FAULT_KINDS_2026",
    "HOSTILE_KINDS",
    "Dataset",
    "DatasetSpec",
    "FakeServer",
    "FeedCursors",
    "FaultInjector",
    "FaultSpec",
    "ImageQuery",
    "Latency",
    "ModelSpec",
    "RateLimit",
    "RequestLog",
    "RequestRecord",
    "ServerOptions",
    "ServerThread",
    "SlowSearch",
    "VersionSpec",
    "cursors_of",
    "default_spec",
    "make_app",
    "serve",
    "skewed_versions",
]
