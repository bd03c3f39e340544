"""`harvest repair CONFIG`: rebuild the state from the segment files (`crawler.archive.repair`).

The way out when a run refuses because the state and the files disagree: a lost
or older state, a segment deleted or cut. Holds the output lock while it works.
"""

from __future__ import annotations

import sys
from typing import TextIO

from crawler.archive.checkpoint import ArchiveSpec
from crawler.archive.lock import OutputLock
from crawler.archive.repair import Repair, repair
from crawler.config import Config
from crawler.errors import ExitCode, StateError


def cmd_repair(config: Config) -> int:
    out = config.output
    lock = OutputLock(out.dir, command="repair")
    try:
        done = repair(
            out.dir,
            ArchiveSpec(
                out.dir, out.segment_items, out.segment_mb, out.compress, out.publish, out.keep_local
            ),
        )
    except StateError as exc:
        advice = "mend the file, or move it aside to forget its images, and repair again"
        raise StateError(f"{exc}; nothing was changed ({advice})") from None
    finally:
        lock.release()
    print_repair(done, config)
    return ExitCode.OK


def print_repair(done: Repair, config: Config, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    closed = sum(s.closed for s in done.segments)
    print(
        f"read {len(done.segments)} segment file(s) under {config.output.dir}: {done.images} images "
        f"({closed} closed segment(s), {len(done.segments) - closed} active)",
        file=out,
    )
    if done.cut:
        print(f"{done.cut[0]}: cut a torn last line ({done.cut[1]} bytes)", file=out)
    for line in done.forgotten:
        print(line, file=out)
    for twin in done.ignored:
        print(f"{twin}: another form of a segment read from its plain file; left as it is", file=out)
    if done.backup is not None:
        known = "unreadable" if done.old_images is None else f"{done.old_images} images"
        print(f"the old state ({known}) is kept as {done.backup.name}", file=out)
    print(
        f"repaired: the state holds the {done.images} images of the files. Cursors are not in the files: "
        f"`harvest run {config.path}` walks every shard from its head, and writes no image twice",
        file=out,
    )
