"""One writer per output folder: an advisory lock file (``DIR/.lock``, holding the writer's pid)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class FolderInUse(ValueError):
    """Another process is writing the folder."""


class FolderLock:
    """An exclusive ``flock`` on ``root/.lock`` held while this object is open; a second holder gets
    ``FolderInUse`` at once (the lock goes with the process, so a killed writer leaves no stale lock)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / ".lock"
        self._file: IO[str] | None = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            pid = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise FolderInUse(f"{root} is in use by another molgen process (pid {pid}); wait for it to finish or "
                              "use another folder") from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
