"""One writer per run directory: an advisory lock that a second writer is refused by, by name.

A job's run directory holds its checkpoints, its rollout WAL and its metrics; two
processes writing there at once (a controller's worker and a foreground command, or
two foreground commands) would interleave checkpoints and WAL records. Every job
runner holds `RunLock` on the directory for as long as it writes there.

How: ``fcntl.flock`` on ``<run_dir>/.writer.lock``, taken without waiting. The
kernel drops the lock when the holding process exits, however it exits (SIGKILL
included), so a dead writer never leaves a stale lock behind; the file also holds
the holder's name, for the message the next writer gets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".writer.lock"


class RunDirLocked(RuntimeError):
    """Another live process is writing in this run directory."""


class RunLock:
    """Hold the one-writer lock of `directory` (created if missing) while the `with` block runs."""

    def __init__(self, directory: str | Path, holder: str):
        self.directory, self.holder = Path(directory), holder
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unnamed process"
            os.close(fd)
            raise RunDirLocked(f"{self.directory} is being written by {holder}; wait for it to finish, or stop "
                               "it (`retort cancel ID`), before running this job here") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
