"""`harvest verify CONFIG`: check the output against the state; exit 0 when sound, 1 when not.

It holds the output lock while it reads: during a run, a page written but not yet
committed, or a segment being compressed, would look like a problem. A run in
progress is exit 4 at once.
"""

from __future__ import annotations

from crawler.archive.lock import OutputLock
from crawler.archive.state import State
from crawler.archive.verify import verify
from crawler.config import Config
from crawler.errors import ExitCode


def cmd_verify(config: Config) -> int:
    out = config.output.dir
    with State.open(out, create=False) as state:
        lock = OutputLock(out, command="verify")
        try:
            report = verify(out, state)
        finally:
            lock.release()
    for line in report.problems + report.notes:
        print(line)
    verdict = "sound" if report.sound else f"NOT sound: {len(report.problems)} problem(s)"
    print(f"{report.lines} images in {report.segments} segment(s) under {out}: {verdict}")
    return ExitCode.OK if report.sound else ExitCode.ERROR
