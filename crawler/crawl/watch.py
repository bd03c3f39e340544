"""What a run tells whoever watches it: the hooks the pipeline calls, and a watcher that says nothing.

The pipeline calls these hooks from its event loop; they must be quick and must
never raise into the harvest. The displays (a live table, a periodic log line)
live in `crawler.cli.progress`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from crawler.http.gate import Counters


@dataclass(frozen=True, slots=True)
class ShardView:
    """A shard as a display needs it at the start of a run."""

    key: str
    query: str
    status: str
    items: int
    pages: int


class Progress(Protocol):
    def start(self, shards: Sequence[ShardView], counters: Counters) -> None: ...
    def page(self, key: str, new_items: int, served: int) -> None: ...
    def shard_done(self, key: str) -> None: ...
    def shard_failed(self, key: str, error: str) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    """The default: say nothing."""

    def start(self, shards: Sequence[ShardView], counters: Counters) -> None:
        pass

    def page(self, key: str, new_items: int, served: int) -> None:
        pass

    def shard_done(self, key: str) -> None:
        pass

    def shard_failed(self, key: str, error: str) -> None:
        pass

    def stop(self) -> None:
        pass
