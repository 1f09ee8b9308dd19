"""Senders: coroutines that claim one message at a time and see it to its next state.

A claim is a rename from ``queued/`` (or a due ``deferred/``) into ``active/``, tracked in
memory and journaled. Once the server accepts a message, ``accepted`` is made durable in
the journal before anything else, so a crash from then on finishes it as passed instead
of sending it again. One bad message never stops a sender: every outcome, including an
unexpected error, ends in a state folder.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiofiles.os

from .errors import DeliveryError, SpoolError
from .journal import Journal
from .retry import RetryPolicy
from .spool import CorruptRecord, Spool
from .transports import SendResult, Transport

__all__ = ("Dispatcher", "WorkItem", "WorkloadSummary")

logger = logging.getLogger("ess_async.sender")


@dataclass(order=True, frozen=True)
class WorkItem:
    """A message waiting in the in-memory queue; lower ``priority`` is claimed first."""

    priority: int
    msg_id: str
    source: str = field(compare=False, default="queued")  # "queued" or "deferred"


@dataclass
class WorkloadSummary:
    """Outcomes counted by one run of the senders."""

    passed: int = 0
    failed: int = 0
    deferred: int = 0
    corrupt: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.deferred + self.corrupt


class Dispatcher:
    """State shared by the senders of one run: the spool, the journal, the claims."""

    def __init__(self, spool: Spool, journal: Journal, policy: RetryPolicy, *,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 on_deferred: Callable[[str, float], None] | None = None,
                 on_finished: Callable[[str, str], None] | None = None) -> None:
        self.spool = spool
        self.journal = journal
        self.policy = policy
        self.clock = clock
        self.rand = rand
        self.on_deferred = on_deferred
        self.on_finished = on_finished
        # Claimed message ids -> their durable "accepted" journal entry once there is one.
        self.claimed: dict[str, dict[str, Any] | None] = {}
        self.finishing: set[asyncio.Task[str]] = set()
        self.summary = WorkloadSummary()
        self._read = aiofiles.os.wrap(spool.read)
        self._finish = aiofiles.os.wrap(spool.finish)
        self._quarantine = aiofiles.os.wrap(spool.quarantine)

    # -- one message -----------------------------------------------------------------

    async def deliver(self, item: WorkItem, transport: Transport) -> str | None:
        """Claim ``item`` and deliver it; returns the state it ended in, or None if it was
        no longer there to claim (another event already handled it)."""
        msg_id = item.msg_id
        if msg_id in self.claimed or not self.spool.rename(msg_id, item.source, "active"):
            return None
        self.claimed[msg_id] = None
        self.journal.append({"op": "claim", "id": msg_id, "at": self.clock()})
        path = self.spool.path("active", msg_id)
        try:
            try:
                record = await self._read(path)
                if record["id"] != msg_id:
                    raise CorruptRecord("record id does not match its file name")
            except CorruptRecord as exc:
                await self._quarantine(path, exc.reason)
                logger.warning("message %s quarantined: %s", msg_id, exc.reason)
                return self._done(msg_id, "corrupt")
            return await self._attempt(record, transport)
        finally:
            if self.claimed.get(msg_id) is None:  # an accepted one is released by _accepted
                self.claimed.pop(msg_id, None)

    async def _attempt(self, record: dict[str, Any], transport: Transport) -> str:
        msg_id = record["id"]
        record["attempts"] = record.get("attempts", 0) + 1
        record["last_attempt_at"] = self.clock()
        try:
            result = await transport.send(record["mail_from"], record["recipients"],
                                          record["raw"].encode("ascii"))
        except DeliveryError as exc:
            return await self._failed_attempt(record, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a transport bug must not lose the message or the sender
            logger.exception("message %s: unexpected error from transport", msg_id)
            return await self._failed_attempt(record, DeliveryError(f"internal error: {exc!r}"))
        # From here on the message is delivered: finish even if the run is being cancelled.
        task = asyncio.ensure_future(self._accepted(record, result))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        return await asyncio.shield(task)

    async def _accepted(self, record: dict[str, Any], result: SendResult) -> str:
        msg_id = record["id"]
        now = self.clock()
        entry = {"op": "accepted", "id": msg_id, "at": now, "code": result.code,
                 "reply": result.message, "refused": result.refused}
        await self.journal.append_durable(entry)
        self.claimed[msg_id] = entry
        try:
            await self._finish("passed", passed_record(record, entry))
        finally:
            self.claimed.pop(msg_id, None)
        logger.info("message %s passed: %d recipients, %s %s", msg_id,
                    len(record["recipients"]), result.code, result.message)
        return self._done(msg_id, "passed")

    async def _failed_attempt(self, record: dict[str, Any], exc: DeliveryError) -> str:
        msg_id = record["id"]
        now = self.clock()
        record["last_error"] = {"code": exc.code, "message": exc.message, "at": now}
        due = None
        if exc.temporary:
            due = self.policy.next_attempt(created_at=record["created_at"],
                                           attempts=record["attempts"], now=now,
                                           rand=self.rand())
        if due is not None:
            record["state"] = "deferred"
            record["next_attempt_at"] = due
            await self._finish("deferred", record)
            logger.info("message %s deferred until %.0f (attempt %d): %s", msg_id, due,
                        record["attempts"], exc)
            if self.on_deferred:
                self.on_deferred(msg_id, due)
            return self._done(msg_id, "deferred")
        record.update(state="failed", finished_at=now, next_attempt_at=None,
                      result={"code": exc.code, "message": exc.message,
                              "reason": "permanent" if not exc.temporary else "gave up"})
        await self._finish("failed", record)
        logger.warning("message %s failed after %d attempts: %s", msg_id,
                       record["attempts"], exc)
        return self._done(msg_id, "failed")

    def _done(self, msg_id: str, state: str) -> str:
        setattr(self.summary, state, getattr(self.summary, state) + 1)
        if self.on_finished:
            self.on_finished(msg_id, state)
        return state

    # -- recovery --------------------------------------------------------------------

    def recover(self, entries: dict[str, dict[str, Any]]) -> dict[str, int]:
        """Settle every message left in ``active/`` (after a crash or a cancelled run):
        accepted ones are finished as passed, the rest go back to ``queued/``."""
        counts = {"requeued": 0, "passed": 0, "corrupt": 0}
        for msg_id in self.spool.ids("active"):
            entry = entries.get(msg_id)
            path = self.spool.path("active", msg_id)
            if entry is None or entry.get("op") != "accepted":
                self.spool.rename(msg_id, "active", "queued")
                counts["requeued"] += 1
                continue
            try:
                record = self.spool.read(path)
            except CorruptRecord as exc:
                self.spool.quarantine(path, exc.reason)
                counts["corrupt"] += 1
                continue
            except SpoolError:
                raise
            record["attempts"] = record.get("attempts", 0) + 1
            self.spool.finish("passed", passed_record(record, entry))
            counts["passed"] += 1
        for stray in self.spool.strays("active"):
            self.spool.quarantine(stray, "unexpected file in active/")
            counts["corrupt"] += 1
        return counts


def passed_record(record: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The record kept in ``passed/``: the message plus what the server said."""
    return {**record, "state": "passed", "finished_at": entry["at"], "next_attempt_at": None,
            "result": {"code": entry["code"], "message": entry["reply"],
                       "refused": entry.get("refused") or {}}}
