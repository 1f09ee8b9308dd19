"""Workspace lock: one deliverer per workspace, enforced with flock on ``<workspace>/ess.lock``.

The kernel drops the lock when its holder dies, so a crash never leaves a stale lock.
The holder's pid is written into the file so that ``stop`` can signal it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import WorkspaceLockedError

__all__ = ("WorkspaceLock", "exclusive_flock", "lock_holder")

LOCK_NAME = "ess.lock"


@contextlib.contextmanager
def exclusive_flock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created 0600, never through a symlink), waiting
    for it; closing the descriptor at the end drops it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holder(workspace: Path) -> int | None:
    """The pid of the process delivering ``workspace``, or None if nobody is."""
    try:
        fd = os.open(workspace / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class WorkspaceLock:
    """An exclusive, non-blocking lock; ``acquire`` raises WorkspaceLockedError if held."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.path = workspace / LOCK_NAME
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise WorkspaceLockedError(self.workspace, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock
