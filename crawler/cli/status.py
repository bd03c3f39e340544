"""`harvest status CONFIG`: where every shard of a config's harvest stands, read from its state."""

from __future__ import annotations

from crawler.archive.media_ledger import MediaLedger
from crawler.cli.report import print_status
from crawler.config import Config
from crawler.errors import ExitCode


def cmd_status(config: Config) -> int:
    state = MediaLedger.open(config.output.dir, create=False)
    try:
        print_status(state, config)
    finally:
        state.close()
    return ExitCode.OK
