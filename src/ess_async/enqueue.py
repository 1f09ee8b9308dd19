"""Enqueueing, shared by ``Manager.create_work`` and the synchronous ``Client``.

Options beside the message itself: ``priority`` (high | normal | low), ``send_at`` (not
sent before then) and ``idempotency_key`` (a second enqueue with the same key returns the
first message's path while that message is still in the spool, across processes).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .batching import Batcher
from .errors import MessageError, SpoolError
from .expiry import parse_expiry
from .faults import crash_point
from .imported import import_message
from .message import build_message
from .spool import PRIORITY_LETTERS, Spool, new_record
from .suppression import apply as apply_suppression

__all__ = ("Enqueuer", "GroupCommit", "Prepared", "prepare")


@dataclass(frozen=True)
class Prepared:
    """A validated record and where it goes; nothing is written yet."""

    record: dict[str, Any]
    key_hash: str | None

    @property
    def state(self) -> str:
        return str(self.record["state"])


def _send_at(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()  # a naive datetime is local time, as datetime says
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MessageError("send_at", "must be a datetime or a POSIX timestamp")
    try:
        when = float(value)
    except OverflowError:  # an int beyond any float, e.g. 10**400
        when = math.inf
    if not math.isfinite(when):
        raise MessageError("send_at", f"must be a finite timestamp, not {str(value)[:40]}")
    return when


def prepare(attrs: Mapping[str, Any], defaults: Mapping[str, Any], *, now: float,
            priority: str = "normal", send_at: object = None,
            idempotency_key: str | None = None, expires_at: object = None,
            expires_in: object = None,
            suppressed: Callable[[list[str]], list[str]] | None = None,
            force: bool = False, transport: str | None = None,
            relays: Collection[str] = ()) -> Prepared:
    """Validate everything; raise MessageError naming the field; write nothing.

    ``expires_at`` (a datetime or timestamp) / ``expires_in`` (seconds): never sent after
    then (``expiry``). ``suppressed`` returns the recipients on the suppression list:
    they are taken off the envelope, and a message left with none is recorded as failed
    with reason "suppressed" (``suppression.apply``); ``force=True`` skips the check.

    ``attrs`` may hold ``message``: a message already built (an ``EmailMessage`` /
    ``Message`` or raw bytes), with only the envelope beside it (see ``imported``)."""
    if priority not in PRIORITY_LETTERS:
        raise MessageError("priority", f"must be high, normal or low, not {priority!r}")
    if transport is not None and transport not in relays:
        raise MessageError("transport", f"no relay {transport!r}: name one of "
                           f"{sorted(relays)} ([transport.smtp.NAME] in the config)"
                           if relays else "the config names no relays ([transport.smtp.NAME])")
    when = _send_at(send_at)
    key_hash = None
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str) or not idempotency_key:
            raise MessageError("idempotency_key", "must be a non-empty string")
        key_hash = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()
    if attrs.get("message") is not None:
        envelope = {k: v for k, v in attrs.items() if k != "message"}
        spec = import_message(attrs["message"], envelope, defaults, now=now)
    else:
        spec = build_message({k: v for k, v in attrs.items() if k != "message"}, defaults)
    expires = parse_expiry(expires_at, expires_in, now=now, send_at=when)
    record = new_record(spec, now, priority=priority, send_at=when)
    if expires is not None:
        record["expires_at"] = expires
    if suppressed is not None and not force:
        listed = suppressed(record["recipients"])
        if listed:
            apply_suppression(record, listed, now)
    if key_hash:
        record["idempotency_key_sha256"] = key_hash
    if transport is not None:
        record["transport"] = transport
    return Prepared(record, key_hash)


class Enqueuer:
    """Writes prepared records. An idempotent one is written under ``keys/.lock`` (an flock
    that only enqueuers take, and retention briefly): its key file first, pointing at the
    new id, then the message. A key whose id is not in the spool is free, so a crash
    between the two writes leaves a free key and a retry makes exactly one message."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def commit(self, prepared: Prepared) -> Path:
        if prepared.key_hash is None:
            return self.spool.write(prepared.state, prepared.record)
        keys = self.spool.keys
        with keys.locked():
            existing = keys.lookup(prepared.key_hash)
            if existing is not None:
                return existing
            keys.bind(prepared.key_hash, prepared.record["id"])
            crash_point("between_key_and_message")
            return self.spool.write(prepared.state, prepared.record)


class GroupCommit:
    """Async enqueue with group commit: concurrent ``create_work`` calls are written by one
    thread job with one sync for all of them, and each returns once its file is durable.
    Idempotent enqueues take the keyed path one at a time."""

    def __init__(self, enqueuer: Enqueuer) -> None:
        self.enqueuer = enqueuer
        self._batcher: Batcher[Prepared, Path] = Batcher(self._write)

    async def commit(self, prepared: Prepared) -> Path:
        if prepared.key_hash is not None:
            return await asyncio.to_thread(self.enqueuer.commit, prepared)
        return await self._batcher.submit(prepared)

    async def _write(self, batch: list[Prepared]) -> list[Path | SpoolError]:
        return await asyncio.to_thread(self.enqueuer.spool.write_many,
                                       [(p.state, p.record) for p in batch])
