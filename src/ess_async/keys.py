"""Idempotency keys: ``keys/<sha256>.json`` says which message id a key was given to.

A key is *taken* while its message is in the spool (any state) and *free* otherwise: a
missing, unreadable or hostile key file (a symlink, a FIFO, anything but a small regular
file holding ``{"id": ...}``) is free, and so is a key whose id is not in the spool. So
``Enqueuer.commit`` writes the key file first (durably) and the message second: a crash
between the two leaves a free key, and a retry makes exactly one message.

Enqueuers serialize on an flock on ``keys/.lock`` (the deliverer takes it only briefly,
to drop the keys of messages retention removed). Under it, a key's id that is not in the
spool cannot be one another enqueuer is writing now.

A key file holds ``{"id": <message id>, "key": <sha256>}``, and ``keys/ids/<id>.json`` is
a hard link to it: when a message is removed (``QueueOps.delete`` / ``purge``,
retention), ``forget`` finds its key from the id alone, without reading the record, and
removes it if it is still that message's key (the same file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .lock import exclusive_flock
from .spool import ID_PATTERN, Spool

__all__ = ("KEY_FILE_LIMIT", "KeyStore")

KEY_FILE_LIMIT = 4096  # bytes; a key file holds {"id": "<id>"}
_HASH = re.compile(r"^[0-9a-f]{64}$")
_TRIES = 3  # spool look-ups of a key's id, which a deliverer may be moving between folders


class KeyStore:
    """The ``keys/`` folder of a workspace. ``lookup`` and ``bind`` must run under
    ``locked()``; ``forget`` takes the lock itself."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.dir = spool.workspace / "keys"
        self.by_id = self.dir / "ids"

    def key_path(self, key_hash: str) -> Path:
        return self.dir / f"{key_hash}.json"

    def id_path(self, msg_id: str) -> Path:
        return self.by_id / f"{msg_id}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the enqueuers' flock on ``keys/.lock``."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        with exclusive_flock(self.dir / ".lock"):
            yield

    def read(self, key_hash: str) -> str | None:
        """The id in a key file, or None if there is none or it is not a well-formed key
        file. Never follows a symlink, never blocks on a FIFO, reads at most a few KB."""
        return _read_id(self.key_path(key_hash))

    def lookup(self, key_hash: str) -> Path | None:
        """The path of the message a key was given to, if that message is in the spool."""
        msg_id = self.read(key_hash)
        if msg_id is None:
            return None
        for _ in range(_TRIES):  # a message moving between two folders can be missed once
            found = self.spool.find(msg_id)
            if found is not None:
                return found[1]
        return None  # never written (a crash after the key), or removed: the key is free

    def bind(self, key_hash: str, msg_id: str) -> None:
        """Durably give a (free) key to ``msg_id``, before that message is written."""
        target = self.key_path(key_hash)
        old_id = self.read(key_hash)
        if old_id is not None:
            with contextlib.suppress(FileNotFoundError):
                self.id_path(old_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(target.lstat().st_mode):
                shutil.rmtree(target)  # a hostile entry; rmtree never follows links
        self.spool.write_file(target, json.dumps({"id": msg_id, "key": key_hash}).encode())
        self.by_id.mkdir(mode=0o700, exist_ok=True)
        link = self.id_path(msg_id)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        with contextlib.suppress(OSError):  # no hard links here: the key is just never pruned
            os.link(target, link, follow_symlinks=False)

    def forget(self, msg_ids: Iterable[str]) -> int:
        """Remove the keys of messages that were just removed from the spool; how many."""
        linked = [m for m in msg_ids if os.path.lexists(self.id_path(m))]
        if not linked:
            return 0  # the common case: no key, no lock
        removed = 0
        with contextlib.suppress(OSError), self.locked():  # best effort: a left key is free
            for msg_id in linked:
                link = self.id_path(msg_id)
                try:
                    info = link.lstat()
                    key_hash = _key_of(link)
                    if key_hash is not None:
                        target = self.key_path(key_hash)
                        with contextlib.suppress(FileNotFoundError):
                            if os.path.samestat(info, target.lstat()):
                                target.unlink()  # still this message's key
                                removed += 1
                    link.unlink()
                except FileNotFoundError:
                    continue
        return removed


def _read_small(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # missing, a symlink (ELOOP), unreadable
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > KEY_FILE_LIMIT:
            return None
        return os.read(fd, KEY_FILE_LIMIT + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_id(path: Path) -> str | None:
    data = _read_small(path)
    if data is None:
        return None
    try:
        msg_id = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None
    return msg_id if isinstance(msg_id, str) and ID_PATTERN.match(msg_id) else None


def _key_of(link: Path) -> str | None:
    """The key hash recorded in a key file (or its ``keys/ids/`` link), if well-formed."""
    data = _read_small(link)
    if data is None:
        return None
    try:
        key_hash = json.loads(data).get("key")
    except (ValueError, AttributeError):
        return None
    return key_hash if isinstance(key_hash, str) and _HASH.match(key_hash) else None
