"""Queue operations in the spirit of mailq / postsuper: list, show, retry, hold, release,
delete and purge the messages of a workspace.

Everything here is synchronous and safe while a server delivers the workspace in another
process. The server claims a message by renaming it into ``active/`` and skips a claim
whose rename fails, so:

* a message is taken out of a folder the server claims from (``queued/``, ``scheduled/``,
  ``deferred/``) only by a rename or an unlink, which either wins against the claim or
  fails with FileNotFoundError (then the message is looked up again: in ``active/`` it is
  busy, see MessageBusy);
* a record that needs changing is first renamed into ``held/`` (which the server never
  reads), rewritten there atomically (``Spool.write``) and only then renamed into its new
  folder. A crash halfway leaves the message held: never lost, never sent twice.

Operations that change a message serialize on an flock on ``<workspace>/ops.lock``, which
only queue operations take (never the server, never enqueueing).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import EssError, MessageNotFound
from .lock import exclusive_flock
from .outcome import message_id
from .spool import ID_PATTERN, STATES, CorruptRecord, Spool, fsync_dir

__all__ = (
    "MessageBusy",
    "MessageInfo",
    "MessageNotFound",
    "MessageStateError",
    "QueueOps",
    "check_purge",
    "parse_duration",
)

LOCK_NAME = "ops.lock"
PURGEABLE = ("passed", "failed", "corrupt")
RETRYABLE = ("deferred", "failed")
HOLDABLE = ("queued", "scheduled", "deferred")
_FINAL_SHARDED = ("passed", "failed")
_TRIES = 5  # look-ups of a message that keeps moving between two folders
_PRIORITY_NAMES = {"h": "high", "n": "normal", "l": "low"}
_NOTE_LIMIT = 64 * 1024


class MessageBusy(EssError, RuntimeError):
    """The message is being sent right now (it is in ``active/``); try again later."""

    def __init__(self, msg_id: str, state: str = "active", op: str = "") -> None:
        self.id = msg_id
        self.state = state
        self.op = op
        doing = f"cannot {op} message" if op else "message"
        why = ("it is active (being sent); try again when the attempt is over"
               if state == "active" else f"it is {state}; try again")
        super().__init__(f"{doing} {msg_id}: {why}")


class MessageStateError(EssError, ValueError):
    """The operation does not apply to a message in its current state (or the message's
    file is unreadable)."""

    def __init__(self, msg_id: str, state: str, op: str, problem: str) -> None:
        self.id = msg_id
        self.state = state
        self.op = op
        super().__init__(f"cannot {op} message {msg_id}: it is {state}; {problem}")


@dataclass(frozen=True)
class MessageInfo:
    """One line of ``QueueOps.list``."""

    id: str
    state: str
    age: float  # seconds since the message was created
    attempts: int = 0
    recipients: list[str] = field(default_factory=list)
    subject: str | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    priority: str = "normal"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``10m``, ``12h``, ``7d``, ``2w`` or a plain number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 10m, 12h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def check_purge(state: str, older_than: float | None, keep: int
                ) -> tuple[float | None, int]:
    """Validate ``purge``'s arguments (both stores); ValueError naming the bad one."""
    if state not in PURGEABLE:
        raise ValueError(f"can only purge {', '.join(PURGEABLE)}, not {state!r}")
    seconds = None if older_than is None else _number(older_than)
    if older_than is not None and (seconds is None or seconds < 0):
        raise ValueError(f"older_than must be a number of seconds >= 0, not {older_than!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be an integer >= 0, not {keep!r}")
    if keep and state == "corrupt":
        raise ValueError("keep applies to passed and failed messages, not corrupt")
    if older_than is None and not keep:
        raise ValueError("purge needs older_than, keep, or both")
    return seconds, keep


def _id_time(msg_id: str) -> float:
    return int(msg_id[:20]) / 1e9


