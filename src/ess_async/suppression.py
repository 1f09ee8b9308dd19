"""The suppression list: addresses that are never sent to (issue 14 part 5).

An address goes on the list when a server refuses it permanently at RCPT (a 5xx that is
about the mailbox, not a 5.7.x policy reply or a 5.3.x system one), or by hand
(``ess-async suppress add ADDRESS``, ``SuppressionList.add``: a bounce that came back
later). ``create_work`` then queues nothing for it (see ``apply``), unless
``force=True``.

The list lives in the workspace: ``suppressed/<sha256 of the address>.json``, one small
file per address, written atomically (a temporary file in the same folder, fsync, rename,
fsync of the folder), 0600 in a 0700 folder. A look-up is one ``open`` of a known name,
so checking the recipients of each ``create_work`` costs a few microseconds however long
the list is, and any number of processes can add, remove and check at once without a
lock (the last write of an address wins). Addresses are compared case-insensitively
(``Bob@Example.COM`` is ``bob@example.com``). With ``[suppression] ttl_days`` set, an
entry older than that is no longer listed (and retention removes its file).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import MessageError

__all__ = ("SUPPRESSED_DIR", "SuppressionList", "apply", "normalize", "refused_for_good")

SUPPRESSED_DIR = "suppressed"
_ENTRY_LIMIT = 8192  # bytes: an entry file holds one address and a short reason


def normalize(address: str) -> str:
    """The list's form of an address: its addr-spec (``Name <a@b>`` gives ``a@b``),
    lower-cased. MessageError if it is not an address."""
    if not isinstance(address, str):
        raise MessageError("address", f"must be a string, not {type(address).__name__}")
    text = address.strip()
    if "<" in text:
        text = email.utils.parseaddr(text)[1]
    text = text.strip().lower()
    local, at, domain = text.rpartition("@")
    if (not at or not local or not domain or len(text) > 254
            or any(c.isspace() or ord(c) < 32 or c in "<>" for c in text)):
        raise MessageError("address", f"not an email address: {address[:80]!r}")
    return text


def refused_for_good(code: object, reply: object) -> bool:
    """Whether a refusal at RCPT means the address should not be tried again: a 5xx,
    except policy (5.7.x: relay denied, a blocked client) and system (5.3.x) replies,
    which say nothing about the mailbox."""
    if not isinstance(code, int) or not 500 <= code < 600:
        return False
    text = str(reply or "").lstrip()
    return not (text.startswith("5.7.") or text.startswith("5.3."))


class SuppressionList:
    """``<workspace>/suppressed/``. Synchronous and cheap: a check is one ``open``."""

    def __init__(self, workspace: Path, *, ttl_days: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(workspace) / SUPPRESSED_DIR
        self.ttl = ttl_days * 86400.0
        self.clock = clock

    def _path(self, address: str) -> Path:
        digest = hashlib.sha256(address.encode("utf-8")).hexdigest()
        return self.dir / f"{digest}.json"

    # -- reading -----------------------------------------------------------------------

    def _read(self, path: Path) -> dict[str, Any] | None:
        """An entry file, or None if it is missing or not a well-formed entry (never
        follows a symlink, never blocks on a FIFO, reads at most a few KB)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, _ENTRY_LIMIT + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(data) > _ENTRY_LIMIT:
            return None
        try:
            entry = json.loads(data)
        except ValueError:
            return None
        if not (isinstance(entry, dict) and isinstance(entry.get("address"), str)
                and isinstance(entry.get("at"), int | float)
                and not isinstance(entry.get("at"), bool)):
            return None
        return entry

    def _live(self, entry: dict[str, Any] | None) -> bool:
        return entry is not None and (not self.ttl or entry["at"] + self.ttl > self.clock())

    def get(self, address: str) -> dict[str, Any] | None:
        """The entry of ``address`` (address, at, reason, code, reply, source), or None if
        it is not listed (or its entry has expired)."""
        key = normalize(address)
        entry = self._read(self._path(key))
        if entry is None or entry["address"] != key or not self._live(entry):
            return None
        return entry

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self.get(address) is not None

    def check(self, recipients: Iterable[str]) -> list[str]:
        """The recipients that are listed (as given), in order."""
        if not self.dir.is_dir():
            return []
        return [r for r in recipients if self.get(r) is not None]

    def entries(self) -> list[dict[str, Any]]:
        """Every live entry, sorted by address."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.endswith(".json"):
                    entry = self._read(self.dir / name)
                    if self._live(entry):
                        assert entry is not None
                        found.append(entry)
        return sorted(found, key=lambda e: str(e["address"]))

    # -- writing -----------------------------------------------------------------------

    def add(self, address: str, *, reason: str = "manual", code: int | None = None,
            reply: str | None = None, source: str = "manual") -> dict[str, Any]:
        """List ``address`` (again: its time and reason are renewed); durable on return."""
        key = normalize(address)
        entry = {"address": key, "at": self.clock(), "reason": str(reason)[:500],
                 "code": code, "reply": None if reply is None else str(reply)[:1000],
                 "source": source}
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self._path(key)
        tmp = self.dir / f".{target.stem}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(entry, ensure_ascii=False).encode("utf-8"))
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir()
        return entry

    def remove(self, address: str) -> bool:
        """Take ``address`` off the list; False if it was not on it."""
        key = normalize(address)
        listed = self.get(key) is not None
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        self._sync_dir()
        return listed

    def prune(self) -> int:
        """Remove the files of expired entries (and stale temporary files); how many."""
        if not self.ttl:
            return 0
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                path = self.dir / name
                if name.endswith(".json") and not self._live(self._read(path)):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        if removed:
            self._sync_dir()
        return removed

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def record_refusals(self, record: dict[str, Any], state: str) -> list[str]:
        """List the recipients a delivery outcome refused for good at RCPT; returns them.
        ``state`` is where the message went (passed, deferred or failed)."""
        refused = record.get("refused") or {}
        if state == "failed":
            result = record.get("result") or {}
            if result.get("phase") != "RCPT":
                return []  # refused at DATA (content) or MAIL: nothing about the addresses
            refused = result.get("refused") or refused
        added = []
        for address, reply in refused.items():
            if not (isinstance(reply, list | tuple) and len(reply) == 2):
                continue
            code, text = reply
            if refused_for_good(code, text):
                try:
                    if self.get(address) is None:
                        self.add(address, reason="refused at RCPT", code=code, reply=text,
                                 source="rcpt")
                        added.append(address)
                except MessageError:
                    continue
        return added


def apply(record: dict[str, Any], listed: list[str], now: float) -> None:
    """Take the ``listed`` recipients off a new record (they are kept in its
    ``suppressed``). If none is left, the record is final at once: ``failed`` with
    ``result.reason = "suppressed"``, never sent."""
    record["suppressed"] = list(listed)
    rest = [r for r in record["recipients"] if r not in listed]
    if rest:
        record["recipients"] = rest
        return
    record.update(state="failed", finished_at=now, next_attempt_at=None, result={
        "code": None, "message": "every recipient is on the suppression list",
        "reason": "suppressed", "phase": None, "refused": {}, "suppressed": list(listed)})
