"""Senders: coroutines that claim one message at a time and see it to its next state.

A claim is a rename from ``queued/`` (or a due ``deferred/``) into ``active/``, tracked in
memory and journaled. Once the server accepts a message, ``accepted`` is made durable in
the journal before anything else, so a crash from then on finishes it as passed instead
of sending it again. One bad message never stops a sender: every outcome, including an
unexpected error, ends in a state folder.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiofiles.os

from .dkim import DkimSigner
from .errors import DeliveryError, SpoolError, TemporaryDeliveryError
from .expiry import clamp_due, expire, is_expired
from .faults import crash_point
from .journal import Journal
from .limits import DomainLimiter, domains_of, pushback_domains
from .message import stamp_date
from .metrics import DeliveryStats
from .retry import RetryPolicy
from .spool import CorruptRecord, Spool, encode_record
from .throttle import Throttle
from .transports import SendResult, Transport

__all__ = ("Dispatcher", "WorkItem", "WorkloadSummary")

logger = logging.getLogger("ess_async.sender")

_INLINE_BYTES = 256 * 1024  # smaller spool files are read and written on the loop itself


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
                 throttle: Throttle | None = None,
                 delivery_log: TextIO | None = None,
                 on_deferred: Callable[[str, float], None] | None = None,
                 on_finished: Callable[[str, str], None] | None = None) -> None:
        self.spool = spool
        self.journal = journal
        self.policy = policy
        self.clock = clock
        self.rand = rand
        self.throttle = throttle or Throttle(1_000_000)
        self.delivery_log = delivery_log
        self.on_deferred = on_deferred
        self.on_finished = on_finished
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None  # each outcome
        # Claimed message ids -> their durable "accepted" journal entry once there is one.
        self.claimed: dict[str, dict[str, Any] | None] = {}
        self.finishing: set[asyncio.Task[str]] = set()
        # Accepted by the server, but their next record could not be written yet.
        self.unsettled: dict[str, dict[str, Any]] = {}
        self.summary = WorkloadSummary()
        self.stats = DeliveryStats(clock)  # metrics and health (issue 14)
        self.signer: DkimSigner | None = None  # DKIM: signs the bytes of each attempt
        self.limiter: DomainLimiter | None = None  # per-domain limits and push-back
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

    async def _attempt(self, record: dict[str, Any], transport: Transport) -> str:
        msg_id = record["id"]
        record["attempts"] = record.get("attempts", 0) + 1
        record["last_attempt_at"] = self.clock()
        if record.pop("date_pending", False):
            # No Date was given: it is this first attempt's time, and retries keep it.
            record["raw"] = stamp_date(record["raw"], record["last_attempt_at"])
        # A pooled transport still holds the last send's state until ``send`` starts: a
        # cancel while signing must not read it as this message's.
        transport.partial = None
        transport.outcome_pending = False
        transport.checkpoint = functools.partial(self._checkpoint, record)
        transport.route = record.get("transport")
        started = time.perf_counter()
        try:
            utf8 = bool(record.get("smtputf8"))
            raw = record["raw"].encode("utf-8" if utf8 else "ascii")
            if self.signer is not None:  # the bytes signed are the bytes sent
                raw = await self.signer.sign(raw)
                started = time.perf_counter()
            result = await transport.send(record["mail_from"], record["recipients"], raw,
                                          smtputf8=utf8)
        except DeliveryError as exc:
            self.stats.attempt(time.perf_counter() - started, exc.code, exc)
            if exc.pushback and exc.phase == "RCPT" and self.limiter is not None:
                # About the recipients' domain(s), not the relay: that domain slows down
                # (a 421 at RCPT names no recipient: the message's domains).
                pushed = (pushback_domains(exc.refused) if exc.refused else set()) or \
                    domains_of(exc.refused or record["recipients"])
                self.limiter.push_back(pushed)
                logger.warning("push-back for %s (%s): that domain pauses",
                               ", ".join(sorted(pushed)), exc)
            elif exc.pushback:
                self.throttle.push_back()
                logger.warning("server pushed back (%s): %d concurrent sends, pausing",
                               exc, self.throttle.limit)
            if exc.destination or exc.phase == "CONNECT" or (
                    exc.pushback and exc.phase == "MAIL"):
                # The relay, not the message: it waits, uncharged, while one sender at
                # a time probes the relay.
                if not exc.pushback:
                    self.throttle.destination_down()
                    logger.error("cannot deliver through the relay (%s): messages wait, "
                                 "one probe at a time", exc)
                return await self._finish(self._requeue_uncharged(record, exc))
            return await self._finish_failed(record, exc)
        except asyncio.CancelledError:
            partial = transport.partial
            if partial is not None:
                # Stopped after an earlier transaction of this message was accepted (a
                # recipient limit split it): finish it as accepted for those recipients.
                self.claimed[msg_id] = entry = self._accepted_entry(record, partial)
                await self._finish(self._accepted(record, entry))
                raise
            if transport.outcome_pending:
                # Stopped after the data was sent, before the reply: the server may have
                # the message. Record that (never requeue it as if nothing was sent).
                await self._finish_failed(record, TemporaryDeliveryError(
                    "stopped while waiting for the reply to the message data",
                    outcome_unknown=True, phase="DATA"))
            raise
        except Exception as exc:  # a transport bug must not lose the message or the sender
            logger.exception("message %s: unexpected error from transport", msg_id)
            return await self._finish_failed(record, DeliveryError(
                f"internal error: {exc!r}", outcome_unknown=transport.outcome_pending))
        crash_point("after_250")
        self.stats.attempt(time.perf_counter() - started, result.code)
        self.throttle.success()
        if self.limiter is not None and (self.limiter.active or result.refused):
            pushed = pushback_domains(result.refused) if result.refused else set()
            if pushed:
                self.limiter.push_back(pushed)
            self.limiter.success(domains_of(record["recipients"]) - pushed)
        # From here on the message is delivered: finish even if the run is being cancelled.
        entry = self._accepted_entry(record, result)
        self.claimed[msg_id] = entry  # in memory at once: never requeued from here on
        return await self._finish(self._accepted(record, entry))

    async def _checkpoint(self, record: dict[str, Any], partial: SendResult) -> None:
        """One transaction of a message split by a recipient limit was accepted: journal
        it durably before the next, so a crash never resends to those recipients."""
        self.claimed[record["id"]] = entry = self._accepted_entry(record, partial)
        try:
            await self.journal.append_durable(entry)
        except OSError as exc:  # kept in memory meanwhile; the send's end records it
            logger.error("message %s: cannot journal a partial delivery: %s", record["id"],
                         exc)

    def _accepted_entry(self, record: dict[str, Any], result: SendResult) -> dict[str, Any]:
        # The attempt number fences the entry: recovery trusts it only for this claim.
        return {"op": "accepted", "id": record["id"], "at": self.clock(),
                "code": result.code, "reply": result.message, "refused": result.refused,
                "attempt": record["attempts"]}

    async def _requeue_uncharged(self, record: dict[str, Any], exc: DeliveryError) -> str:
        """Put a claimed message back in ``queued/``, no attempt counted, with the error."""
        record["attempts"] -= 1
        record.update(state="queued", next_attempt_at=None, last_error={
            "code": exc.code, "message": exc.message, "phase": exc.phase,
            "at": self.clock(), "destination": True})
        await self._settle("queued", record)
        return "requeued"

    async def _finish(self, work: Coroutine[Any, Any, str]) -> str:
        """Run ``work`` to its end even if the caller is cancelled meanwhile (``drain``
        waits for it when a run closes)."""
        task = asyncio.ensure_future(work)
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        return await asyncio.shield(task)

    async def _finish_failed(self, record: dict[str, Any], exc: DeliveryError) -> str:
        return await self._finish(self._failed_attempt(record, exc))

    async def _accepted(self, record: dict[str, Any], entry: dict[str, Any]) -> str:
        msg_id = record["id"]
        try:
            await self.journal.append_durable(entry)
        except OSError as exc:
            logger.error("message %s was accepted, but the journal cannot record it (%s): "
                         "recording its next state directly", msg_id, exc)
        crash_point("after_journal")
        state, settled = self.settle_accepted(record, entry)
        try:
            await self._settle(state, settled)
        except OSError as exc:
            # Delivered, but not recorded (disk full?): keep the acceptance (in memory and,
            # if it got there, in the journal) and finish it once the disk allows.
            self.unsettled[msg_id] = entry
            logger.error("message %s was accepted, but its record cannot be written (%s): "
                         "will retry", msg_id, exc)
            raise
        self.claimed.pop(msg_id, None)
        self.journal.settle(msg_id)
        if state == "deferred" and self.on_deferred:
            self.on_deferred(msg_id, settled["next_attempt_at"])
        return self._done(settled, state)

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

    def settle_accepted(self, record: dict[str, Any],
                        entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The next record of a message the server accepted (``entry`` from the journal).

        Recipients refused with 5xx are recorded; those refused with 4xx stay on the
        message, which is deferred for them alone (the others are never sent it again).
        """
        at = entry["at"]
        refused = {rcpt: list(reply) for rcpt, reply in (entry.get("refused") or {}).items()}
        record = dict(record)
        record["delivered_to"] = [*record.get("delivered_to", []),
                                  *(r for r in record["recipients"] if r not in refused)]
        record["refused"] = {**record.get("refused", {}),
                             **{r: v for r, v in refused.items() if v[0] >= 500}}
        retry = {r: v for r, v in refused.items() if v[0] < 500}
        if retry:
            due = self.policy.next_attempt(created_at=record["created_at"],
                                           attempts=record["attempts"], now=at, rand=self.rand())
            detail = "; ".join(f"{r}: {c} {t}" for r, (c, t) in retry.items())
            record["last_error"] = {"code": min(c for c, _ in retry.values()),
                                    "message": f"recipients deferred: {detail}", "at": at}
            if due is not None:
                record.update(state="deferred", recipients=list(retry), next_attempt_at=due)
                return "deferred", record
            record["refused"].update(retry)  # gave up on them
        record.update(state="passed", finished_at=at, next_attempt_at=None,
                      result={"code": entry["code"], "message": entry["reply"],
                              "refused": record["refused"]})
        return "passed", record

    async def _failed_attempt(self, record: dict[str, Any], exc: DeliveryError) -> str:
        now = self.clock()
        record["last_error"] = {"code": exc.code, "message": exc.message, "phase": exc.phase,
                                "at": now}
        if exc.outcome_unknown:
            # The server may have the message: say so, and do not retry at once.
            record["last_error"]["outcome_unknown"] = True
            record["outcome_unknown_attempts"] = record.get("outcome_unknown_attempts", 0) + 1
        if exc.refused:
            permanent = {r: list(v) for r, v in exc.refused.items() if v[0] >= 500}
            record["refused"] = {**record.get("refused", {}), **permanent}
            if exc.temporary:
                record["recipients"] = [r for r in record["recipients"] if r not in permanent]
        due = None
        if exc.temporary:
            due = self.policy.next_attempt(created_at=record["created_at"],
                                           attempts=record["attempts"], now=now,
                                           rand=self.rand())
        if due is not None:
            due = clamp_due(record, due)  # no later than its expiry: it fails then
            record.update(state="deferred", next_attempt_at=due)
            await self._settle("deferred", record)
            if self.on_deferred:
                self.on_deferred(record["id"], due)
            return self._done(record, "deferred")
        record.update(state="failed", finished_at=now, next_attempt_at=None,
                      result={"code": exc.code, "message": exc.message, "phase": exc.phase,
                              "reason": "permanent" if not exc.temporary else "gave up",
                              "refused": record.get("refused", {})})
        await self._settle("failed", record)
        return self._done(record, "failed")

    def _done(self, record: dict[str, Any], state: str) -> str:
        """Count, log and (optionally) append to the delivery log; never the body."""
        setattr(self.summary, state, getattr(self.summary, state) + 1)
        error = record.get("last_error") or {}
        result = record.get("result") or {}
        event = {"at": self.clock(), "id": record["id"], "state": state,
                 "attempts": record.get("attempts", 0),
                 "recipients": len(record.get("recipients") or []),
                 "code": result.get("code", error.get("code")),
                 "reply": result.get("message", error.get("message")),
                 "tags": record.get("tags") or []}
        if state == "deferred":
            event["next_attempt_at"] = record.get("next_attempt_at")
        self.stats.outcome(state, event["code"])
        level = logging.INFO if state in ("passed", "deferred") else logging.WARNING
        logger.log(level, "message %s %s: %d recipient(s), attempt %d, %s %s", record["id"],
                   state, event["recipients"], event["attempts"], event["code"] or "-",
                   event["reply"] or "")
        if self.delivery_log is not None:
            self.delivery_log.write(json.dumps(event, ensure_ascii=False) + "\n")
            self.delivery_log.flush()
        if self.on_finished:
            self.on_finished(record["id"], state)
        if self.on_event:
            self.on_event(state, record)
        return state

    async def _expired(self, record: dict[str, Any]) -> str:
        await self._settle("failed", expire(record, self.clock()))
        return self._done(record, "failed")

    async def drain(self) -> None:
        """Wait for records still being written (accepted messages, the group commit)."""
        await asyncio.gather(*self.finishing, return_exceptions=True)
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
