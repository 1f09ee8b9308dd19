"""The on-disk spool: one file per message, moved between state folders atomically.

A new record goes to ``tmp/`` first, is fsynced, renamed into place and the folder
fsynced, so a reader never sees half a file and a returned path survives a crash. A
message keeps its file name (``<id>.json``, lexically sortable by creation time) and,
through its sends, its file: a sender settles a message by appending one line to the
file it claimed (what changed: ``{"set": {...}, "unset": [...]}``), syncing it, and
renaming it into its next state's folder. A file is thus its record (one JSON object)
followed by zero or more such update lines; readers merge them (``record.decode_record``,
re-exported here with the record codec's other names).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpoolError
from .faults import crash_point, fail_point
from .message import MessageSpec
from .record import (
    ID_PATTERN,
    UPDATE_MARK,
    CorruptRecord,
    decode_record,
    encode_record,
    encode_update,
)

if TYPE_CHECKING:
    from .keys import KeyStore

__all__ = (
    "ACTIVE_STATES",
    "FINAL_STATES",
    "ID_PATTERN",
    "SETTLE_STATES",
    "STATES",
    "UPDATE_MARK",
    "CorruptRecord",
    "Spool",
    "cut_back",
    "decode_record",
    "encode_record",
    "encode_update",
    "new_id",
    "new_record",
    "priority_rank",
    "write_new",
)

STATES = ("queued", "scheduled", "active", "deferred", "held", "passed", "failed", "corrupt")
FINAL_STATES = ("passed", "failed", "corrupt")
ACTIVE_STATES = ("queued", "scheduled", "active", "deferred", "held")
PRIORITY_LETTERS = {"high": "h", "normal": "n", "low": "l"}
_PRIORITY_RANK = {"h": 0, "n": 1, "l": 2}
RECORD_VERSION = 1
SETTLE_STATES = ("queued", "deferred", "passed", "failed")  # where a sender moves a claim
UPDATE_ROOM = 1 << 20  # bytes of update lines a file may hold beyond max_message_size

_id_lock = threading.Lock()
_last_ns = 0


def new_id(priority: str = "normal") -> str:
    """A unique id whose lexical order is creation order (nanoseconds + random suffix)."""
    global _last_ns
    with _id_lock:
        ns = max(time.time_ns(), _last_ns + 1)
        _last_ns = ns
    return f"{ns:020d}-{PRIORITY_LETTERS[priority]}{secrets.token_hex(4)}"


def priority_rank(msg_id: str) -> int:
    """0 for high, 1 for normal, 2 for low: lower is claimed first."""
    return _PRIORITY_RANK.get(msg_id[21:22], 1)


def new_record(spec: MessageSpec, now: float, *, priority: str = "normal",
               send_at: float | None = None) -> dict[str, Any]:
    """The spool record of a freshly validated message."""
    return {
        "version": RECORD_VERSION,
        "id": new_id(priority),
        "state": "scheduled" if send_at is not None and send_at > now else "queued",
        "priority": priority,
        "send_at": send_at,
        "created_at": now,
        "mail_from": spec.mail_from,
        "recipients": spec.recipients,
        **spec.summary,
        "attempts": 0,
        "next_attempt_at": send_at,
        "last_error": None,
        # Rendered with 7-bit transfer encodings: ASCII, or UTF-8 headers with SMTPUTF8.
        "smtputf8": spec.smtputf8,
        "raw": spec.raw.decode("utf-8" if spec.smtputf8 else "ascii"),
    }


def write_new(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` (0600; never an existing file, never through a symlink) holding
    ``data``, fsynced unless ``sync`` is False; on any failure it is removed again."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs() if sys.platform.startswith("linux") else None


def _sync_data(folder: Path, files: list[Path]) -> None:
    """Make the data of ``files`` durable: one syncfs for a batch on Linux, else fsyncs."""
    if len(files) > 1 and _SYNCFS is not None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    """The whole file from its offset: one read for the size fstat gave; on only if it
    was short or the file grew meanwhile."""
    data = os.read(fd, size + 1)
    if len(data) != size:
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def cut_back(path: Path | str, size: int) -> None:
    """Take a claimed file back to its first ``size`` bytes (a partly written or torn
    update cut off), durably."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


_shard_names: dict[int, str] = {}


