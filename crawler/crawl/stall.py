"""A walk that keeps getting fresh cursors and no new image would never end: this notices it.

A page makes progress when it holds an image this walk has not seen before. Not
"new to the archive": a rerun of a `Most Reactions` shard legitimately serves only
images the archive already has, page after page. After `limit` pages in a row
without progress (empty pages count too) the walk stops with `NoProgressError`.

Memory stays small and bounded: a walk remembers the ids of its last `window`
new images, forgetting the oldest page's first. A page of forgotten ids counts
as progress, so the window can only delay a stop, never cause a wrong one; a
server that serves one page again and again, or cycles through fewer than
`window` images, is caught.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from crawler.errors import NoProgressError

WINDOW = 2_000  # ids a walk remembers (10 full pages): about 200 KiB at most


@dataclass(slots=True)
class StallGuard:
    """Counts the pages in a row that bring no image unseen in this walk."""

    limit: int  # that many pages in a row without a new image stop the walk
    window: int = WINDOW
    streak: int = 0
    _seen: set[int] = field(default_factory=set)
    _pages: deque[set[int]] = field(default_factory=deque)  # each page's new ids, oldest first
    _held: int = 0  # len(_seen): ids are in exactly one page's set

    def page(self, ids: Iterable[int]) -> None:
        """Count one page; raises NoProgressError at the `limit`-th page in a row with nothing new."""
        fresh = set(ids) - self._seen
        if not fresh:
            self.streak += 1
            if self.streak >= self.limit:
                raise NoProgressError(
                    f"the walk makes no progress: {self.streak} pages in a row brought no new image"
                )
            return
        self.streak = 0
        self._remember(fresh)

    def _remember(self, fresh: set[int]) -> None:
        self._seen |= fresh
        self._pages.append(fresh)
        self._held += len(fresh)
        while self._held > self.window and len(self._pages) > 1:
            oldest = self._pages.popleft()
            self._seen -= oldest
            self._held -= len(oldest)
