"""The file store's senders: claims are renames into ``active/``, journaled.

A claim is a rename from ``queued/`` (or a due ``deferred/``) into ``active/``, tracked in
memory and journaled. Once the server accepts a message, ``accepted`` is made durable in
the journal before anything else, so a crash from then on finishes it as passed instead
of sending it again. One bad message never stops a sender: every outcome, including an
unexpected error, ends in a state folder. The delivery policy itself is ``Delivery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TextIO

import aiofiles.os

from .batching import Batcher
from .delivery import Delivery, WorkItem, WorkloadSummary
from .errors import SpoolError
from .expiry import is_expired
from .faults import crash_point
from .journal import Journal
from .retry import RetryPolicy
from .spool import (
    SETTLE_STATES,
    UPDATE_MARK,
    CorruptRecord,
    Spool,
    cut_back,
    decode_record,
    fsync_dir,
)
from .throttle import Throttle
from .transports import SendResult, Transport

__all__ = ("Dispatcher", "WorkItem", "WorkloadSummary")

_INLINE_BYTES = 256 * 1024  # smaller spool files are read on the loop itself

logger = logging.getLogger("ess_async.sender")

# A claim's outcome: the record, the CorruptRecord or OSError its file gave, or None (not
# there to claim).
_Claim = dict[str, Any] | CorruptRecord | OSError | None


def _reads(data: bytes) -> bool:
    try:
        decode_record(data)
    except CorruptRecord:
        return False
    return True


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
        self._quarantine = aiofiles.os.wrap(spool.quarantine)
        self._commits: Batcher[tuple[str, dict[str, Any], bytes | None], None] = \
            Batcher(self._commit)
        self._claims: list[tuple[WorkItem, asyncio.Future[_Claim]]] = []
        self.claiming: set[str] = set()  # ids whose claim (rename) is in flight
        self.sizes: dict[str, int] = {}  # claimed id -> its file's size when claimed
        self.bases: dict[str, bytes] = {}  # claimed id -> its file's bytes (small ones)
        self._claimer: asyncio.Future[None] | None = None

    # -- one message -----------------------------------------------------------------

    async def deliver(self, item: WorkItem, transport: Transport) -> str | None:
        """Claim ``item`` and deliver it; returns the state it ended in, or None if it was
        no longer there to claim (another event already handled it)."""
        msg_id = item.msg_id
        if msg_id in self.claimed:
            return None
        claim = await self._claim(item)  # claimed from here on (the rename decides)
        if claim is None:
            return None
        try:
            if isinstance(claim, OSError):
                raise claim
            crash_point("after_claim")
            if isinstance(claim, CorruptRecord):
                await self._quarantine(self.spool.path("active", msg_id), claim.reason)
                return self._done({"id": msg_id, "last_error": {"message": claim.reason}},
                                  "corrupt")
            if "expires_at" in claim and is_expired(claim, self.clock()):
                return await self._finish(self._expired(claim))  # never sent
            return await self._attempt(claim, transport)
        finally:
            if self.claimed.get(msg_id) is None:  # an accepted one is released by _accepted
                self.claimed.pop(msg_id, None)
                self._drop(msg_id)
                self.journal.settle(msg_id)

    async def _claim(self, item: WorkItem) -> _Claim:
        """Claim ``item``: rename it into ``active/``, journal the claim, read its record.
        Concurrent senders' claims share one thread job (the renames and reads stay off
        the event loop) and one journal write. Returns None if the message was no longer
        there to claim; else it is in ``claimed`` and this is its record, the
        CorruptRecord its file is, or the OSError met. Raises SpoolError when the journal
        refused the claim (then undone)."""
        future: asyncio.Future[_Claim] = asyncio.get_running_loop().create_future()
        self._claims.append((item, future))
        if self._claimer is None or self._claimer.done():
            self._claimer = asyncio.ensure_future(self._claim_staged())
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None \
                    and future.result() is not None:  # claimed, then its sender stopped
                self.claimed.pop(item.msg_id, None)
                self._unclaim(item.msg_id)
            raise

    async def _claim_staged(self) -> None:
        # Batcher-shaped, but not a ``batching.Batcher``: between the renames and the
        # journal write it must see which senders still wait (a stopped one's claim is
        # undone, never journaled) and, before the renames, which ids may be claimed.
        while self._claims:
            batch, self._claims = self._claims, []
            # Decided on the loop, as a claim always was: an id another sender holds
            # (its next state may be being written: its file could reappear in queued/
            # before its active/ copy is removed) is not claimed again. The ids in
            # flight are in ``claiming`` until their renames are known, so that
            # nothing (``recover``, ``Manager._resume``) takes an active/ file of theirs
            # for an abandoned one meanwhile.
            ready = []
            for item, future in batch:
                if future.cancelled():
                    continue
                if item.msg_id in self.claimed:
                    future.set_result(None)
                else:
                    ready.append((item, future))
            if not ready:
                continue
            ids = {item.msg_id for item, _ in ready}
            self.claiming |= ids
            # An operator may have moved one to queued/ (retry, release) since it was
            # offered from deferred/. The same id may be staged twice (offered again
            # from another folder): the first rename that finds it claims it.
            jobs: list[tuple[str, tuple[str, ...]]] = [
                (item.msg_id, (item.source,) if item.source == "queued"
                 else (item.source, "queued")) for item, _ in ready]
            try:
                results = await asyncio.to_thread(self.spool.claim_many, jobs)
            except BaseException as exc:  # not expected: claim_many reports per message
                # What the thread renamed is in active/ unclaimed: recovery requeues it.
                self.claiming -= ids
                error = SpoolError(5, f"cannot claim: {exc!r}")
                stranded = ready + (self._claims if isinstance(exc, asyncio.CancelledError)
                                    else [])
                for _, future in stranded:
                    if not future.done():
                        future.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    self._claims = []
                    raise
                logger.exception("claiming %d message(s) failed", len(ready))
                continue
            self.claiming -= ids
            entries: list[dict[str, Any]] = []
            at = self.clock()
            outcomes: list[_Claim] = []
            for (item, future), result in zip(ready, results, strict=True):
                outcome = result[0] if isinstance(result, tuple) else result
                outcomes.append(outcome)
                if result is None:
                    continue
                if future.cancelled():  # its sender stopped meanwhile: undo the claim
                    self._unclaim(item.msg_id)
                    continue
                self.claimed[item.msg_id] = None
                entry: dict[str, Any] = {"op": "claim", "id": item.msg_id, "at": at}
                if isinstance(result, tuple):
                    # What was claimed: bytes beyond it are this claim's settle.
                    claimed = result[1]
                    entry["size"] = self.sizes[item.msg_id] = len(claimed)
                    if len(claimed) <= _INLINE_BYTES:  # its settle's diff base, kept
                        self.bases[item.msg_id] = claimed
                entries.append(entry)
            try:
                self.journal.append_many(entries)
            except OSError as exc:
                # Undo the claims rather than send while the journal cannot be written.
                for entry in entries:
                    self.claimed.pop(entry["id"], None)
                    self._unclaim(entry["id"])
                error = SpoolError(exc.errno, f"cannot journal a claim: {exc}")
                for (_, future), outcome in zip(ready, outcomes, strict=True):
                    if future.done():
                        continue
                    if outcome is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
                continue
            for (_, future), outcome in zip(ready, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)

    def _drop(self, msg_id: str) -> None:
        self.sizes.pop(msg_id, None)
        self.bases.pop(msg_id, None)

    def _unclaim(self, msg_id: str) -> None:
        self._drop(msg_id)
        self.journal.settle(msg_id)
        try:
            self.spool.rename(msg_id, "active", "queued")
        except OSError as exc:  # it stays in active/: the next recovery requeues it
            logger.error("cannot put message %s back in queued/: %s", msg_id, exc)

    async def _persist_accepted(self, entry: dict[str, Any]) -> None:
        await self.journal.append_durable(entry)

    async def _note_accepted(self, entry: dict[str, Any]) -> None:
        # Written now (a killed process leaves it in the page cache for replay), made
        # durable by the settle's sync: a syncfs covers the journal as well as the update
        # appended to the claimed file, which records the acceptance on its own (a lone
        # settle's fsync). Nothing moves before that sync; one disk flush fewer per
        # message. If the settle fails, ``_settle`` syncs the journal instead.
        self.journal.append(entry)

    def _release(self, msg_id: str) -> None:
        self.journal.settle(msg_id)

    async def _settle(self, state: str, record: dict[str, Any]) -> None:
        """Move a claimed message to its next state durably: ``Spool.settle_many``
        appends what changed to its file and renames it, in one thread job shared by
        concurrent senders, with one filesystem sync (a group commit), off the loop."""
        try:
            await self._commits.submit((state, record, self.bases.get(record["id"])))
        except OSError:
            if self.claimed.get(record["id"]) is not None:  # accepted: its entry, durably
                with contextlib.suppress(OSError):
                    await self.journal.sync()
            raise
        self._drop(record["id"])

    async def _commit(self, batch: list[tuple[str, dict[str, Any], bytes | None]]
                      ) -> list[OSError | None]:
        """A group commit (``Batcher``): per record the error that kept it out, or None."""
        try:
            return await asyncio.to_thread(
                self.spool.settle_many, [(record["id"], state, record, claimed)
                                         for state, record, claimed in batch])
        except Exception as exc:  # OSError, or a record's path that cannot be made
            errno = exc.errno if isinstance(exc, OSError) and exc.errno else 5
            raise SpoolError(errno, f"cannot commit: {exc}") from None

    def _accepted_entry(self, record: dict[str, Any], result: SendResult) -> dict[str, Any]:
        entry = super()._accepted_entry(record, result)
        size = self.sizes.get(record["id"])
        if size is not None:  # as in the claim's entry: recovery finds the settle by it
            entry["size"] = size
        return entry

    def settle_claim(self, msg_id: str, entry: dict[str, Any] | None) -> str:
        """Settle one message left in ``active/``; ``entry`` is its last journal entry.
        Returns requeued, passed (or its next state), settled (its next state was already
        written), corrupt, or unsettled (accepted, but the disk refused its record)."""
        path = self.spool.path("active", msg_id)
        self.last_settled = None
        try:
            # A claim journaled with its size tells its own update apart; with no entry
            # at all, the record's state decides. (An entry from before sizes were
            # journaled: as it always was.)
            size = entry.get("size") if entry is not None else None
            if (entry is None or isinstance(size, int)) and \
                    self._finish_settle(msg_id, size if isinstance(size, int) else None):
                self._forget(msg_id)
                return "passed" if entry and entry.get("op") == "accepted" else "settled"
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
            (error,) = self.spool.settle_many([(msg_id, state, settled, None)])
            if error is not None:
                raise error
            self._forget(msg_id)
            self.last_settled = (state, settled)
            return "passed"
        except OSError as exc:  # SpoolError included
            logger.error("cannot settle message %s now: %s", msg_id, exc)
            if entry is not None and entry.get("op") == "accepted":
                self.unsettled[msg_id] = entry
                self.claimed[msg_id] = entry
            return "unsettled"

    def _finish_settle(self, msg_id: str, size: int | None) -> bool:
        """Carry out a settle that a crash (or a disk error) interrupted: the claimed
        file holds the update its sender appended (``Spool.settle_many``). ``size`` is
        the file's size when claimed (from the journal): beyond it is this claim's
        update; a whole one is carried out (the file synced and moved to the state it
        names), a torn last line (never synced) is cut off. Without ``size`` a file is moved
        to the state its record names if that is not queued/ (the undone claim's
        place anyway). True if the message is settled (moved now, or found moved)."""
        path = self.spool.path("active", msg_id)
        try:
            data = self.spool.read_bytes(path, self.spool.read_cap)
        except FileNotFoundError:
            # Moved already (the folder's fsync may have failed): make that durable.
            found = self.spool.find(msg_id, SETTLE_STATES) if size is not None else None
            if found is None:
                return False
            fsync_dir(found[1].parent)
            with contextlib.suppress(CorruptRecord, OSError):
                self.last_settled = (found[0], self.spool.read(found[1]))
            return True
        except CorruptRecord:
            return False  # a link, a folder, too big...: the usual path quarantines it
        assert data is not None
        if (len(data) <= size) if size is not None else (UPDATE_MARK not in data):
            return False  # nothing appended: the claim is undone or finished as before
        try:
            record = decode_record(data)
        except CorruptRecord:
            # Torn: its sender died before the sync, so that settle never happened. Only
            # the last line can be (the others were synced), and every update line starts
            # with a newline: cut from the last one, if what stays reads.
            cut = data.rfind(b"\n")
            if cut < 0 or (size is not None and cut < size) or not _reads(data[:cut]):
                return False  # not a torn update: the usual path quarantines it
            cut_back(path, cut)
            return False
        state = record["state"]
        if state not in SETTLE_STATES or record["id"] != msg_id or (
                size is None and state == "queued"):
            return False
        self.spool.finish_settle(msg_id, state, record)
        self.last_settled = (state, record)
        logger.info("message %s: its settle as %s was interrupted; carried out now", msg_id,
                    state)
        return True

    def _forget(self, msg_id: str) -> None:
        """``msg_id`` has reached a durable next state: drop what this run kept of it."""
        self.unsettled.pop(msg_id, None)
        self._drop(msg_id)
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
        if self._claimer is not None:
            await asyncio.gather(self._claimer, return_exceptions=True)
        await self._commits.drain()

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
            if (msg_id in self.claimed and msg_id not in self.unsettled) or \
                    msg_id in self.claiming:
                continue  # being delivered (or claimed) right now
            outcome = self.settle_claim(msg_id, entries.get(msg_id))
            counts[outcome] = counts.get(outcome, 0) + 1
        for stray in self.spool.strays("active"):
            self.spool.quarantine(stray, "unexpected file in active/")
            counts["corrupt"] += 1
        for msg_id in list(self.journal.live):
            if msg_id not in self.claimed:
                self.journal.settle(msg_id)
        return counts