def _remove(path: Path) -> None:
    """Remove a spool entry without following links (a folder only in quarantine)."""
    if stat.S_ISDIR(path.lstat().st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _error_text(error: object) -> str | None:
    if not error:
        return None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        text = f"{code} {message}" if code else str(message or "")
        return text or None
    return str(error)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


_Infos = list[MessageInfo]
_Ids = list[str]


class QueueOps:
    """mailq / postsuper for a workspace: ``QueueOps("ess_data").hold(msg_id)``.

    ``clock`` gives "now" for ages, ``release`` and ``purge``; ``max_size`` bounds record
    reads (default: ``[server] max_message_size`` from the workspace's config).
    Message ids may also be given as spool paths (what ``create_work`` returns).
    """

    def __init__(self, workspace: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time,
                 max_size: int | None = None) -> None:
        self.workspace = Path(workspace).absolute()
        if max_size is None:
            max_size = load_config(self.workspace / "config.toml").server.max_message_size
        self.spool = Spool(self.workspace, max_size=max_size)
        self.clock = clock

    # -- reading ---------------------------------------------------------------------

    def list(self, states: Iterable[str] | str | None = None,
             limit: int | None = None) -> _Infos:
        """Messages in ``states`` (default: all), oldest first, at most ``limit``."""
        wanted = self._states(states, STATES)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be 0 or more, not {limit}")
        entries = sorted(self._entries(wanted))
        if limit is not None:
            entries = entries[:limit]
        now = self.clock()
        infos = []
        for msg_id, state, path in entries:
            info = self._info(msg_id, state, path, now)
            if info is not None:
                infos.append(info)
        return infos

    def show(self, message: str | os.PathLike[str], *, raw: bool = False) -> dict[str, Any]:
        """The message's record, with its current ``state`` and ``path``; the message text
        is replaced by ``raw_size`` unless ``raw``. A quarantined file gives its reason."""
        msg_id = message_id(message)
        for _ in range(_TRIES):
            state, path = self._find(msg_id)
            if state == "corrupt":
                return self._corrupt_details(msg_id, path)
            try:
                record = self.spool.read(path)
            except FileNotFoundError:
                continue  # moved on meanwhile: look again
            except CorruptRecord as exc:
                return {"id": msg_id, "state": state, "path": str(path),
                        "unreadable": exc.reason}
            record["state"] = state
            record["path"] = str(path)
            if not raw:
                text = record.pop("raw", "")
                record["raw_size"] = (len(text.encode("utf-8", "surrogateescape"))
                                      if isinstance(text, str) else None)  # bytes
            return record
        raise MessageBusy(msg_id, "moving between folders", "show")

    # -- changing one message --------------------------------------------------------

    def retry(self, message: str | os.PathLike[str]) -> Path:
        """Send a deferred or failed message again now: it goes to ``queued/`` (attempts
        are kept; a failed one loses its result). Returns its new path."""
        msg_id = message_id(message)

        def update(record: dict[str, Any], src: str) -> None:
            record.update(state="queued", next_attempt_at=None)
            if src == "failed":
                record.pop("result", None)
                record.pop("finished_at", None)
                refused = record.get("refused")
                if isinstance(refused, dict):  # they are tried again: no longer refused
                    record["refused"] = {r: v for r, v in refused.items()
                                         if r not in record["recipients"]}

        return self._transition(msg_id, "retry", RETRYABLE, update,
                                "only deferred or failed messages can be retried")

    def retry_all(self, states: Iterable[str] | str = RETRYABLE) -> int:
        """Retry every message in ``states`` (deferred and/or failed); how many were."""
        wanted = self._states(states, RETRYABLE)
        count = 0
        for msg_id, _state, _path in sorted(self._entries(wanted)):
            try:
                self.retry(msg_id)
            except (MessageNotFound, MessageBusy, MessageStateError):
                continue  # sent, moved or unreadable meanwhile
            count += 1
        return count

    def hold(self, message: str | os.PathLike[str]) -> Path:
        """Park a queued, scheduled or deferred message in ``held/``, where it is never
        sent until released. Returns its new path."""
        msg_id = message_id(message)

        def update(record: dict[str, Any], src: str) -> None:
            record.update(state="held", held_from=src, held_at=self.clock())

        return self._transition(msg_id, "hold", HOLDABLE, update,
                                "only queued, scheduled or deferred messages can be held")

    def release(self, message: str | os.PathLike[str]) -> Path:
        """Put a held message back: into ``scheduled/`` if its ``send_at`` is still in the
        future, else into ``queued/`` (sent now). Returns its new path."""
        msg_id = message_id(message)

        def update(record: dict[str, Any], src: str) -> None:
            record.pop("held_from", None)
            record.pop("held_at", None)
            send_at = _number(record.get("send_at"))
            if send_at is not None and send_at > self.clock():
                record.update(state="scheduled", next_attempt_at=send_at)
            else:
                record.update(state="queued", next_attempt_at=None)

        return self._transition(msg_id, "release", ("held",), update,
                                "only held messages can be released")

    def delete(self, message: str | os.PathLike[str]) -> str:
        """Remove a message from the spool, whatever its state but ``active``, and its
        idempotency key; returns the state it was in."""
        msg_id = message_id(message)
        with self._locked(msg_id):
            for _ in range(_TRIES):
                state, path = self._find(msg_id)
                if state == "active":
                    raise MessageBusy(msg_id, state, "delete")
                try:
                    _remove(path)
                except FileNotFoundError:
                    continue  # claimed or moved meanwhile: look again
                if state == "corrupt":
                    with contextlib.suppress(FileNotFoundError):
                        path.with_name(f"{path.name}.reason").unlink()
                fsync_dir(path.parent)
                self.spool.keys.forget([msg_id])  # its idempotency key is free again
                return state
        raise MessageBusy(msg_id, "moving between folders", "delete")

    # -- many messages ---------------------------------------------------------------

    def purge(self, state: str, older_than: float | None = None, *, keep: int = 0) -> int:
        """Delete passed, failed or corrupt messages finished (quarantined) more than
        ``older_than`` seconds ago and, with ``keep``, all but the newest ``keep`` passed
        or failed ones; their idempotency keys go with them. Returns how many. This is
        also the ``[server] keep_*`` retention (``Manager.prune``)."""
        older_than, keep = check_purge(state, older_than, keep)
        cutoff = None if older_than is None else self.clock() - older_than
        gone: _Ids = []
        try:
            if state == "corrupt":
                assert cutoff is not None
                return self._purge_corrupt(cutoff, gone)
            return self._purge_finished(state, cutoff, keep, gone)
        finally:
            self.spool.keys.forget(gone)

    def _purge_finished(self, state: str, cutoff: float | None, keep: int,
                        gone: _Ids) -> int:
        """Newest first (by shard, the day a message finished, then id): remove what
        finished before ``cutoff`` and, with ``keep``, all but the newest ``keep`` of
        the rest. A shard wholly before the cutoff needs no reads; one wholly after it
        is skipped unless ``keep`` counts it."""
        removed = kept = 0
        since = -math.inf if cutoff is None else cutoff
        top = self.spool.dir(state)
        for shard in sorted(_names(top), reverse=True):
            folder = top / shard
            try:
                day: float | None = datetime.strptime(shard, "%Y-%m-%d").replace(
                    tzinfo=UTC).timestamp()
            except ValueError:
                day = None
            # young: everything in it finished after the cutoff (or there is none)
            young = cutoff is None or (day is not None and day >= cutoff)
            if young and not keep:
                continue
            whole = cutoff is not None and day is not None and day + 86400 <= cutoff
            count = 0
            for name in sorted(_names(folder), reverse=True):
                if not (name.endswith(".json") and ID_PATTERN.match(name[:-5])):
                    continue
                path = folder / name
                try:
                    if not (keep and kept >= keep) and not whole and (
                            young or self._finished_at(path) >= since):
                        kept += 1
                        continue
                    _remove(path)
                except FileNotFoundError:
                    continue  # retried or deleted meanwhile
                gone.append(name[:-5])
                count += 1
            if count:
                fsync_dir(folder)
                removed += count
        return removed

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _states(states: Iterable[str] | str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
        if states is None:
            return allowed
        wanted = (states,) if isinstance(states, str) else tuple(states)
        for state in wanted:
            if state not in allowed:
                raise ValueError(f"unknown state {state!r} (one of {', '.join(allowed)})")
        return wanted

    def _entries(self, states: Iterable[str]) -> Iterator[tuple[str, str, Path]]:
        """(id, state, path) of every message file in ``states``; unsorted."""
        for state in dict.fromkeys(states):
            if state in _FINAL_SHARDED:
                for path in self.spool.walk_final(state):
                    if ID_PATTERN.match(path.stem):
                        yield path.stem, state, path
            else:
                for msg_id in self.spool.ids(state):
                    yield msg_id, state, self.spool.path(state, msg_id)

    def _find(self, msg_id: str) -> tuple[str, Path]:
        # A message moving between two folders can be missed by one scan: look again.
        for _ in range(_TRIES):
            found = self.spool.find(msg_id)
            if found is not None:
                return found
        raise MessageNotFound(msg_id)

    def _info(self, msg_id: str, state: str, path: Path, now: float) -> MessageInfo | None:
        priority = _PRIORITY_NAMES.get(msg_id[21:22], "normal")
        if state == "corrupt":
            note = self._note(path)
            return MessageInfo(msg_id, state, now - _id_time(msg_id), priority=priority,
                               last_error=str(note.get("reason") or "quarantined"))
        for _ in range(_TRIES):
            try:
                record = self.spool.read(path)
                break
            except FileNotFoundError:
                found = self.spool.find(msg_id)  # moved on since the folder was listed
                if found is None:
                    return None
                state, path = found
                if state == "corrupt":
                    return self._info(msg_id, state, path, now)
            except CorruptRecord as exc:
                return MessageInfo(msg_id, state, now - _id_time(msg_id), priority=priority,
                                   last_error=f"unreadable: {exc.reason}")
        else:
            return None
        created = _number(record.get("created_at"))
        subject = record.get("subject")
        return MessageInfo(
            id=msg_id, state=state,
            age=now - (created if created is not None else _id_time(msg_id)),
            attempts=record["attempts"], recipients=list(record["recipients"]),
            subject=subject if isinstance(subject, str) else None,
            last_error=_error_text(record.get("last_error")),
            next_attempt_at=_number(record.get("next_attempt_at")),
            priority=str(record.get("priority") or priority))

    def _note(self, path: Path) -> dict[str, Any]:
        """The ``.reason`` note of a quarantined file (empty if none or unreadable)."""
        note_path = path.with_name(f"{path.name}.reason")
        try:
            fd = os.open(note_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return {}
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            data = os.read(fd, _NOTE_LIMIT)
        finally:
            os.close(fd)
        try:
            note = json.loads(data)
        except ValueError:
            return {}
        return note if isinstance(note, dict) else {}

    def _corrupt_details(self, msg_id: str, path: Path) -> dict[str, Any]:
        note = self._note(path)
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise MessageNotFound(msg_id) from None
        kind = ("file" if stat.S_ISREG(info.st_mode) else "symlink"
                if stat.S_ISLNK(info.st_mode) else "folder" if stat.S_ISDIR(info.st_mode)
                else "other")
        return {"id": msg_id, "state": "corrupt", "path": str(path), "kind": kind,
                "size": info.st_size, "reason": note.get("reason"),
                "original_name": note.get("file"), "quarantined_at": note.get("at")}

    def _finished_at(self, path: Path) -> float:
        try:
            when = _number(self.spool.read(path).get("finished_at"))
        except CorruptRecord:
            when = None
        return when if when is not None else path.lstat().st_mtime

    def _purge_corrupt(self, cutoff: float, gone: _Ids) -> int:
        folder = self.spool.dir("corrupt")
        removed = 0
        names = _names(folder)
        for name in names:
            if name.endswith(".reason") or name.startswith("."):
                continue
            path = folder / name
            try:
                when = _number(self._note(path).get("at"))
                if when is None:
                    when = path.lstat().st_mtime
                if when >= cutoff:
                    continue
                _remove(path)
            except FileNotFoundError:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.with_name(f"{name}.reason").unlink()
            if name.endswith(".json") and ID_PATTERN.match(name[:-5]):
                gone.append(name[:-5])
            removed += 1
        for name in names:  # notes whose file is gone
            if name.endswith(".reason") and name[:-7] not in names:
                note = folder / name
                with contextlib.suppress(FileNotFoundError):
                    if note.lstat().st_mtime < cutoff:
                        note.unlink()
        if removed:
            fsync_dir(folder)
        return removed

    @contextlib.contextmanager
    def _locked(self, msg_id: str) -> Iterator[None]:
        """Serialize changes with other queue operations (never with the server)."""
        if not self.workspace.is_dir():
            raise MessageNotFound(msg_id)
        self.spool.ensure()  # held/ and tmp/ exist in older workspaces too
        with exclusive_flock(self.workspace / LOCK_NAME):
            yield

    def _transition(self, msg_id: str, op: str, allowed: tuple[str, ...],
                    update: Callable[[dict[str, Any], str], None], problem: str) -> Path:
        """Move a message from one of ``allowed`` to the state ``update`` sets on its
        record, by way of ``held/`` (see the module docstring)."""
        staged = self.spool.path("held", msg_id)
        with self._locked(msg_id):
            for _ in range(_TRIES):
                state, path = self._find(msg_id)
                if state == "active":
                    raise MessageBusy(msg_id, state, op)
                if state not in allowed:
                    raise MessageStateError(msg_id, state, op, problem)
                try:
                    self.spool.read(path)  # refuse links and damaged files before moving
                    if path != staged:
                        os.rename(path, staged)
                except FileNotFoundError:
                    continue  # claimed or moved meanwhile: look again
                except CorruptRecord as exc:
                    raise MessageStateError(msg_id, state, op,
                                            f"its file is unreadable: {exc.reason}") from None
                return self._finish_transition(msg_id, op, state, path, staged, update)
        raise MessageBusy(msg_id, "moving between folders", op)

    def _finish_transition(self, msg_id: str, op: str, src: str, origin: Path, staged: Path,
                           update: Callable[[dict[str, Any], str], None]) -> Path:
        try:
            record = self.spool.read(staged)  # the file as it is now that it is ours
        except CorruptRecord as exc:
            self.spool.quarantine(staged, exc.reason)
            raise MessageStateError(msg_id, src, op,
                                    f"its file was unreadable and is now in corrupt/: "
                                    f"{exc.reason}") from None
        try:
            update(record, src)
            dst = str(record["state"])
            self.spool.write("held", record)
            if dst != "held":
                target = self.spool.path(dst, msg_id)
                os.rename(staged, target)
                fsync_dir(target.parent)
        except BaseException:
            if origin != staged:  # best effort: put it back where it was
                with contextlib.suppress(OSError):
                    os.rename(staged, origin)
            raise
        if origin != staged:
            with contextlib.suppress(OSError):
                fsync_dir(origin.parent)
        return self.spool.path(dst, msg_id)
