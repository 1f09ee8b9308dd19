"""A deliverer process's run against the PostgreSQL store.

``PgRun``: a claimer filling a local queue with leased claims, ``spawn`` senders, the
heartbeat renewing every lease the process holds, and the reaper of expired leases
(which every deliverer runs, continuously). ``deliver_from_store`` is what
``Manager.delegate_workload`` / ``process_workload`` run with a store URL, and
``retain`` the ``[server] keep_*`` retention they apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..config import ServerConfig
from ..delivery import WorkloadSummary
from ..dkim import DkimSigner
from ..errors import StoreError, StoreUnavailable
from ..faults import crash_point
from ..limits import DomainLimiter, domains_of
from ..pool import TransportPool
from ..signals import stop_on_signals
from ..throttle import Throttle
from .pgdeliver import PgDelivery, _settle_row, settle_rows
from .postgres import PostgresStore

if TYPE_CHECKING:
    from ..manager import Manager

__all__ = ("PgRun", "deliver_from_store", "retain")

logger = logging.getLogger("ess_async.store.pgrun")

_PRUNE_SECONDS = 600.0  # retention runs this often while serving
_SLOT_RETRY = 0.25  # a domain at its max_connections: its message is claimable again then


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
            crash_point("after_claim")  # committed: a crash leaves it to the lease
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
            # Claim again when a sender is free, when new work is announced (even after
            # a partial claim: it may have come since), or at the next poll (deferred
            # messages come due without a notification).
            waits = [asyncio.ensure_future(self.slot_free.wait()),
                     asyncio.ensure_future(self.store.work_event.wait())]
            _, pending = await asyncio.wait(waits, timeout=self.poll,
                                            return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
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
            domains = await self._within_domain_limits(row)
            if domains is None:
                continue  # over a domain's budget: given back until the domain is ready
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
                if domains and self.delivery.limiter is not None:
                    self.delivery.limiter.release(domains)
                self.busy.discard(task)
                self.slot_free.set()

    async def _within_domain_limits(self, row: Any) -> frozenset[str] | None:
        """Per-domain limits ([limits], per deliverer process): the domains taken for
        this send (release them after it), or None if one is over its budget: then
        the claim is given back, due when that domain is ready (not parked here, where
        it would hold a lease and a place in this process's share of claims)."""
        limiter = self.delivery.limiter
        if limiter is None or not limiter.active:
            return frozenset()
        try:
            domains = domains_of(orjson.loads(row["record"])["recipients"])
        except (ValueError, KeyError, TypeError):
            return frozenset()  # unreadable: the delivery quarantines it
        blocked = limiter.blocked(domains)
        if blocked is None:
            limiter.acquire(domains)
            return domains
        at = blocked[1]
        wait = _SLOT_RETRY if math.isinf(at) else max(0.05, at - limiter.clock())
        token = self.delivery.tokens.pop(row["id"], None)
        if token is not None:
            try:
                await self.store.fetch("give_back", row["id"], token, self.clock() + wait)
            except Exception as exc:  # expires and is reaped instead
                logger.error("cannot give back message %s: %s", row["id"], exc)
        self.slot_free.set()
        return None

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


async def deliver_from_store(manager: Manager, stop_event: asyncio.Event, *, drain: bool,
                             handle_signals: bool) -> WorkloadSummary:
    """A deliverer of the manager's PostgreSQL store until ``stop_event`` (or, with
    ``drain``, until nothing is due): any number run on any hosts, with no workspace
    lock (leases keep them apart)."""
    store = manager.pg_store
    await store.migrate()
    await store.open()
    smtp = manager.config.transport.smtp
    throttle = Throttle(smtp.max_connections or manager.spawn,
                        max_per_second=smtp.max_per_second)
    delivery = PgDelivery(store, manager.policy, clock=manager.clock, rand=manager.rand,
                          throttle=throttle, delivery_log=manager.open_delivery_log())
    delivery.on_event = manager._on_outcome
    delivery.signer = DkimSigner.from_config(manager.config.dkim, manager.workspace)
    delivery.limiter = DomainLimiter(manager.config.limits,
                                     default_concurrency=throttle.max_concurrency)
    pool = TransportPool(manager._transport_factory, idle_timeout=smtp.idle_timeout)
    run = manager._pg_run = PgRun(store, delivery, pool, spawn=manager.spawn,
                                  lease=manager.config.store.lease,
                                  grace=manager.config.server.grace, clock=manager.clock)
    run.stop_event = stop_event  # stop() may have been called already
    try:
        with stop_on_signals(run.stop_event.set, enabled=handle_signals):
            logger.info("delivering from %r with %d senders", store, manager.spawn)
            retention = asyncio.create_task(retain(store, manager.config.server,
                                                   once=drain))
            try:
                return await run.run(drain=drain)
            finally:
                retention.cancel()
                await asyncio.gather(retention, return_exceptions=True)
    finally:
        if delivery.signer is not None:
            delivery.signer.close()
        delivery.stats.close()
        if delivery.delivery_log is not None:
            delivery.delivery_log.close()
        manager._pg_run = None
        await manager.flush_events(manager.config.server.grace)


async def retain(store: PostgresStore, server: ServerConfig, *, once: bool) -> None:
    """``[server] keep_*`` retention on the PostgreSQL store, as the file store's
    (``prune``): at the start, then every few minutes (any deliverer may run it)."""
    while True:
        for state, days, count in (("passed", server.keep_passed_days, server.keep_passed),
                                   ("failed", server.keep_failed_days, server.keep_failed)):
            if days or count:
                try:
                    removed = await store.purge(
                        state, days * 86400 if days else None, keep=count)
                except StoreError as exc:
                    logger.error("retention: %s", exc)
                else:
                    if removed:
                        logger.info("retention removed %d old record(s)", removed)
        if once:
            return
        await asyncio.sleep(_PRUNE_SECONDS)
