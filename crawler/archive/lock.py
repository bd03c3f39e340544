"""One harvest per output dir at a time.

An flock on a file in the output dir: the kernel drops it when its holder dies,
so a lock left by a killed process is never stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from crawler.archive.fs import open_nofollow
from crawler.errors import LockedError, OutputError

LOCK_FILE = ".harvest.lock"


class OutputLock:
    """Held for the life of a run; `release` or process exit frees it."""

    def __init__(self, out_dir: Path) -> None:
        path = out_dir / LOCK_FILE
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)  # a planted symlink is refused
        except OSError as exc:
            raise OutputError(f"{out_dir}: cannot use as output dir: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise LockedError(
                f"{out_dir}: another harvest (pid {holder}) is running on this output dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)
