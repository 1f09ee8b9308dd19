"""Append-only claims journal: what each claimed message has been through.

A sender appends ``claim`` when it takes a message and ``accepted`` (fsynced, in groups)
as soon as the server has accepted it. After a crash, replay tells which claimed
messages were already delivered (finish them as passed, never resend) and which were
not (put them back in the queue). Lines are JSON; a torn line is ignored.

The journal keeps in memory the last entry of every message that is not yet settled
(``live``). Compaction rewrites the file from ``live`` alone, under the sync lock, so an
entry that was written and not yet settled survives it whether or not it was synced, and
entries appended meanwhile are held back and written to the new file afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import orjson

from .faults import fail_point
from .record import plain_json

__all__ = ("Journal", "replay")

logger = logging.getLogger("ess_async.journal")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def replay(path: Path) -> dict[str, dict[str, Any]]:
    """The last entry of every message id in the journal at ``path``."""
    last: dict[str, dict[str, Any]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return last
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
            if not plain_json(entry):
                raise ValueError("orjson and json may part ways here")
        except ValueError:  # orjson.JSONDecodeError included
            try:  # what orjson refuses or reads otherwise: the json module decides
                entry = json.loads(line, parse_constant=_reject_constant)
            except ValueError:
                continue  # torn write at a crash (or a failed write): never counted
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            at = entry.get("at")
            if isinstance(at, float) and not math.isfinite(at):
                continue
            last[entry["id"]] = entry
    return last


def _encode(entry: dict[str, Any]) -> bytes:
    # orjson writes UTF-8 where json wrote \u escapes (replay reads either); what orjson
    # would write otherwise (NaN as null, say) or refuses goes through json as before.
    if plain_json(entry):
        try:
            return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


class Journal:
    """The writer. ``append_durable`` returns once its entry is on disk."""

    def __init__(self, path: Path, *, live: dict[str, dict[str, Any]] | None = None) -> None:
        self.path = path
        self._fd = self._open()
        self.live: dict[str, dict[str, Any]] = dict(live or {})  # id -> last unsettled entry
        self._written = 0  # entries written (monotonic: never reset)
        self._synced = 0  # entries known durable (or settled) up to this count
        self._since_compact = 0
        self._sync_lock = asyncio.Lock()
        self._held: list[bytes] | None = None  # lines appended while compacting
        self._torn = False  # a failed write may have left half a line: start a fresh one
        # Live entries may be missing from the file (a held line could not be written, or
        # a compaction replaced the file but could not reopen it): the next sync rewrites
        # the journal from ``live`` before it says anything is durable.
        self._broken = False
        self._dir_dirty = False  # a rename into the folder is not yet known durable

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)

    def _write(self, line: bytes) -> None:
        if self._torn:
            line = b"\n" + line  # never glue an entry onto a torn one
        try:
            fail_point("journal_write")
            written = os.write(self._fd, line)  # O_APPEND: one write keeps its lines whole
        except OSError:
            self._torn = True
            raise
        if written != len(line):
            self._torn = True
            raise OSError(28, "short write to the journal (disk full?)")
        self._torn = False

    def append(self, entry: dict[str, Any]) -> None:
        """Append without waiting for the disk (for entries a crash may lose). The entry
        is the message's live one until ``settle`` even if the write fails."""
        self.append_many([entry])

    def append_many(self, entries: list[dict[str, Any]]) -> None:
        """``append`` for several entries, in one write."""
        if not entries:
            return
        for entry in entries:
            self.live[entry["id"]] = entry
        self._written += len(entries)
        self._since_compact += len(entries)
        lines = [_encode(entry) for entry in entries]
        if self._held is not None:
            self._held.extend(lines)
        else:
            self._write(b"".join(lines))

    async def append_durable(self, entry: dict[str, Any]) -> None:
        """Append and return once the entry is on disk; concurrent callers share fsyncs.
        Raises OSError if it could not be made durable (the entry stays live)."""
        self.append(entry)
        await self.sync(self._written)

    async def sync(self, target: int | None = None) -> None:
        """Make every entry written so far (or up to ``target``) durable."""
        target = self._written if target is None else target
        async with self._sync_lock:
            if self._synced >= target:
                return  # a sync (or a compaction) after our write already covered it
            if self._broken or self._dir_dirty:
                await self._compact_locked()  # heal: every live entry into a synced file
                if self._synced >= target:
                    return
            upto = self._written
            await asyncio.to_thread(self._fsync)
            self._synced = max(self._synced, upto)

    def _fsync(self) -> None:
        fail_point("journal_sync")
        # fdatasync: the appended lines and the file size they need (what replay reads),
        # without the timestamps; ~10x cheaper than fsync on ext4 (85 us against 960).
        os.fdatasync(self._fd)

    def settle(self, msg_id: str) -> None:
        """The message's next state is durable: its entries need not survive compaction."""
        self.live.pop(msg_id, None)

    @property
    def entries_written(self) -> int:
        return self._written

    @property
    def entries_since_compaction(self) -> int:
        return self._since_compact

    async def compact(self) -> None:
        """Rewrite the journal with the live entries only (those of messages not yet
        settled). Runs under the sync lock: appends made meanwhile are held back and
        written to the new file after it is in place; nothing live is ever dropped."""
        async with self._sync_lock:
            await self._compact_locked()

    async def _compact_locked(self) -> None:
        self._held = []
        upto = self._written
        job = asyncio.ensure_future(asyncio.to_thread(self._rewrite,
                                                      list(self.live.values())))
        try:
            fd, error = await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread goes on: the descriptor must follow the file it leaves in place.
            fd, error = await job
            self._switch(fd, error, upto)
            raise
        self._switch(fd, error, upto)
        if error is not None:
            raise error

    def _switch(self, fd: int | None, error: OSError | None, upto: int) -> None:
        """Adopt what ``_rewrite`` left (see there), then write the held lines."""
        if fd == -1:
            self._broken = True  # replaced, but not reopened: the next sync heals it
        elif fd is not None:
            os.close(self._fd)
            self._fd = fd
            self._torn = False
            if error is None:
                self._broken = self._dir_dirty = False
                self._synced = max(self._synced, upto)  # every live entry is synced
                self._since_compact = 0
            else:
                self._dir_dirty = True  # the rename may not survive a crash yet
        held, self._held = self._held or [], None
        if fd == -1:
            return  # nowhere to write them: they are live, the heal writes them
        try:
            for line in held:
                self._write(line)
        except OSError:
            self._broken = True  # the rest are live: the next sync rewrites them

    def compact_now(self) -> None:
        """``compact`` for when nothing else runs (opening and closing a run)."""
        if self._held is not None or self._sync_lock.locked():
            raise RuntimeError("compact_now while the journal is in use")
        upto = self._written
        fd, error = self._rewrite(list(self.live.values()))
        self._switch(fd, error, upto)
        if error is not None:
            raise error

    def _rewrite(self, keep: list[dict[str, Any]]) -> tuple[int | None, OSError | None]:
        """Write ``keep`` to a new file and put it in place of the journal. Returns the new
        descriptor and the error, if any: (None, error) when the old file is still the
        journal; (-1, error) when the new one is but could not be opened; (fd, error)
        when the folder could not be synced after the rename."""
        tmp = self.path.with_suffix(".compact")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(b"".join(_encode(e) for e in keep))
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            return None, exc
        try:
            fd = self._open()
        except OSError as exc:
            return -1, exc
        try:
            fail_point("journal_dir_sync")
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            return fd, exc
        return fd, None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
