"""What a run tells whoever watches it: the hooks the pipeline calls, and a watcher that says nothing.

The pipeline calls these hooks from its event loop; they must be quick and must
never raise into the harvest. The displays (a live table, a periodic log line)
live in `crawler.cli.progress`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from crawler.http.gate import Counters


@dataclass(frozen=True, slots=True)
class ShardView:
    """A shard as a display needs it at the start of a run."""

    key: str
    query: str
    status: str
    items: int
    pages: int


@dataclass(slots=True)
class MediaTally:
    """What the media stage did in this run, as it goes: displays read it on every tick."""

    done: int = 0  # files fetched (or found complete) and recorded
    gone: int = 0  # the CDN said 404/410 for every URL tried
    failed: int = 0  # attempts ran out; a rerun tries again
    bytes: int = 0  # of the files done
    counters: Counters = field(default_factory=Counters)  # the CDN gate's
    failures: list[str] = field(default_factory=list)  # the first few, for the summary
    started: float = field(default_factory=time.monotonic)

    MAX_FAILURES: ClassVar[int] = 20

    def file_done(self, size: int) -> None:
        self.done += 1
        self.bytes += size

    def failed_with(self, line: str) -> None:
        self.failed += 1
        if len(self.failures) < self.MAX_FAILURES:
            self.failures.append(line)

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """Files a second and MB (10^6 bytes) a second since the stage started."""
        span = (time.monotonic() if now is None else now) - self.started
        return (self.done / span, self.bytes / 1e6 / span) if span > 0 else (0.0, 0.0)


@dataclass(slots=True)
class RefreshTally:
    """What one `harvest refresh` did."""

    pass_no: int = 0
    resumed: bool = False  # it continued a pass an earlier run began
    due: int = 0  # ids the pass had left to observe when this run began
    observed: int = 0  # observations this run wrote
    gone: int = 0  # ... of ids absent from the answers (hidden or deleted)
    batches: int = 0  # requests answered and committed
    complete: bool = False  # the pass has observed every id it listed


class Progress(Protocol):
    def start(self, shards: Sequence[ShardView], counters: Counters) -> None: ...
    def page(self, key: str, new_items: int, served: int) -> None: ...
    def shard_done(self, key: str) -> None: ...
    def shard_failed(self, key: str, error: str) -> None: ...
    def media(self, tally: MediaTally) -> None: ...
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

    def media(self, tally: MediaTally) -> None:
        pass

    def stop(self) -> None:
        pass
