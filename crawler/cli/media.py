"""`harvest media CONFIG`: only the media stage, over what the output dir has committed.

For an archive harvested before `[media]` was switched on, or a second machine's
disk. It takes the output dir's lock, honours signals and writes `last-run.json`
exactly like `harvest run` (with `"command": "media"`).

`--engine ray` hands the downloads to a Ray cluster (`crawler.crawl.media_ray`);
this process stays the only one that opens the state.
"""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any

from crawler.archive.state import State
from crawler.cli.run import run_locked
from crawler.config import Config
from crawler.crawl.media import media_alone
from crawler.crawl.media_ray import RayOptions, media_on_ray
from crawler.crawl.pipeline import RunSummary
from crawler.crawl.watch import Progress

ENGINES = ("local", "ray")


def positive(text: str) -> int:
    """A whole number of at least 1; argparse's type."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def cmd_media(
    config: Config,
    progress: Progress,
    *,
    retry_gone: bool = False,
    engine: str = "local",
    ray: RayOptions | None = None,
) -> int:
    def work(state: State, summary: RunSummary) -> Coroutine[Any, Any, object]:
        if engine == "ray":
            return media_on_ray(config, progress, summary, ray or RayOptions(), retry_gone=retry_gone)
        return media_alone(config, progress, summary, retry_gone=retry_gone)

    return run_locked(config, work, RunSummary(command="media"), create=False)
