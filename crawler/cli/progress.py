"""What the pipeline tells whoever watches a run: a display, a log line, nothing.

The pipeline calls these hooks from its event loop; they must be quick and must
never raise into the harvest. Three watchers:

- `NoProgress`: says nothing (`-q`, `--progress-every 0`, library use).
- `LogProgress`: off a terminal, one INFO line with the run's totals every N
  seconds, from an asyncio task on the pipeline's own loop (no thread).
- `LiveProgress`: on a terminal, a rich Live table (one row per shard, totals
  below) redrawn from an asyncio task on the same loop; log records are routed
  through its console while it is shown, so they print above it, never into it.

No ETA is shown: the API does not say how many images a shard holds, and an
estimate made up from the pace so far would be a guess presented as a fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote_plus

from crawler.crawl.watch import MediaTally, ShardView
from crawler.http.gate import Counters

log = logging.getLogger("harvest")

F = TypeVar("F", bound=Callable[..., None])


# -- what every watcher keeps track of ------------------------------------------

WAITING = "waiting"  # to be walked, no page committed yet in this run
WALKING = "walking"
DONE = "done"
FAILED = "failed"


@dataclass(slots=True)
class ShardTally:
    """One shard during this run."""

    key: str
    query: str
    label: str  # the key shortened to what tells it apart from its query's other shards
    status: str
    items_before: int  # images the shard had written before this run (this pass and earlier)
    new: int = 0  # images written by this run
    served: int = 0  # images served by this run, already-written ones included
    pages: int = 0  # pages committed by this run
    first: float | None = None  # clock at the shard's first page in this run
    last: float | None = None  # clock at its latest page
    error: str | None = None

    def rate(self, now: float) -> float | None:
        """New images a second since the shard's first page (None before a second page)."""
        if self.first is None or self.last is None:
            return None
        end = now if self.status == WALKING else self.last
        span = end - self.first
        return self.new / span if span > 0 and self.pages > 1 else None


@dataclass(slots=True)
class Totals:
    """The whole run, for a display or a log line."""

    shards: int
    done: int
    failed: int
    walking: int
    new: int
    pages: int
    elapsed: float
    requests: int
    retries: int
    rate_limited: int
    cooldown_seconds: float

    @property
    def rate(self) -> float:
        return self.new / self.elapsed if self.elapsed > 0 else 0.0

    def fields(self) -> dict[str, Any]:
        """Structured fields for a JSON log line."""
        return {
            "shards": self.shards,
            "shards_done": self.done,
            "shards_failed": self.failed,
            "new_items": self.new,
            "pages": self.pages,
            "items_per_second": round(self.rate, 2),
            "requests": self.requests,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "cooldown_seconds": round(self.cooldown_seconds, 3),
            "elapsed_seconds": round(self.elapsed, 3),
        }


def shorten_keys(shards: Sequence[ShardView], width: int = 48) -> dict[str, str]:
    """Each key without the parameters every shard of its query shares, decoded, at most `width`.

    A `modelId` query's shards become `modelVersionId=1920896`; a query with one
    shard keeps its whole key (cut with an ellipsis when long).
    """
    by_query: dict[str, list[list[str]]] = {}
    parts = {s.key: [unquote_plus(p) for p in s.key.split("&") if p] for s in shards}
    for s in shards:
        by_query.setdefault(s.query, []).append(parts[s.key])
    common = {
        query: set.intersection(*(set(p) for p in lists)) if len(lists) > 1 else set()
        for query, lists in by_query.items()
    }
    labels = {}
    for s in shards:
        own = [p for p in parts[s.key] if p not in common[s.query]] or parts[s.key]
        label = "&".join(own) or "(all images)"
        labels[s.key] = label if len(label) <= width else label[: width - 1] + "…"
    return labels


def _never_raises(hook: F) -> F:
    """A watcher's failure is logged once and the watcher goes quiet; the harvest goes on."""

    @functools.wraps(hook)
    def guarded(self: _Watcher, *args: Any) -> None:
        if self._broken:
            return
        try:
            hook(self, *args)
        except Exception:
            self._give_up()

    return guarded  # type: ignore[return-value]


