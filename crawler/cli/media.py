"""`harvest media CONFIG`: only the media stage, over what the output dir has committed.

For an archive harvested before `[media]` was switched on, or a second machine's
disk. It takes the output dir's lock, honours signals and writes `last-run.json`
exactly like `harvest run` (with `"command": "media"`).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from crawler.archive.state import State
from crawler.cli.run import run_locked
from crawler.config import Config
from crawler.crawl.media import media_alone
from crawler.crawl.pipeline import RunSummary
from crawler.crawl.watch import Progress


def cmd_media(config: Config, progress: Progress, *, retry_gone: bool = False) -> int:
    def work(state: State, summary: RunSummary) -> Coroutine[Any, Any, object]:
        return media_alone(config, progress, summary, retry_gone=retry_gone)

    return run_locked(config, work, RunSummary(command="media"), create=False)
