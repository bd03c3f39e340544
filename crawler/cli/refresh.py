"""`harvest refresh CONFIG [--older-than 7d]`: observe the harvested images again (stats, levels,
existence) and append the observations to their own segments.

It takes the output dir's lock, honours SIGINT/SIGTERM (130/143: rerun to resume the
pass) and writes `last-run.json` like `harvest run`, with `"command": "refresh"`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Coroutine
from typing import Any

from crawler.archive.state import State
from crawler.cli.run import run_locked
from crawler.config import Config
from crawler.crawl.pipeline import RunSummary
from crawler.crawl.refresh import run_refresh
from crawler.crawl.watch import Progress

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s`, `2w` (or a sum: `1d12h`) in seconds; argparse's type."""
    compact = text.strip().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give a number and a unit, s, m, h, d or w (e.g. 7d, 12h)"
        )
    return sum(float(n) * _UNITS[u] for n, u in parts)


def cmd_refresh(config: Config, key: str | None, progress: Progress, older_than: float | None) -> int:
    def work(state: State, summary: RunSummary) -> Coroutine[Any, Any, object]:
        return run_refresh(config, key, progress, summary=summary, older_than=older_than)

    return run_locked(config, work, RunSummary(command="refresh"), create=False)
