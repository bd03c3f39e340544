"""One harvest per output dir at a time.

An flock on a file in the output dir: the kernel drops it when its holder dies,
so a lock left by a killed process is never stale. `run` takes it to write,
`verify` and `repair` to read or rebuild while nothing writes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from crawler.archive.fs import open_nofollow
from crawler.errors import HarvestError, LockedError, OutputError, StateError

LOCK_FILE = ".harvest.lock"


class OutputLock:
    """Held for the life of a command; `release` or process exit frees it.

    `command` is what takes it: "run" creates the output dir if need be; any other
    command needs the dir to exist, and is told to wait for the run that holds it.
    """

    def __init__(self, out_dir: Path, command: str = "run") -> None:
        if command != "run" and not out_dir.is_dir():
            raise StateError(f"{out_dir}: no harvest here yet (run `harvest run` first)")
        self._fd = _open(out_dir)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            if command == "run":
                raise LockedError(
                    f"{out_dir}: another harvest (pid {holder}) is running on this output dir"
                ) from None
            raise LockedError(
                f"a harvest run is in progress on {out_dir} (pid {holder}); {command} after it ends"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


def _open(out_dir: Path) -> int:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return open_nofollow(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    except HarvestError:
        raise
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot use as output dir: {exc.strerror}") from None