def _shard(timestamp: float) -> str:
    day = int(timestamp // 86400)
    name = _shard_names.get(day)
    if name is None:
        name = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")
        _shard_names[day] = name
    return name


class Spool:
    """File-level operations on a workspace. Synchronous; callers move them off the loop."""

    def __init__(self, workspace: Path, *, max_size: int = 50 * 1024 * 1024) -> None:
        self.workspace = workspace
        self.max_size = max_size  # of a record; its update lines may add UPDATE_ROOM
        self.read_cap = max_size + UPDATE_ROOM
        self.tmp = workspace / "tmp"
        # Plain strings for the hot paths: building Path objects costs more than the I/O.
        self._dirs = {state: str(workspace / state) for state in (*STATES, "tmp")}
        self._shards: set[str] = set()
        self._keys: KeyStore | None = None

    @property
    def keys(self) -> KeyStore:
        """The workspace's idempotency keys (``keys/``)."""
        if self._keys is None:
            from .keys import KeyStore  # keys builds on this module

            self._keys = KeyStore(self)
        return self._keys

    def dir(self, state: str) -> Path:
        return self.workspace / state

    def ensure(self) -> None:
        """Create the workspace and its folders (0700) if missing."""
        try:
            self.workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in (*STATES, "tmp"):
                (self.workspace / name).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot create workspace {self.workspace}: "
                             f"{exc.strerror}") from None

    # -- writing ---------------------------------------------------------------------

    def _write_tmp(self, name: str, data: bytes, *, sync: bool = True) -> Path:
        tmp = Path(f"{self._dirs['tmp']}/{name}.{secrets.token_hex(4)}.tmp")
        write_new(tmp, data, sync=sync)
        return tmp

    def write_file(self, target: Path, data: bytes) -> Path:
        """Atomically and durably put ``data`` at ``target`` (tmp, fsync, rename, fsync)."""
        try:
            tmp = self._write_tmp(target.stem, data)
            crash_point("after_tmp_write")
            try:
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            crash_point("after_queue_rename")
            fsync_dir(target.parent)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot write {target}: {exc.strerror}") from None
        return target

    def target(self, state: str, record: dict[str, Any]) -> Path:
        if state not in ("passed", "failed"):
            return Path(f"{self._dirs[state]}/{record['id']}.json")
        folder = f"{self._dirs[state]}/{_shard(record.get('finished_at') or time.time())}"
        if folder not in self._shards:
            if not os.path.isdir(folder):
                os.makedirs(folder, mode=0o700, exist_ok=True)
                fsync_dir(Path(self._dirs[state]))  # a settle moves the only copy there
            self._shards.add(folder)  # checked once per day and process, not per message
        return Path(f"{folder}/{record['id']}.json")

    def write(self, state: str, record: dict[str, Any]) -> Path:
        """Atomically write ``record`` as ``<state>/<id>.json`` (sharded by date when final)."""
        return self.write_file(self.target(state, record), encode_record(record))

    def settle_many(self, items: list[tuple[str, str, dict[str, Any], bytes | None]]
                    ) -> list[OSError | None]:
        """Move a batch of claimed messages, ``(id, state, record, claimed)``, to their
        next states (a group commit) without a new file: append to each claimed file the
        update line from what it holds (``claimed``, the bytes read when it was claimed,
        or read now if None) to ``record``, make them all durable with one filesystem sync
        (a lone one: its own fsync), rename each into its state's folder, then fsync
        those folders. A crash before a rename leaves the file in ``active/`` with its
        update, whole or torn; recovery tells it from the claim by the size journaled
        then (``Dispatcher.settle_claim``).

        Returns, per item, the error that kept it from its next state, or None: if its
        update could not be written, its file is back as it was claimed (the update cut
        off); if it could not be moved, it stays in ``active/`` with its update, which
        ``Dispatcher.settle_claim`` carries out later. Raises OSError if the batch could
        not be made durable: then no file was moved (the sync failed: each keeps its
        update, the message's decided next state) or all were (a folder's fsync
        failed)."""
        errors: list[OSError | None] = []
        staged: list[tuple[int, str, Path]] = []
        each = len(items) == 1 or _SYNCFS is None
        active = self._dirs["active"]
        for msg_id, state, record, claimed in items:
            path = f"{active}/{msg_id}.json"
            try:
                target = self.target(state, record)
                # Given the claimed bytes, two system calls fewer (and fewer waits for
                # the GIL the event loop holds).
                fd = os.open(path, (os.O_RDWR if claimed is None else os.O_WRONLY)
                             | os.O_APPEND | os.O_NOFOLLOW)
                try:
                    data = _read_all(fd, os.fstat(fd).st_size) if claimed is None \
                        else claimed
                    try:
                        update = encode_update(decode_record(data, check=False), record)
                    except CorruptRecord as exc:  # changed under its claim: never expected
                        raise OSError(errno.EIO, f"claimed file unreadable: {exc.reason}"
                                      ) from None
                    try:
                        _write_all(fd, update)
                        if each:
                            os.fsync(fd)
                    except BaseException:
                        # If this fails too, recovery cuts it (the claim's journaled size).
                        with contextlib.suppress(OSError):
                            cut_back(path, len(data))
                        raise
                finally:
                    os.close(fd)
            except OSError as exc:
                errors.append(exc)
                continue
            staged.append((len(errors), path, target))
            errors.append(None)
        if not staged:
            return errors
        fail_point("spool_commit")
        if not each:
            _sync_data(self.tmp, [Path(path) for _, path, _ in staged])
        crash_point("after_next_state")
        folders = set()
        for index, path, target in staged:
            try:
                os.rename(path, target)
            except OSError as exc:
                errors[index] = exc
                continue
            folders.add(target.parent)
        fail_point("spool_dir_sync")
        for folder in folders:
            fsync_dir(folder)
        return errors

    def write_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[Path | SpoolError]:
        """``write`` for a batch (a group commit): one filesystem sync for all the data and
        one fsync per folder instead of two fsyncs per file. Each item gets its path, or
        the error that kept it out; every returned path is durable."""
        results: list[Path | SpoolError] = []
        staged: list[tuple[int, Path, Path]] = []
        for state, record in items:
            target = self.target(state, record)
            try:
                tmp = self._write_tmp(target.stem, encode_record(record), sync=False)
            except OSError as exc:
                results.append(SpoolError(exc.errno, f"cannot write {target}: {exc.strerror}"))
                continue
            staged.append((len(results), tmp, target))
            results.append(target)
        try:
            _sync_data(self.tmp, [tmp for _, tmp, _ in staged])
            crash_point("after_tmp_write")
            for _, tmp, target in staged:
                os.replace(tmp, target)
            crash_point("after_queue_rename")
            for folder in {target.parent for _, _, target in staged}:
                fsync_dir(folder)
        except OSError as exc:
            for index, tmp, target in staged:
                # Staged or renamed, none of these was promised: take them all back.
                tmp.unlink(missing_ok=True)
                target.unlink(missing_ok=True)
                results[index] = SpoolError(exc.errno, f"cannot write {target}: {exc.strerror}")
        return results

    # -- moving ----------------------------------------------------------------------

    def path(self, state: str, msg_id: str) -> Path:
        return Path(f"{self._dirs[state]}/{msg_id}.json")

    def rename(self, msg_id: str, src: str, dst: str) -> bool:
        """Move a message between flat state folders; False if it is no longer in ``src``."""
        try:
            os.rename(f"{self._dirs[src]}/{msg_id}.json", f"{self._dirs[dst]}/{msg_id}.json")
        except FileNotFoundError:
            return False
        return True

    def claim_many(self, claims: list[tuple[str, tuple[str, ...]]]
                   ) -> list[tuple[dict[str, Any], bytes] | CorruptRecord | OSError | None]:
        """Claim messages by renaming each into ``active/`` from the first of its source
        folders that has it, and read their records (a thread job for a batch of
        senders). Per message: its record and its file's bytes (what was claimed: bytes
        beyond them are this claim's settle, see ``settle_many``), None (in none of its
        sources), the CorruptRecord its file is, or the OSError met (renamed or not)."""
        results: list[tuple[dict[str, Any], bytes] | CorruptRecord | OSError | None] = []
        for msg_id, sources in claims:
            try:
                if not any(self.rename(msg_id, source, "active") for source in sources):
                    results.append(None)
                    continue
                crash_point("after_claim_rename")  # renamed, its claim not yet journaled
                data = self.read_bytes(f"{self._dirs['active']}/{msg_id}.json",
                                        self.read_cap)
                assert data is not None
                record = decode_record(data)
                if record["id"] != msg_id:
                    raise CorruptRecord("record id does not match its file name")
                results.append((record, data))
            except (CorruptRecord, OSError) as exc:
                results.append(exc)
        return results

    def finish_settle(self, msg_id: str, state: str, record: dict[str, Any]) -> Path:
        """Carry out a settle interrupted after its update was appended to the claimed
        file (``record`` is that file's merged record): sync the file, move it into
        ``state``'s folder, sync that folder. Returns its new path."""
        path = self.path("active", msg_id)
        _sync_data(self.tmp, [path])
        target = self.target(state, record)
        os.rename(path, target)
        fsync_dir(target.parent)
        return target

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move an unusable file into corrupt/ (never following links) and note why."""
        name = path.name if ID_PATTERN.match(path.name.removesuffix(".json")) else (
            f"{new_id()}.json")
        target = self.dir("corrupt") / name
        os.rename(path, target)
        note = {"file": path.name, "reason": reason, "at": time.time()}
        reason_path = self.dir("corrupt") / f"{target.name}.reason"
        fd = os.open(reason_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, encode_record(note))
        finally:
            os.close(fd)
        return target

    # -- reading ---------------------------------------------------------------------

    def read(self, path: Path) -> dict[str, Any]:
        """Read and check a record; raise CorruptRecord for anything that is not one.

        Never follows a symlink, never blocks on a FIFO, never reads past ``max_size``.
        """
        record = self.read_small(path, self.read_cap)
        assert record is not None
        return record

    def read_small(self, path: Path | str, limit: int) -> dict[str, Any] | None:
        """``read``, or None (nothing read) if the file is bigger than ``limit`` bytes
        (and within ``max_size``): the sender reads those off the event loop."""
        data = self.read_bytes(path, limit)
        return None if data is None else decode_record(data)

    def read_bytes(self, path: Path | str, limit: int) -> bytes | None:
        """A spool file's bytes, checked as ``read_small`` checks them (CorruptRecord for
        a link, a non-file or an oversized record), or None if bigger than ``limit``."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CorruptRecord(f"cannot open: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CorruptRecord("not a regular file")
            if info.st_size > self.read_cap:
                raise CorruptRecord(f"larger than max_message_size ({info.st_size} bytes)")
            if info.st_size > limit:
                return None
            data = _read_all(fd, info.st_size)
        finally:
            os.close(fd)
        # The bound is on the record; its update lines (a settle's changes) have room of
        # their own, so a message near the limit is not lost to its own retries.
        end = data.find(UPDATE_MARK)
        if (len(data) if end < 0 else end) > self.max_size:
            raise CorruptRecord(f"larger than max_message_size ({info.st_size} bytes)")
        return data

    def ids(self, state: str) -> list[str]:
        """Ids of the messages in a flat state folder, oldest first."""
        return sorted(n[:-5] for n in self._names(self.dir(state)) if n.endswith(".json")
                      and ID_PATTERN.match(n[:-5]))

    def strays(self, state: str) -> list[Path]:
        """Entries of a state folder that are not message files (to quarantine)."""
        return [self.dir(state) / n for n in self._names(self.dir(state))
                if not (n.endswith(".json") and ID_PATTERN.match(n[:-5]))
                and not n.startswith(".")]

    @staticmethod
    def _names(folder: Path) -> list[str]:
        try:
            return os.listdir(folder)
        except FileNotFoundError:
            return []

    def count(self, state: str) -> int:
        folder = self.dir(state)
        if state in ("passed", "failed"):
            return sum(1 for _ in self.walk_final(state))
        return sum(1 for n in self._names(folder) if n.endswith(".json"))

    def walk_final(self, state: str) -> Iterator[Path]:
        for shard in sorted(self._names(self.dir(state))):
            for name in sorted(self._names(self.dir(state) / shard)):
                if name.endswith(".json"):
                    yield self.dir(state) / shard / name

    def find(self, msg_id: str, states: tuple[str, ...] = STATES) -> tuple[str, Path] | None:
        """Which of ``states`` holds ``msg_id`` now, and where."""
        for state in states:
            if state in ("passed", "failed"):
                for shard in sorted(self._names(self.dir(state)), reverse=True):
                    path = self.dir(state) / shard / f"{msg_id}.json"
                    if os.path.lexists(path):
                        return state, path
            elif os.path.lexists(path := self.path(state, msg_id)):
                return state, path
        return None

    def counts(self) -> dict[str, int]:
        return {state: self.count(state) for state in STATES}

    def clean_tmp(self, older_than: float = 600.0) -> int:
        """Remove abandoned partial writes (a concurrent writer's fresh ones are kept)."""
        removed = 0
        cutoff = time.time() - older_than
        for name in self._names(self.tmp):
            path = self.tmp / name
            try:
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
