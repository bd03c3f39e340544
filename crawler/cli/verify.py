"""`harvest verify CONFIG`: check the output (the item segments, the refresh segments, the media
files) against the state; exit 0 when sound, 1 when not.

It holds the output lock while it reads: during a run, a page written but not yet
committed, or a segment being compressed, would look like a problem. A run in
progress is exit 4 at once.
"""

from __future__ import annotations

from crawler.archive.lock import OutputLock
from crawler.archive.media_ledger import MediaLedger
from crawler.archive.media_verify import verify_media
from crawler.archive.observations import RefreshLedger
from crawler.archive.verify import verify, verify_observations
from crawler.config import Config
from crawler.errors import ExitCode


def cmd_verify(config: Config) -> int:
    out = config.output.dir
    with MediaLedger.open(out, create=False) as state:
        lock = OutputLock(out, command="verify")
        try:
            report = verify(out, state)
            seen = verify_observations(out, state.sharing(RefreshLedger))
            media = verify_media(config.media.dir, state)
        finally:
            lock.release()
    for line in report.problems + report.notes:
        print(line)
    verdict = "sound" if report.sound else f"NOT sound: {len(report.problems)} problem(s)"
    print(f"{report.lines} images in {report.segments} segment(s) under {out}: {verdict}")
    if seen.segments:
        for line in seen.problems + seen.notes:
            print(line)
        shown = f"NOT sound: {len(seen.problems)} problem(s)" if seen.problems else "sound"
        print(f"{seen.lines} observations in {seen.segments} refresh segment(s): {shown}")
    if media.files or media.notes:
        for line in media.problems + media.notes:
            print(line)
        shown = f"NOT sound: {len(media.problems)} problem(s)" if media.problems else "sound"
        print(f"{media.files} media files ({media.bytes / 1e6:.1f} MB) under {config.media.dir}: {shown}")
    return ExitCode.OK if report.sound and seen.sound and not media.problems else ExitCode.ERROR
