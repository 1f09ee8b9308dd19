"""The file store's senders: claims are renames into ``active/``, journaled.

A claim is a rename from ``queued/`` (or a due ``deferred/``) into ``active/``, tracked in
memory and journaled. Once the server accepts a message, ``accepted`` is made durable in
the journal before anything else, so a crash from then on finishes it as passed instead
of sending it again. One bad message never stops a sender: every outcome, including an
unexpected error, ends in a state folder. The delivery policy itself is ``Delivery``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import aiofiles.os

from .delivery import Delivery, WorkItem, WorkloadSummary
from .errors import SpoolError
from .expiry import is_expired
from .faults import crash_point
from .journal import Journal
from .retry import RetryPolicy
from .spool import CorruptRecord, Spool, encode_record
from .throttle import Throttle
from .transports import Transport

__all__ = ("Dispatcher", "WorkItem", "WorkloadSummary")

logger = logging.getLogger("ess_async.sender")

_INLINE_BYTES = 256 * 1024  # smaller spool files are read and written on the loop itself


class Dispatcher(Delivery):
    """The senders' state in the file store: the spool, the journal, the claims."""

    def __init__(self, spool: Spool, journal: Journal, policy: RetryPolicy, *,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 throttle: Throttle | None = None,
                 delivery_log: TextIO | None = None,
                 on_deferred: Callable[[str, float], None] | None = None,
                 on_finished: Callable[[str, str], None] | None = None) -> None:
        super().__init__(policy, clock=clock, rand=rand, throttle=throttle,
                         delivery_log=delivery_log, on_deferred=on_deferred,
                         on_finished=on_finished)
        self.spool = spool
        self.journal = journal
        self.last_settled: tuple[str, dict[str, Any]] | None = None  # by settle_claim
        self._read = aiofiles.os.wrap(spool.read)
        self._quarantine = aiofiles.os.wrap(spool.quarantine)
        self._staged: list[tuple[Path, bytes, asyncio.Future[None]]] = []
        self._committer: asyncio.Future[None] | None = None

    # -- one message -----------------------------------------------------------------

    async def deliver(self, item: WorkItem, transport: Transport) -> str | None:
        """Claim ``item`` and deliver it; returns the state it ended in, or None if it was
        no longer there to claim (another event already handled it)."""
        msg_id = item.msg_id
        if msg_id in self.claimed:
            return None
        # An operator may have moved it to queued/ (retry, release) since it was offered.
        sources = (item.source,) if item.source == "queued" else (item.source, "queued")
        if not any(self.spool.rename(msg_id, source, "active") for source in sources):
            return None
        self.claimed[msg_id] = None
        try:
            try:
                self.journal.append({"op": "claim", "id": msg_id, "at": self.clock()})
            except OSError as exc:
                # Undo the claim rather than send while the journal cannot be written.
                self.spool.rename(msg_id, "active", "queued")
                raise SpoolError(exc.errno, f"cannot journal a claim: {exc}") from None
            crash_point("after_claim")
            path = self.spool.path("active", msg_id)
            try:
                record = self.spool.read_small(path, _INLINE_BYTES)  # on the loop: cheaper
                if record is None:
                    record = await self._read(path)
                if record["id"] != msg_id:
                    raise CorruptRecord("record id does not match its file name")
            except CorruptRecord as exc:
                await self._quarantine(path, exc.reason)
                return self._done({"id": msg_id, "last_error": {"message": exc.reason}},
                                  "corrupt")
            if "expires_at" in record and is_expired(record, self.clock()):
                return await self._finish(self._expired(record))  # never sent
            return await self._attempt(record, transport)
        finally:
            if self.claimed.get(msg_id) is None:  # an accepted one is released by _accepted
                self.claimed.pop(msg_id, None)
                self.journal.settle(msg_id)

    async def _persist_accepted(self, entry: dict[str, Any]) -> None:
        await self.journal.append_durable(entry)

    def _release(self, msg_id: str) -> None:
        self.journal.settle(msg_id)

    async def _settle(self, state: str, record: dict[str, Any]) -> None:
        """Move a claimed message to its next state durably. The record is encoded here;
        its file operations (create, write, rename, the sync, removing the active/ copy)
        run in one thread job shared by concurrent senders, with one filesystem sync (a
        group commit), off the event loop."""
        target = self.spool.target(state, record)
        if len(record["raw"]) > _INLINE_BYTES:
            data = await asyncio.to_thread(encode_record, record)
        else:
            data = encode_record(record)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._staged.append((target, data, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_staged())
        await asyncio.shield(future)

    async def _commit_staged(self) -> None:
        while self._staged:
            batch, self._staged = self._staged, []
            try:
                errors = await asyncio.to_thread(
                    self.spool.commit, [(target, data) for target, data, _ in batch])
            except OSError as exc:
                for _, _, future in batch:
                    future.set_exception(SpoolError(exc.errno, f"cannot commit: {exc}"))
            else:
                for (_, _, future), error in zip(batch, errors, strict=True):
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)

    def settle_claim(self, msg_id: str, entry: dict[str, Any] | None) -> str:
        """Settle one message left in ``active/``; ``entry`` is its last journal entry.
        Returns requeued, passed (or its next state), settled (its next state was already
        written), corrupt, or unsettled (accepted, but the disk refused its record)."""
        path = self.spool.path("active", msg_id)
        try:
            record = None
            if entry is not None and entry.get("op") == "accepted":
                try:
                    record = self.spool.read(path)
                except CorruptRecord as exc:
                    self.spool.quarantine(path, exc.reason)
                    self._forget(msg_id)
                    return "corrupt"
                fence = entry.get("attempt")
                if fence is not None and fence != record.get("attempts", 0) + 1:
                    record = None  # the acceptance of an earlier attempt: not this claim's
            if record is None:
                # A crash between writing the next state and removing active/ leaves two
                # copies: the next one wins if it was made durable (it reads back
                # whole); if not, it is dropped and the claim is undone.
                if self._next_copy_is_whole(msg_id):
                    path.unlink()
                    self._forget(msg_id)
                    return "settled"
                self.spool.rename(msg_id, "active", "queued")
                self._forget(msg_id)
                return "requeued"
            assert entry is not None
            record["attempts"] = record.get("attempts", 0) + 1
            state, settled = self.settle_accepted(record, entry)
            self.spool.finish(state, settled)
            self._forget(msg_id)
            self.last_settled = (state, settled)
            return "passed"
        except OSError as exc:  # SpoolError included
            logger.error("cannot settle message %s now: %s", msg_id, exc)
            if entry is not None and entry.get("op") == "accepted":
                self.unsettled[msg_id] = entry
                self.claimed[msg_id] = entry
            return "unsettled"

    def _forget(self, msg_id: str) -> None:
        """``msg_id`` has reached a durable next state: drop what this run kept of it."""
        self.unsettled.pop(msg_id, None)
        if self.claimed.get(msg_id) is not None:
            del self.claimed[msg_id]
        self.journal.settle(msg_id)

    def retry_unsettled(self) -> dict[str, int]:
        """Try again to record messages the server accepted while the disk refused their
        records (they are never sent again); returns what became of them."""
        counts: dict[str, int] = {}
        for msg_id, entry in list(self.unsettled.items()):
            if msg_id not in self.unsettled:
                continue
            outcome = self.settle_claim(msg_id, entry)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "passed" and self.last_settled is not None:
                state, record = self.last_settled
                logger.info("message %s: accepted earlier, its record is written now", msg_id)
                if state == "deferred" and self.on_deferred:
                    self.on_deferred(msg_id, record["next_attempt_at"])
                self._done(record, state)
            elif outcome != "unsettled":
                logger.warning("message %s: accepted earlier, settled as %s", msg_id, outcome)
        return counts

    def _next_copy_is_whole(self, msg_id: str) -> bool:
        found = self.spool.find(msg_id, ("deferred", "failed", "passed"))
        if found is None:
            return False
        try:
            return bool(self.spool.read(found[1])["id"] == msg_id)
        except (CorruptRecord, FileNotFoundError):
            found[1].unlink(missing_ok=True)
            return False

    async def drain(self) -> None:
        """Wait for records still being written (accepted messages, the group commit)."""
        await super().drain()
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)

    # -- recovery --------------------------------------------------------------------

    def recover(self, entries: dict[str, dict[str, Any]]) -> dict[str, int]:
        """Settle every message left in ``active/`` (after a crash or a cancelled run):
        accepted ones are finished as passed, the rest go back to ``queued/``.

        ``entries`` is the last journal entry of each message. An accepted message that
        cannot be finished now (a full disk, say) stays in ``active/`` and in
        ``unsettled``: it is never resent. Afterwards the journal's live entries are
        exactly the unsettled ones.
        """
        counts = {"requeued": 0, "passed": 0, "corrupt": 0, "unsettled": 0}
        for msg_id in self.spool.ids("active"):
            if msg_id in self.claimed and msg_id not in self.unsettled:
                continue  # being delivered right now
            outcome = self.settle_claim(msg_id, entries.get(msg_id))
            counts[outcome] = counts.get(outcome, 0) + 1
        for stray in self.spool.strays("active"):
            self.spool.quarantine(stray, "unexpected file in active/")
            counts["corrupt"] += 1
        for msg_id in list(self.journal.live):
            if msg_id not in self.claimed:
                self.journal.settle(msg_id)
        return counts
