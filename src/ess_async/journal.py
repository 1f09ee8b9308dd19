"""Append-only claims journal: what each claimed message has been through.

A sender appends ``claim`` when it takes a message and ``accepted`` (fsynced, in groups)
as soon as the server has accepted it. After a crash, replay tells which claimed
messages were already delivered (finish them as passed, never resend) and which were
not (put them back in the queue). Lines are JSON; a torn last line is ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ("Journal", "replay")

logger = logging.getLogger("ess_async.journal")


def replay(path: Path) -> dict[str, dict[str, Any]]:
    """The last entry of every message id in the journal at ``path``."""
    last: dict[str, dict[str, Any]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return last
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # torn write at a crash: that entry never counted
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            last[entry["id"]] = entry
    return last


class Journal:
    """The writer. ``accepted`` entries are durable when ``record_accepted`` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = self._open()
        self._written = 0  # entries written
        self._synced = 0  # entries known durable
        self._sync_lock = asyncio.Lock()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)

    def append(self, entry: dict[str, Any]) -> None:
        """Append without waiting for the disk (for entries a crash may lose)."""
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        os.write(self._fd, line)  # O_APPEND: one write per line keeps lines whole
        self._written += 1

    async def append_durable(self, entry: dict[str, Any]) -> None:
        """Append and return once the entry is on disk; concurrent callers share fsyncs."""
        self.append(entry)
        target = self._written
        async with self._sync_lock:
            if self._synced >= target:
                return  # a sync that started after our write already covered it
            upto = self._written
            await asyncio.to_thread(os.fsync, self._fd)
            self._synced = upto

    @property
    def entries_written(self) -> int:
        return self._written

    @property
    def syncing(self) -> bool:
        return self._sync_lock.locked()

    def compact(self, keep: list[dict[str, Any]]) -> None:
        """Replace the journal with ``keep`` (entries of messages still claimed).

        Dropped entries belong to messages whose final records are already durable.
        """
        tmp = self.path.with_suffix(".compact")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n"
                                  for e in keep))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.close(self._fd)
        self._fd = self._open()
        self._written = self._synced = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
