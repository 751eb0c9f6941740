"""One control plane per state directory: an exclusive advisory lock on ``<state_dir>/lock``.

Two control planes on one directory would each believe its own state and overwrite the other's
changes. ``flock`` is released by the kernel when the process dies, however it dies, so a crash
never leaves a stale lock behind; the file holds the owner's pid for the error message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from controlplane.errors import StateError

LOCK_FILE = "lock"


class StateDirLock:
    """Held from ``acquire`` until ``release`` (or the process's end)."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise StateError(
                f"state directory {self.path.parent} is in use by another control plane{owner}; "
                "stop that one first, or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_owner(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