class _Watcher:
    """Tallies the hooks and calls `_tick` every `every` seconds from the event loop.

    The tick comes from an asyncio task started in `start()` and cancelled in
    `stop()`. Driven without a running loop (tests, scripts), `page()` checks
    the clock instead.
    """

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.shards: dict[str, ShardTally] = {}
        self.counters = Counters()
        self.started = clock()
        self._due = float("inf")
        self._task: asyncio.Task[None] | None = None
        self._broken = False
        self.media_tally: MediaTally | None = None

    # -- hooks --------------------------------------------------------------

    @_never_raises
    def start(self, shards: Sequence[ShardView], counters: Counters) -> None:
        labels = shorten_keys(shards)
        self.counters = counters
        self.shards = {
            s.key: ShardTally(
                key=s.key,
                query=s.query,
                label=labels[s.key],
                status=DONE if s.status == DONE else WAITING,
                items_before=s.items,
            )
            for s in shards
        }
        self.started = self.clock()
        if self.every > 0:
            self._due = self.started + self.every
            with contextlib.suppress(RuntimeError):  # no running loop: page() ticks instead
                self._task = asyncio.get_running_loop().create_task(self._ticker(), name="harvest-progress")
        self._setup()

    @_never_raises
    def page(self, key: str, new_items: int, served: int) -> None:
        shard = self._shard(key)
        now = self.clock()
        shard.first = now if shard.first is None else shard.first
        shard.last = now
        shard.status = WALKING if shard.status == WAITING else shard.status
        shard.new += new_items
        shard.served += served
        shard.pages += 1
        self._changed()
        if self._task is None and self.clock() >= self._due:
            self._due = self.clock() + self.every
            self._tick()

    @_never_raises
    def shard_done(self, key: str) -> None:
        self._shard(key).status = DONE
        self._changed()

    @_never_raises
    def shard_failed(self, key: str, error: str) -> None:
        shard = self._shard(key)
        shard.status = FAILED
        shard.error = error
        self._changed()

    @_never_raises
    def media(self, tally: MediaTally) -> None:
        self.media_tally = tally
        self._changed()

    @_never_raises
    def stop(self) -> None:
        self._cancel_ticker()
        self._teardown()

    def _shard(self, key: str) -> ShardTally:
        """The shard's tally; one that appeared during the run (a split shard's part) is added."""
        shard = self.shards.get(key)
        if shard is None:
            view = ShardView(key, "", WAITING, 0, 0)
            shard = ShardTally(key, "", shorten_keys([view])[key], WAITING, items_before=0)
            self.shards[key] = shard
        return shard

    # -- for subclasses and tests -----------------------------------------------

    def totals(self) -> Totals:
        shards = self.shards.values()
        return Totals(
            shards=len(self.shards),
            done=sum(s.status == DONE for s in shards),
            failed=sum(s.status == FAILED for s in shards),
            walking=sum(s.status == WALKING for s in shards),
            new=sum(s.new for s in shards),
            pages=sum(s.pages for s in shards),
            elapsed=self.clock() - self.started,
            requests=self.counters.requests,
            retries=self.counters.retries,
            rate_limited=self.counters.rate_limited,
            cooldown_seconds=self.counters.cooldown_seconds,
        )

    def _setup(self) -> None:
        pass

    def _changed(self) -> None:
        pass

    def _tick(self) -> None:
        pass

    def _teardown(self) -> None:
        pass

    async def _ticker(self) -> None:
        while not self._broken:
            await asyncio.sleep(self.every)
            try:
                self._tick()
            except Exception:
                self._give_up()

    def _give_up(self) -> None:
        """Called from an `except` block: take the display down, say so once, carry on."""
        self._broken = True
        with contextlib.suppress(Exception):
            self._cancel_ticker()
        with contextlib.suppress(Exception):
            self._teardown()
        with contextlib.suppress(Exception):
            log.warning("progress display failed; the harvest goes on without it", exc_info=True)

    def _cancel_ticker(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


# -- off a terminal: a line every N seconds ---------------------------------------


class LogProgress(_Watcher):
    """One INFO line with the run's totals every `every` seconds (`--progress-every`)."""

    def __init__(
        self,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        super().__init__(every, clock)
        self.logger = logger

    def line(self) -> tuple[str, dict[str, Any]]:
        """The progress message and its structured fields."""
        t = self.totals()
        failed = f", {t.failed} failed" if t.failed else ""
        media = self.media_tally
        parts = []
        if media is None or t.shards:  # `harvest media` alone walks no shards
            parts.append(
                f"{t.done}/{t.shards} shards done{failed}; {t.new} new images in {t.pages} pages, "
                f"{t.rate:.1f} images/s; {t.requests} requests, {t.retries} retries, "
                f"{t.rate_limited} rate-limited"
            )
        parts += [media_text(media, self.clock())] if media is not None else []
        text = "progress: " + "; ".join(parts + [f"{_clock(t.elapsed)} elapsed"])
        fields = t.fields() | (media_fields(media, self.clock()) if media is not None else {})
        return text, {"event": "progress", **fields}

    def _tick(self) -> None:
        text, fields = self.line()
        self.logger.info(text, extra=fields)


# -- on a terminal: a rich Live table -------------------------------------------------


class ConsoleRoute(Protocol):
    """A log handler that can print through a rich console while a display is live."""

    def use_console(self, console: Any) -> None: ...


_ORDER = {WALKING: 0, FAILED: 1, WAITING: 2, DONE: 3}
_STYLE = {WALKING: "cyan", FAILED: "bold red", WAITING: "dim", DONE: "green"}


class LiveProgress(_Watcher):
    """A live table on a terminal: per shard status, new images, pages, images/s; totals below.

    `console` is a `rich.console.Console` (by default one on stderr). `route`,
    if given, is told to print log records through that console while the
    display is up, so a log line lands above the table instead of inside it.
    With `transient=False` the last table stays on screen after `stop()`.
    """

    def __init__(
        self,
        console: Any = None,
        route: ConsoleRoute | None = None,
        refresh: float = 0.5,
        transient: bool = False,
        max_rows: int | None = None,
        redirect_stderr: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(refresh, clock)
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.route = route
        self.refresh = refresh
        self.transient = transient
        self.max_rows = max_rows
        self.redirect_stderr = redirect_stderr
        self._live: Any = None
        self._drawn = 0.0

    def _setup(self) -> None:
        from rich.live import Live

        self._live = Live(
            self,
            console=self.console,
            auto_refresh=False,  # redrawn from the event loop, not from rich's thread
            transient=self.transient,
            redirect_stdout=False,  # stdout may be a pipe; it is not the display's
            redirect_stderr=self.redirect_stderr,
            vertical_overflow="visible",
        )
        self._live.start(refresh=True)
        self._drawn = self.clock()
        if self.route is not None:
            self.route.use_console(self.console)

    def _changed(self) -> None:
        if self._live is not None and self.clock() - self._drawn >= self.refresh:
            self._tick()

    def _tick(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._drawn = self.clock()

    def _teardown(self) -> None:
        live, self._live = self._live, None
        try:
            if live is not None:
                live.stop()  # draws the final table unless transient
        finally:
            if self.route is not None:
                self.route.use_console(None)

    def __rich__(self) -> Any:
        return self.render()

    def render(self) -> Any:
        """The table and the totals line, as a rich renderable."""
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = self.clock()
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("QUERY", overflow="ellipsis", max_width=24, no_wrap=True)
        table.add_column("SHARD", overflow="ellipsis", no_wrap=True)
        table.add_column("STATUS", no_wrap=True)
        table.add_column("NEW", justify="right")
        table.add_column("PAGES", justify="right")
        table.add_column("IMAGES/S", justify="right")
        table.add_column("TOTAL", justify="right")
        shown, hidden = self._rows()
        for s in shown:
            rate = s.rate(now)
            table.add_row(
                s.query,
                s.label,
                Text(s.status, style=_STYLE.get(s.status, "")),
                str(s.new),
                str(s.pages),
                "" if rate is None else f"{rate:.1f}",
                str(s.items_before + s.new),
            )
        if hidden:
            counts: dict[str, int] = {}
            for s in hidden:
                counts[s.status] = counts.get(s.status, 0) + 1
            detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=_by_status))
            more = Text(f"… {len(hidden)} more shards ({detail})", style="dim")
            table.add_row("", more, "", "", "", "", "")
        return Group(table, Text(self.summary_line(self.console.size.width - 1), no_wrap=True))

    def summary_line(self, width: int | None = None) -> str:
        """The run's totals, wrapped (if `width` is given) only between figures, never inside one."""
        t = self.totals()
        parts = [f"{t.done}/{t.shards} shards done" + (f", {t.failed} failed" if t.failed else "")]
        parts += [f"{t.new} new images", f"{t.pages} pages"]
        parts += [f"{t.rate:.1f} images/s"] if t.elapsed >= 1 else []  # no pace from a blink
        parts += [f"{t.requests} requests", f"{t.retries} retries", f"{t.rate_limited} rate-limited"]
        if t.cooldown_seconds:
            parts.append(f"{t.cooldown_seconds:.0f} s cooling down")
        if self.media_tally is not None:
            if not t.shards:
                parts = []
            parts.append(media_text(self.media_tally, self.clock()))
        parts.append(f"{_clock(t.elapsed)} elapsed")
        lines = [parts[0]]
        for part in parts[1:]:
            if width is not None and len(lines[-1]) + 3 + len(part) > width:
                lines.append(part)
            else:
                lines[-1] += " · " + part
        return "\n".join(lines)

    def _rows(self) -> tuple[list[ShardTally], list[ShardTally]]:
        """Every shard in config order if they fit; else the most interesting ones first."""
        shards = list(self.shards.values())
        limit = self.max_rows if self.max_rows is not None else max(3, self.console.size.height - 8)
        if len(shards) <= limit:
            return shards, []
        ranked = sorted(shards, key=lambda s: (_ORDER.get(s.status, 9), -(s.last or 0.0)))
        keep = {id(s) for s in ranked[: limit - 1]}
        return [s for s in shards if id(s) in keep], [s for s in shards if id(s) not in keep]


def media_text(m: MediaTally, now: float) -> str:
    """`media: 120 files (3.1/s, 4.2 MB/s), 2 gone, 1 failed; 130 requests, ...`"""
    files, mb = m.rates(now)
    return (
        f"media: {m.done} files ({files:.1f}/s, {mb:.1f} MB/s), {m.gone} gone, {m.failed} failed; "
        f"{m.counters.requests} requests, {m.counters.retries} retries, "
        f"{m.counters.rate_limited} rate-limited"
    )


def media_fields(m: MediaTally, now: float) -> dict[str, Any]:
    files, mb = m.rates(now)
    return {
        "media_done": m.done,
        "media_gone": m.gone,
        "media_failed": m.failed,
        "media_bytes": m.bytes,
        "media_files_per_second": round(files, 2),
        "media_mb_per_second": round(mb, 2),
        "media_requests": m.counters.requests,
    }


def _by_status(item: tuple[str, int]) -> int:
    return _ORDER.get(item[0], 9)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
