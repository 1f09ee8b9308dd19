"""Delivering one claimed message: the policy every store shares.

``Delivery`` sends a claimed record through a transport and decides its next state: an
acceptance is made durable (``_persist_accepted``, or by the settle that records it:
``_note_accepted``) before the message leaves its claim, so a crash from then on
finishes the message as passed instead of sending it again; a refusal fails it,
a deferral times its next attempt (``RetryPolicy``), a relay that is down requeues it
uncharged. Where those facts are written is the store's part: the file store's
``sender.Dispatcher`` (journal and state folders), the PostgreSQL store's
``store.pgdeliver.PgDelivery`` (rows fenced by the claim's lease token).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TextIO

from .dkim import DkimSigner
from .errors import DeliveryError, TemporaryDeliveryError
from .expiry import clamp_due, expire
from .faults import crash_point
from .limits import DomainLimiter, domains_of, pushback_domains
from .message import stamp_date
from .metrics import DeliveryStats
from .retry import RetryPolicy
from .throttle import Throttle
from .transports import SendResult, Transport

__all__ = ("Delivery", "WorkItem", "WorkloadSummary")

logger = logging.getLogger("ess_async.delivery")


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


class Delivery(ABC):
    """State shared by the senders of one run, and the delivery policy; a store's
    subclass writes the facts (``_persist_accepted``, ``_settle``, ``_release``)."""

    def __init__(self, policy: RetryPolicy, *,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 throttle: Throttle | None = None,
                 delivery_log: TextIO | None = None,
                 on_deferred: Callable[[str, float], None] | None = None,
                 on_finished: Callable[[str, str], None] | None = None) -> None:
        self.policy = policy
        self.clock = clock
        self.rand = rand
        self.throttle = throttle or Throttle(1_000_000)
        self.delivery_log = delivery_log
        self.on_deferred = on_deferred
        self.on_finished = on_finished
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None  # each outcome
        # Claimed message ids -> their durable "accepted" entry once there is one.
        self.claimed: dict[str, dict[str, Any] | None] = {}
        self.finishing: set[asyncio.Task[str]] = set()
        # Accepted by the server, but their next record could not be written yet.
        self.unsettled: dict[str, dict[str, Any]] = {}
        self.summary = WorkloadSummary()
        self.stats = DeliveryStats(clock)  # metrics and health (issue 14)
        self.signer: DkimSigner | None = None  # DKIM: signs the bytes of each attempt
        self.limiter: DomainLimiter | None = None  # per-domain limits and push-back

    # -- what a store writes -----------------------------------------------------------

    @abstractmethod
    async def _persist_accepted(self, entry: dict[str, Any]) -> None:
        """Make the server's acceptance of a claimed message durable (raise OSError if
        it cannot be): from then on a crash finishes it as passed, never resends it."""

    async def _note_accepted(self, entry: dict[str, Any]) -> None:
        """The acceptance of a whole attempt, its settle next: durable at once by default.
        A store whose settle makes the acceptance durable in the same sync, before the
        message leaves its claim, may only write it here."""
        await self._persist_accepted(entry)

    @abstractmethod
    async def _settle(self, state: str, record: dict[str, Any]) -> None:
        """Move a claimed message to ``state`` durably, with ``record`` as its record
        (raise OSError if it cannot be written)."""

    @abstractmethod
    def _release(self, msg_id: str) -> None:
        """``msg_id`` reached its next state: forget its claim."""

    # -- one message -------------------------------------------------------------------

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
            await self._persist_accepted(entry)
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
            await self._note_accepted(entry)
        except OSError as exc:
            logger.error("message %s was accepted, but the store cannot record it (%s): "
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
        self._release(msg_id)
        if state == "deferred" and self.on_deferred:
            self.on_deferred(msg_id, settled["next_attempt_at"])
        return self._done(settled, state)


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
        """Wait for records still being written (accepted messages)."""
        await asyncio.gather(*self.finishing, return_exceptions=True)
