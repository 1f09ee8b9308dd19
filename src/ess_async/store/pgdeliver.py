"""Delivering from the PostgreSQL store: leased claims, fenced writes, any host recovers.

A deliverer process claims batches (``FOR UPDATE SKIP LOCKED``), each message under a
lease with a fresh token. A heartbeat renews every lease the process holds, every third
of the lease. Every write about a claim is fenced by its token: the server's acceptance
(committed right after the 250, before anything else, like the file store's journal
entry) and the next state. A deliverer that lost a lease (paused past it, cut off from
the database) therefore writes nothing over the newer attempt. Every deliverer also
reaps expired leases: an accepted message is finished as passed (never resent), any
other goes back to where it was claimed from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..delivery import Delivery, WorkloadSummary
from ..errors import StoreUnavailable
from ..expiry import is_expired
from ..pool import TransportPool
from ..spool import FINAL_STATES
from ..transports import Transport
from .postgres import PostgresStore

__all__ = ("PgDelivery", "PgRun")

logger = logging.getLogger("ess_async.store.pgdeliver")

_NOTIFY_BYTES = 7_000  # NOTIFY payloads must stay under 8000 bytes


def _settle_row(record: dict[str, Any], token: uuid.UUID, raw: str | None, now: float
                ) -> tuple[Any, ...]:
    state = record["state"]
    due = record.get("next_attempt_at") or now
    body = {k: v for k, v in record.items() if k != "raw"}
    return (record["id"], token, state, due, int(record.get("attempts", 0)),
            record.get("finished_at") if state in FINAL_STATES else None,
            orjson.dumps(body).decode(), raw)


class GroupWrite:
    """Rows written by concurrent callers in one transaction: ``write(row)`` returns
    whether the row was written (False: its claim's lease was lost), once committed."""

    def __init__(self, store: PostgresStore,
                 statement: Callable[[Any, list[tuple[Any, ...]]], Awaitable[set[str]]]
                 ) -> None:
        self.store = store
        self.statement = statement
        self._staged: list[tuple[tuple[Any, ...], asyncio.Future[bool]]] = []
        self._committer: asyncio.Future[None] | None = None

    async def write(self, row: tuple[Any, ...]) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._staged.append((row, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit())
        return await asyncio.shield(future)

    async def _commit(self) -> None:
        while self._staged:
            batch, self._staged = self._staged, []
            try:
                async with self.store.transaction() as conn:
                    written = await self.statement(conn, [row for row, _ in batch])
            except Exception as exc:
                error = exc if isinstance(exc, OSError) else StoreUnavailable(
                    f"cannot write to the PostgreSQL store: {exc}")
                for _, future in batch:
                    future.set_exception(error)
            else:
                for row, future in batch:
                    future.set_result(row[0] in written)

    async def drain(self) -> None:
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)


async def settle_rows(conn: Any, rows: list[tuple[Any, ...]], *, store: PostgresStore
                      ) -> set[str]:
    """Write a batch of next states (in the caller's transaction); returns the ids
    written (the others had lost their lease) and announces the final ones."""
    columns = [list(col) for col in zip(*rows, strict=True)]
    written = {r["id"] for r in await conn.fetch(store.sql["settle"], *columns)}
    final = [row[0] for row in rows if row[0] in written and row[2] in FINAL_STATES]
    payload = ""
    for msg_id in final:
        if len(payload) + len(msg_id) + 1 > _NOTIFY_BYTES:
            await conn.execute("SELECT pg_notify($1, $2)", store.done_channel, payload)
            payload = ""
        payload = f"{payload},{msg_id}" if payload else msg_id
    if payload:
        await conn.execute("SELECT pg_notify($1, $2)", store.done_channel, payload)
    if any(row[0] in written and row[2] in ("queued", "deferred") for row in rows):
        await conn.execute("SELECT pg_notify($1, '')", store.work_channel)
    return written


class PgDelivery(Delivery):
    """The delivery policy writing to PostgreSQL, each write fenced by the claim."""

    def __init__(self, store: PostgresStore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.tokens: dict[str, uuid.UUID] = {}  # claimed ids -> their lease tokens
        self.raws: dict[str, str] = {}  # the text as claimed: rewritten only if changed
        self.records: dict[str, dict[str, Any]] = {}  # accepted, awaiting their record
        self.lost = 0  # writes refused because the lease had been lost
        # Concurrent senders' writes share transactions (group commits).
        self._accepts = GroupWrite(store, self._write_accepts)
        self._settles = GroupWrite(store, functools.partial(settle_rows, store=store))

    async def _write_accepts(self, conn: Any, rows: list[tuple[Any, ...]]) -> set[str]:
        columns = [list(col) for col in zip(*rows, strict=True)]
        return {r["id"] for r in await conn.fetch(self.store.sql["accepted"], *columns)}

    async def deliver(self, row: Any, transport: Transport) -> str:
        """Deliver one claimed row (id, lease_token, record, raw)."""
        msg_id: str = row["id"]
        self.tokens[msg_id] = row["lease_token"]
        self.claimed[msg_id] = None
        cancelled = False
        try:
            try:
                record: dict[str, Any] = orjson.loads(row["record"])
                if not isinstance(record, dict) or record.get("id") != msg_id:
                    raise ValueError("record id does not match its row")
            except (ValueError, TypeError) as exc:
                corrupt = {"id": msg_id, "state": "corrupt", "finished_at": self.clock(),
                           "last_error": {"message": f"unreadable record: {exc}"}}
                await self._settle("corrupt", corrupt)
                return self._done(corrupt, "corrupt")
            record["raw"] = self.raws[msg_id] = row["raw"]
            if "expires_at" in record and is_expired(record, self.clock()):
                return await self._finish(self._expired(record))  # never sent
            return await self._attempt(record, transport)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if self.claimed.get(msg_id) is None:
                self.claimed.pop(msg_id, None)
                token = self.tokens.get(msg_id)
                self._release(msg_id)
                if cancelled and token is not None:
                    # Stopped at the grace deadline: if nothing was written for this
                    # claim (no data sent), the run's end gives it back (a no-op if
                    # its outcome was written meanwhile).
                    self.tokens[msg_id] = token

    async def _attempt(self, record: dict[str, Any], transport: Transport) -> str:
        self.records[record["id"]] = record
        return await super()._attempt(record, transport)

    async def _persist_accepted(self, entry: dict[str, Any]) -> None:
        msg_id = entry["id"]
        token = self.tokens.get(msg_id)
        if token is None:
            return
        if not await self._accepts.write((msg_id, token, orjson.dumps(entry).decode())):
            self.lost += 1
            logger.error("message %s was accepted by the server after its lease was lost "
                         "(this deliverer stalled): another deliverer may send it again",
                         msg_id)

    def _release(self, msg_id: str) -> None:
        self.tokens.pop(msg_id, None)
        self.raws.pop(msg_id, None)
        if msg_id not in self.unsettled:
            self.records.pop(msg_id, None)

    async def _settle(self, state: str, record: dict[str, Any]) -> None:
        """Stage the next state; one transaction writes what concurrent senders staged
        (a group commit)."""
        msg_id = record["id"]
        token = self.tokens.get(msg_id)
        if token is None:
            return
        raw = record.get("raw")
        changed = raw if raw is not None and raw is not self.raws.get(msg_id) else None
        row = _settle_row({**record, "state": state}, token, changed, self.clock())
        if not await self._settles.write(row):
            self.lost += 1
            logger.error("message %s: its lease was lost (this deliverer stalled past it); "
                         "its %s state was not written over the newer attempt", msg_id, state)

    async def retry_unsettled(self) -> None:
        """Record messages the server accepted while the database refused their records
        (their leases are renewed meanwhile, so no other deliverer resends them)."""
        for msg_id, entry in list(self.unsettled.items()):
            record = self.records.get(msg_id)
            if record is None:
                self.unsettled.pop(msg_id, None)
                continue
            try:
                await self._persist_accepted(entry)
                state, settled = self.settle_accepted(record, entry)
                await self._settle(state, settled)
            except OSError as exc:
                logger.warning("message %s: accepted, still cannot record it: %s", msg_id, exc)
                return
            self.unsettled.pop(msg_id, None)
            self.claimed.pop(msg_id, None)
            self._release(msg_id)
            self._done(settled, state)

    async def drain(self) -> None:
        await super().drain()
        await self._accepts.drain()
        await self._settles.drain()


class PgRun:
    """One deliverer process's run against the PostgreSQL store: a claimer filling a
    local queue, ``spawn`` senders, the heartbeat, the reaper of expired leases."""

    def __init__(self, store: PostgresStore, delivery: PgDelivery, pool: TransportPool, *,
                 spawn: int, lease: float, grace: float,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.delivery = delivery
        self.pool = pool
        self.spawn = spawn
        self.lease = lease
        self.grace = grace
        self.clock = clock
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.slot_free = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.busy: set[asyncio.Task[Any]] = set()
        self.senders: list[asyncio.Task[None]] = []
        self.poll = min(1.0, lease / 3)
        self.claiming_done = False
        self.drain = False
        self._events = 0  # the throttle's push-back and relay-down events at the start

    # -- claims ------------------------------------------------------------------------

    def _held_back(self) -> bool:
        """A ``process`` pass (drain) ends once the relay pushed back or was down: what
        is left stays queued for the next run (as with the file store), rather than
        being claimed again and again while the relay is down."""
        return self.drain and self.delivery.throttle.events > self._events

    def _wanted(self) -> int:
        # In flight plus one batch waiting: enough to keep every sender busy, few
        # enough that claims idle in this process do not hold leases for long.
        limit = min(self.spawn, self.delivery.throttle.limit)
        return max(0, 2 * limit - len(self.delivery.tokens) - self.queue.qsize())

    async def _claim(self, n: int) -> int:
        rows = await self.store.fetch("claim", self.clock(), n, self.lease, self.store.name)
        for row in rows:
            self.delivery.tokens[row["id"]] = row["lease_token"]  # heartbeat covers it
            self.queue.put_nowait(row)
        return len(rows)

    async def _claimer(self, *, drain: bool) -> None:
        delay = 0.5
        while not self.stop_event.is_set() and not self._held_back():
            self.slot_free.clear()
            self.store.work_event.clear()
            want = self._wanted()
            got = 0
            if want:
                try:
                    got = await self._claim(want)
                    delay = 0.5
                except Exception as exc:  # the database went away, a cancelled query
                    logger.error("cannot claim: %s; retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
            if drain and not got and self.queue.empty() and not self.busy:
                break
            if got and got == want:
                continue
            waits = [asyncio.ensure_future(self.slot_free.wait())]
            if not got:
                waits.append(asyncio.ensure_future(self.store.work_event.wait()))
            _, pending = await asyncio.wait(waits, timeout=None if got and not drain
                                            else self.poll,
                                            return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        self.claiming_done = True
        for _ in range(self.spawn):
            self.queue.put_nowait(None)  # wakes idle senders: nothing more comes

    async def _sender(self) -> None:
        throttle = self.delivery.throttle
        while True:
            row = await self.queue.get()
            if row is None or self.stop_event.is_set():
                return  # stopping: claims not started are given back at the run's end
            if self._held_back():
                continue  # not started: the run's end gives the claim back
            task = asyncio.current_task()
            assert task is not None
            self.busy.add(task)
            try:
                async with throttle:
                    transport = await self.pool.borrow(limit=throttle.limit)
                    try:
                        await self.delivery.deliver(row, transport)
                    except OSError as exc:  # the database, not the message
                        logger.error("store error on message %s: %s", row["id"], exc)
                        self.delivery.stats.store_error(exc)
                        await asyncio.sleep(1.0)
                    finally:
                        self.pool.give_back(transport, limit=throttle.limit)
            finally:
                self.busy.discard(task)
                self.slot_free.set()

    # -- leases ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.lease / 3
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            tokens = list(self.delivery.tokens.values())
            if not tokens:
                continue
            try:
                kept = {r["lease_token"] for r in await self.store.fetch("renew", self.lease,
                                                                         tokens)}
            except Exception as exc:  # any error: the heartbeat must outlive it
                logger.error("cannot renew leases: %s", exc)
                delay = min(interval, 1.0)  # try again soon: the leases are running out
                continue
            lost = [i for i, t in self.delivery.tokens.items() if t in tokens and t not in kept]
            if lost:
                logger.error("lost the lease of %d message(s) (%s): another deliverer may "
                             "have taken them", len(lost), ", ".join(lost[:5]))

    async def reap(self) -> dict[str, int]:
        """Settle claims whose lease expired (their deliverer died or stalled)."""
        counts = {"requeued": 0, "passed": 0}
        while True:
            async with self.store.transaction() as conn:
                rows = await conn.fetch(self.store.sql["expired"], 100)
                settles = []
                for row in rows:
                    if row["accepted"] is None:
                        await conn.execute(self.store.sql["requeue"], row["id"],
                                           row["lease_token"])
                        counts["requeued"] += 1
                        continue
                    record = orjson.loads(row["record"])
                    entry = orjson.loads(row["accepted"])
                    record["attempts"] = record.get("attempts", 0) + 1
                    state, settled = self.delivery.settle_accepted(record, entry)
                    settled["state"] = state
                    settles.append(_settle_row(settled, row["lease_token"], None, self.clock()))
                    counts["passed"] += 1
                if settles:
                    await settle_rows(conn, settles, store=self.store)
            if len(rows) < 100:
                break
        if any(counts.values()):
            logger.info("expired leases settled: %s", counts)
        return counts

    async def _reaper(self) -> None:
        while True:
            try:
                await self.reap()
            except Exception as exc:
                logger.error("cannot reap expired leases: %s", exc)
            await asyncio.sleep(self.poll)

    async def _settler(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.delivery.unsettled:
                try:
                    await self.delivery.retry_unsettled()
                except Exception as exc:
                    logger.error("cannot record accepted messages yet: %s", exc)

    async def _pool_reaper(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.pool.idle_timeout / 2))
            self.pool.reap()
            self.pool.trim(self.delivery.throttle.limit)

    # -- the run -----------------------------------------------------------------------

    async def run(self, *, drain: bool) -> WorkloadSummary:
        """Deliver until ``stop_event`` (or, with ``drain``, until nothing is due)."""
        self.drain = drain
        self._events = self.delivery.throttle.events
        await self.store.listen()
        if drain:
            # A pass delivers what is due now, expired claims included: settle them
            # first (the reaper would race the claimer's first, and last, empty claim).
            try:
                await self.reap()
            except Exception as exc:
                logger.error("cannot reap expired leases: %s", exc)
        helpers = [asyncio.create_task(self._heartbeat()),
                   asyncio.create_task(self._reaper()),
                   asyncio.create_task(self._settler()),
                   asyncio.create_task(self._pool_reaper())]
        claimer = asyncio.create_task(self._claimer(drain=drain))
        self.senders = [asyncio.create_task(self._sender()) for _ in range(self.spawn)]
        stop = asyncio.create_task(self.stop_event.wait())
        try:
            if drain:
                done: asyncio.Future[Any] = asyncio.gather(claimer, *self.senders)
                await asyncio.wait([stop, done], return_when=asyncio.FIRST_COMPLETED)
            else:
                await stop
            self.stop_event.set()
            await self._shutdown(claimer)
        finally:
            stop.cancel()
            for task in (*helpers, claimer, *self.senders):
                task.cancel()
            await asyncio.gather(stop, *helpers, claimer, *self.senders,
                                 return_exceptions=True)
            await self.pool.close()
            await self.delivery.drain()
            await self._release_claims()
        return self.delivery.summary

    async def _shutdown(self, claimer: asyncio.Task[None]) -> None:
        claimer.cancel()
        await asyncio.gather(claimer, return_exceptions=True)
        for task in self.senders:
            if task not in self.busy:
                task.cancel()  # idle: holding nothing
        for _ in self.senders:
            self.queue.put_nowait(None)  # a busy one ends when its send does
        in_flight = [t for t in self.senders if t in self.busy and not t.done()]
        if in_flight:
            logger.info("waiting up to %.0fs for %d in-flight sends", self.grace,
                        len(in_flight))
            _, late = await asyncio.wait(in_flight, timeout=self.grace)
            for task in late:
                task.cancel()  # outcome unknown if its data was sent (Delivery._attempt)
        await asyncio.gather(*self.senders, return_exceptions=True)

    async def _release_claims(self) -> None:
        """Give back what this process still holds: claimed but never started, or cut
        off before the server accepted it. Accepted ones not yet recorded keep their
        lease, and its expiry finishes them as passed."""
        held = {i: t for i, t in self.delivery.tokens.items()
                if i not in self.delivery.unsettled}
        with contextlib.suppress(StoreUnavailable):
            await self.delivery.retry_unsettled()
        if not held:
            return
        try:
            async with self.store.transaction() as conn:
                for msg_id, token in held.items():
                    await conn.execute(self.store.sql["requeue"], msg_id, token)
                await conn.execute("SELECT pg_notify($1, '')", self.store.work_channel)
        except Exception as exc:
            logger.error("cannot give back %d claim(s) (%s): they return when their "
                         "leases expire", len(held), exc)
        for msg_id in held:
            self.delivery.tokens.pop(msg_id, None)
