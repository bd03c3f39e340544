"""Page size of a walk whose requests time out: halve it, then grow it back.

A smaller `limit` asks the search backend for less work per request; offset and
id cursors do not depend on it, so it can change in the middle of a walk.
"""

from __future__ import annotations

from dataclasses import dataclass

SMALLEST = 25  # below this a timing-out shard is split instead
GROW_AFTER = 5  # pages answered in time at a reduced limit before doubling it


@dataclass(slots=True)
class PageSize:
    configured: int
    current: int = 0
    in_time: int = 0

    def __post_init__(self) -> None:
        self.current = self.configured

    def shrink(self) -> bool:
        """Halve the limit; False when it is as small as it goes."""
        if self.current <= SMALLEST:
            return False
        self.current = max(SMALLEST, self.current // 2)
        self.in_time = 0
        return True

    def answered(self) -> None:
        if self.current >= self.configured:
            return
        self.in_time += 1
        if self.in_time >= GROW_AFTER:
            self.current = min(self.configured, self.current * 2)
            self.in_time = 0
