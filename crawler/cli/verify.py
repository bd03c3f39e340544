"""`harvest verify CONFIG`: check the output against the state; exit 0 when sound, 1 when not."""

from __future__ import annotations

from crawler.archive.state import State
from crawler.archive.verify import verify
from crawler.config import Config
from crawler.errors import ExitCode


def cmd_verify(config: Config) -> int:
    state = State.open(config.output.dir, create=False)
    try:
        report = verify(config.output.dir, state)
    finally:
        state.close()
    for line in report.problems + report.notes:
        print(line)
    verdict = "sound" if report.sound else f"NOT sound: {len(report.problems)} problem(s)"
    print(f"{report.lines} images in {report.segments} segment(s) under {config.output.dir}: {verdict}")
    return ExitCode.OK if report.sound else ExitCode.ERROR
