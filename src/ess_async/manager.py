"""The Manager: enqueue messages and run the senders that deliver them.

One asyncio loop runs ``spawn`` sender coroutines pulling from a priority queue fed by a
start-up scan, a watchfiles watcher on ``queued/``, timers for deferred messages, and
``create_work`` itself. Whatever delivers holds the workspace lock; enqueueing never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from . import watcher
from .config import (
    CONFIG_TEMPLATE,
    Config,
    check_store,
    load_config,
    parse_listen,
    relay_names,
)
from .delivery import WorkItem, WorkloadSummary
from .dkim import DkimSigner
from .enqueue import Enqueuer, GroupCommit, Prepared, prepare
from .errors import ConfigError, EssError
from .events import EventBus, Webhook, callback_sink, event_kind, make_event
from .identity import check_ehlo_name
from .journal import Journal, replay
from .limits import DomainLimiter, domains_of
from .lock import WorkspaceLock
from .metrics import LAST_ERROR_NAME, MetricsServer
from .ops import QueueOps
from .outcome import Outcome
from .pool import TransportPool
from .retry import RetryPolicy
from .sender import _INLINE_BYTES, Dispatcher
from .signals import stop_on_signals
from .spool import ID_PATTERN, CorruptRecord, Spool, priority_rank
from .store import Store
from .store.file import FileStore
from .store.pgdeliver import PgDelivery
from .store.pgrun import PgRun, deliver_from_store
from .store.postgres import PostgresStore
from .suppression import SuppressionList
from .throttle import Throttle
from .transports import Transport, create_transport
from .watcher import watch_queued

__all__ = ("Manager", "default_workspace", "store_url")

logger = logging.getLogger("ess_async.manager")

JOURNAL_NAME = "journal.log"
_RESCAN_SECONDS = 30.0  # safety net for watcher events that never came
_RESCAN_SHARE = 0.05  # at most this share of the time spent listing queued/ again
_RESCAN_MAX = 600.0  # ...but the safety net (timers too) runs at least every 10 minutes
_PRUNE_SECONDS = 600.0  # retention runs this often while serving
_CHUNK = 1_000  # ids offered or timed per event-loop step (keeps each step short)
# A scan of queued/ is kept as a compact backlog (sorted runs of ids packed in strings,
# ~30 bytes an id) and offered _CHUNK at a time whenever the in-memory queue runs low,
# instead of a queue item and a pending entry per message: a million queued messages
# cost ~30 MB, and each refill a few milliseconds of the loop (issue 11 item 5).
_RUN_IDS = 10_000  # ids per sorted run (one sort holds the GIL for a few ms at most)
_ID_LEN = 30  # ID_PATTERN: 20 digits, "-", the priority letter, 8 hex digits
_QUEUED_NAME = re.compile(ID_PATTERN.pattern.rstrip("$") + r"\.json")  # fullmatch
# While senders run, a listing thread pauses this long every _LIST_BURST entries: a
# thread that never sleeps takes the GIL back at each of the loop's system calls and
# holds it up to the switch interval (5 ms) each time, which stretched loop steps to
# hundreds of ms and cut throughput on a 1M backlog (issue 11 item 5).
_LIST_BURST, _LIST_PAUSE = 1_000, 0.002


def rescan_interval(listing_seconds: float) -> float:
    """Seconds between the safety-net listings of ``queued/``, given how long the
    latest one took."""
    return min(_RESCAN_MAX, max(_RESCAN_SECONDS, listing_seconds / _RESCAN_SHARE))


def store_url(explicit: str | None, config: Config) -> str:
    """The store's URL: ``explicit``, else ``$ESS_STORE_URL``, else ``[store] url``
    ("" = the file store)."""
    url = explicit if explicit is not None else (
        os.environ.get("ESS_STORE_URL") or config.store.url)
    if url:
        check_store(replace(config.store, url=url),
                    "--store" if explicit is not None else "ESS_STORE_URL"
                    if os.environ.get("ESS_STORE_URL") else "store.url")
    return url


def default_workspace() -> Path:
    """``$ESS_DATA`` if set, else ``./ess_data``; always absolute."""
    return Path(os.environ.get("ESS_DATA") or "ess_data").absolute()


class _Run:
    """Everything that exists only while this manager is delivering."""

    def __init__(self, dispatcher: Dispatcher, journal: Journal, pool: TransportPool) -> None:
        self.dispatcher = dispatcher
        self.journal = journal
        self.pool = pool
        self.queue: asyncio.PriorityQueue[WorkItem] = asyncio.PriorityQueue()
        self.pending: dict[str, str] = {}  # id -> folder it was offered from
        self.timers: list[tuple[float, str, str]] = []  # (due, message id, folder)
        self.timed: dict[str, float] = {}  # id -> due time of its live timer entry
        self.timer_wake = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.busy: set[asyncio.Task[Any]] = set()
        self.live = False  # True while delegate_workload serves (new work is offered)
        self.closed = asyncio.Event()  # set once the run has settled and released the lock
        self.compaction: asyncio.Future[None] | None = None
        self.settle_wake = asyncio.Event()  # set when an accepted message awaits its record
        # Per-domain limits (issue 14 part 4): messages over a domain's budget are parked
        # here, by the domain they wait for, unclaimed (still in queued/ or deferred/);
        # one at a time per domain is offered again when the domain is ready.
        self.limiter: DomainLimiter | None = dispatcher.limiter
        self.domains: dict[str, frozenset[str]] = {}  # message id -> recipient domains
        self.parked: dict[str, dict[str, WorkItem]] = {}  # domain -> waiting, in order
        self.woken: dict[str, tuple[str, float]] = {}  # domain -> (id offered, when)
        self.park_wake = asyncio.Event()
        # The latest listing of queued/ not offered yet: per priority rank, an iterator
        # over its ids in order (merged sorted runs); see _scan_queued and _refill.
        self.backlog: list[Iterator[str]] = []
        self.backlog_size = 0  # ids left in it (an upper bound: some may be gone)
        self.scanning = False
        self.scan_again = False
        self.listed_since = -math.inf  # when the latest listing of queued/ began
        self.listing_seconds = 0.0  # how long the latest listing took


class Manager:
    """Enqueue and deliver the messages of one workspace (see the README for the API)."""

    def __init__(self, workspace: str | os.PathLike[str] | None = None, *,
                 spawn: int | None = None, config: Config | None = None,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 transport_factory: Callable[[], Transport] | None = None,
                 on_event: Callable[[dict[str, Any]], Any] | None = None,
                 store: str | None = None, processes: int | None = None) -> None:
        self.workspace = Path(workspace).absolute() if workspace else default_workspace()
        self.config = config if config is not None else load_config(self.config_path)
        # Issue 12: a postgresql:// URL (argument, else $ESS_STORE_URL, else [store] url)
        # puts the messages in PostgreSQL; the workspace keeps config.toml.
        self.store_url = store_url(store, self.config)
        self._pg: PostgresStore | None = None
        self._pg_run: PgRun | None = None
        # A store run, from before its first await: stop() sets _pg_stop (even before
        # the run exists) and waits for _pg_done.
        self._pg_stop: asyncio.Event | None = None
        self._pg_done: asyncio.Event | None = None
        if spawn is not None and (not isinstance(spawn, int) or spawn < 1):
            raise ValueError(f"spawn must be a positive integer, not {spawn!r}")
        self.spawn = spawn or self.config.server.spawn
        # Issue 12 part 2: serve through N deliverer processes (ess_async.workers; 0 =
        # this process delivers), each with ``spawn`` senders.
        if processes is not None and (isinstance(processes, bool) or not isinstance(
                processes, int) or processes < 0):
            raise ValueError(f"processes must be a non-negative integer, not {processes!r}")
        if processes and (transport_factory is not None or self.store_url):
            raise ValueError("processes: worker processes deliver the file store with the "
                             "configured transport (no store URL, no transport_factory)")
        self.processes = processes or 0
        self._pool: workers.WorkerPool | None = None
        self.clock = clock
        self.rand = rand
        self.spool = Spool(self.workspace, max_size=self.config.server.max_message_size)
        self.policy = RetryPolicy.from_config(self.config.retry)
        self._custom_transport = transport_factory
        self._transport_factory = transport_factory or (
            lambda: create_transport(self.config.transport, self.workspace))
        self._lock = WorkspaceLock(self.workspace)
        self._ensured = False
        self._run: _Run | None = None
        self._opening = False
        self._serve_task: asyncio.Task[WorkloadSummary] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self._commit = GroupCommit(Enqueuer(self.spool)).commit
        self.last_recovery: dict[str, int] = {}
        # Issue 14: HOST:PORT of /metrics and /healthz while delivering ("" = off; the
        # CLI's serve --metrics sets it), and the server while it runs.
        self.metrics_listen = self.config.server.metrics
        self.metrics: MetricsServer | None = None
        self.suppression = SuppressionList(self.workspace,
                                           ttl_days=self.config.suppression.ttl_days,
                                           clock=clock)
        self.events = self._event_bus(on_event)
        self._background: set[asyncio.Future[Any]] = set()

    def _event_bus(self, on_event: Callable[[dict[str, Any]], Any] | None) -> EventBus | None:
        """Delivery events (issue 14 part 7): the callback and/or the [events] webhook."""
        sinks = [] if on_event is None else [callback_sink(on_event)]
        events = self.config.events
        if events.webhook:
            secret = os.environ.get(events.secret_env) if events.secret_env else None
            if not secret:
                raise ConfigError("events.secret_env", f"the webhook's signing secret: set "
                                  f"${events.secret_env or 'ESS_EVENTS_SECRET'}")
            sinks.append(Webhook(events.webhook, secret.encode("utf-8"),
                                 timeout=events.timeout, retries=events.retries))
        return EventBus(sinks, maxsize=events.queue_size) if sinks else None

    def _emit(self, kind: str, record: dict[str, Any], recipients: list[str] | None = None,
              ) -> None:
        if self.events is not None:
            self.events.emit(make_event(kind, record, self.clock(), recipients=recipients))

    def _on_outcome(self, state: str, record: dict[str, Any]) -> None:
        """A sender finished a step: list addresses refused for good, emit the event."""
        if state in ("passed", "deferred", "failed") and record.get("refused"):
            task = asyncio.ensure_future(asyncio.to_thread(self._record_refusals, record,
                                                           state))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._emit(event_kind(state, record), record)

    def _record_refusals(self, record: dict[str, Any], state: str) -> None:
        try:
            added = self.suppression.record_refusals(record, state)
        except OSError as exc:
            logger.error("cannot add to the suppression list: %s", exc)
            return
        if added:
            logger.info("suppression list: added %s (refused by the server)",
                        ", ".join(added))

    async def flush_events(self, timeout: float | None = 10.0) -> None:
        """Wait (at most ``timeout`` s) for queued events to reach the callback and the
        webhook; ``stop()`` and the end of a delivery run do this."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.events is not None:
            await self.events.flush(timeout)

    @property
    def config_path(self) -> Path:
        return self.workspace / "config.toml"

    def _ensure(self) -> None:
        if not self._ensured:
            self.spool.ensure()
            self._ensured = True

    # -- enqueueing ------------------------------------------------------------------

    async def create_work(self, *, priority: str = "normal", send_at: object = None,
                          idempotency_key: str | None = None, expires_at: object = None,
                          expires_in: object = None, force: bool = False,
                          transport: str | None = None, **attrs: Any) -> Path | str:
        """Validate and spool one message; the file is durable when this returns (in the
        PostgreSQL store: the row is committed, and its id is returned instead).

        ``attrs`` are the message (to, cc, bcc, from_, reply_to, subject, body, html,
        headers, attachments, tags); ``priority`` is high, normal or low; ``send_at`` a
        datetime before which it is not sent; ``idempotency_key`` makes a repeated call
        return the first message's path while that message is in the spool.

        ``message=`` enqueues a message already built (an ``email.message.EmailMessage``
        / ``Message`` or raw RFC 5322 bytes) instead: only ``from_``, ``to``, ``cc``,
        ``bcc`` and ``tags`` may accompany it (the envelope; by default from its From,
        To, Cc and Bcc headers; Bcc is removed from the sent copy).

        ``expires_at`` (datetime) / ``expires_in`` (seconds): not sent after then (it
        fails with reason "expired"). Recipients on the suppression list are not sent it
        (a message with none left is recorded in failed/ with reason "suppressed" and its
        path returned), unless ``force=True``.

        ``transport="name"`` sends the message through the relay ``[transport.smtp.name]``
        alone (``"default"``: ``[transport.smtp]`` itself), instead of the failover order.
        """
        prepared = prepare(attrs, self.config.message, now=self.clock(), priority=priority,
                           send_at=send_at, idempotency_key=idempotency_key,
                           expires_at=expires_at, expires_in=expires_in,
                           suppressed=self.suppression.check, force=force,
                           transport=transport, relays=relay_names(self.config.transport))
        if self.store_url:
            return await self._create_in_store(prepared)
        self._ensure()
        path: Path = await self._commit(prepared)
        if path.stem != prepared.record["id"]:
            return path  # an idempotent repeat: nothing new
        record = prepared.record
        if record.get("suppressed"):
            self._emit("suppressed", record, recipients=record["suppressed"])
        if prepared.state in ("queued", "scheduled"):
            self._emit("queued", record)
        run = self._run
        if run is not None and run.limiter is not None and run.limiter.active:
            self._remember_domains(run, path.stem, record.get("recipients") or [])
        if run is not None and run.live:
            if prepared.state == "queued":
                self._offer(run, path.stem, "queued")
            elif prepared.state == "scheduled":
                self._schedule(run, path.stem, prepared.record["next_attempt_at"], "scheduled")
        return path

    async def _create_in_store(self, prepared: Prepared) -> str:
        msg_id = str(await self.pg_store.enqueue(prepared))
        record = prepared.record
        if msg_id == record["id"]:
            if record.get("suppressed"):
                self._emit("suppressed", record, recipients=record["suppressed"])
            if prepared.state in ("queued", "scheduled"):
                self._emit("queued", record)
        return msg_id

    @property
    def store(self) -> Store:
        """Where this manager's messages live: the workspace's ``FileStore``, or the
        ``PostgresStore`` of its store URL. Its queue operations are async and work on
        either (``await manager.store.hold(message)``)."""
        return self.pg_store if self.store_url else self.file_store

    @functools.cached_property
    def file_store(self) -> FileStore:
        """The workspace's spool folders as a ``Store``."""
        return FileStore(self.workspace, clock=self.clock,
                         max_size=self.config.server.max_message_size)

    @functools.cached_property
    def pg_store(self) -> PostgresStore:
        """The PostgreSQL store (only with a store URL; see ``store_url``)."""
        if not self.store_url:
            raise EssError("this manager uses the file store (no store URL)")
        return PostgresStore.from_config(self.store_url, self.config.store, clock=self.clock)

    def create_config(self) -> Path:
        """Write a commented ``config.toml`` unless one exists; return its path."""
        self._ensure()
        with contextlib.suppress(FileExistsError):
            fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(CONFIG_TEMPLATE)
        return self.config_path

    @functools.cached_property
    def queue(self) -> QueueOps:
        """Queue operations (list, show, retry, hold, release, delete, purge). They are
        synchronous and take a lock: from async code, call them with asyncio.to_thread."""
        return QueueOps(self.workspace, clock=self.clock,
                        max_size=self.config.server.max_message_size)

    def status(self) -> dict[str, int]:
        """How many messages are in each state (a folder count; cheap). The PostgreSQL
        store is counted with ``await manager.counts()``."""
        if self.store_url:
            raise EssError("the PostgreSQL store is counted with `await manager.counts()`")
        return self.spool.counts()

    async def counts(self) -> dict[str, int]:
        """How many messages are in each state, in either store."""
        if self.store_url:
            return await self.pg_store.counts()
        return await asyncio.to_thread(self.spool.counts)

    async def wait(self, message: str | os.PathLike[str], *,
                   timeout: float | None = None) -> Outcome:
        """Wait until the message (an id or a path from ``create_work``) is passed, failed
        or quarantined, and return how it ended. It may be delivered by this manager or by
        another process. Raises TimeoutError, or MessageNotFound for an unknown id."""
        if self.store_url:
            await self.pg_store.listen()
            return await self.pg_store.wait(message, timeout=timeout)
        # The file store polls for other processes; this manager's senders wake it at
        # once (``_finished``).
        return await self.file_store.wait(message, timeout=timeout)

    # -- opening and closing a delivery run ------------------------------------------

    async def _open_run(self) -> _Run:
        if self._run is not None or self._opening:
            raise EssError("this manager is already delivering")
        self._opening = True
        try:
            # Recovery and compaction read and sync files: off the loop.
            dispatcher, journal = await asyncio.to_thread(self._recover_and_open)
        finally:
            self._opening = False
        pool = TransportPool(self._transport_factory,
                             idle_timeout=self.config.transport.smtp.idle_timeout)
        run = _Run(dispatcher, journal, pool)
        dispatcher.on_deferred = lambda msg_id, due: self._schedule(run, msg_id, due)
        dispatcher.on_finished = lambda msg_id, state: self._finished(run, msg_id)
        dispatcher.on_event = self._on_outcome
        self._run = run
        return run

    def _recover_and_open(self) -> tuple[Dispatcher, Journal]:
        self._ensure()
        self._lock.acquire()
        journal: Journal | None = None
        log: TextIO | None = None
        try:
            journal_path = self.workspace / JOURNAL_NAME
            # With the journals of worker processes (journal/*.log), once they are gone.
            entries = workers.merge_entries(replay(journal_path),
                                            workers.worker_entries(self.workspace))
            journal = Journal(journal_path, live=entries)
            smtp = self.config.transport.smtp
            throttle = Throttle(smtp.max_connections or self.spawn,
                                max_per_second=smtp.max_per_second)
            limiter = DomainLimiter(self.config.limits,
                                    default_concurrency=throttle.max_concurrency)
            log = self.open_delivery_log()
            dispatcher = Dispatcher(self.spool, journal, self.policy, clock=self.clock,
                                    rand=self.rand, throttle=throttle, delivery_log=log)
            dispatcher.limiter = limiter
            dispatcher.stats.error_file = self.workspace / LAST_ERROR_NAME
            # DKIM keys are read once, here: a bad key file is a ConfigError at start.
            dispatcher.signer = DkimSigner.from_config(self.config.dkim, self.workspace)
            self.last_recovery = settled = dispatcher.recover(entries)
            if any(settled.values()):
                logger.info("recovered claims from an earlier run: %s", settled)
            journal.compact_now()  # only the unsettled acceptances are kept
            workers.remove_worker_journals(self.workspace)  # in journal.log now
            self.spool.clean_tmp()
            self.prune()
            if self.config.transport.type == "smtp" and self._custom_transport is None:
                check_ehlo_name(self.config.transport.smtp.local_hostname)  # may ask DNS
        except BaseException:
            if journal is not None:
                journal.close()
            if log is not None:
                log.close()
            self._lock.release()
            raise
        return dispatcher, journal

    def open_delivery_log(self) -> TextIO | None:
        """``<workspace>/delivery.log`` (0600, appended) if ``[server] delivery_log``."""
        if not self.config.server.delivery_log:
            return None
        self.workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.workspace / "delivery.log",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    async def _close_run(self, run: _Run) -> None:
        journal = run.journal
        try:
            await run.pool.close()
            await run.dispatcher.drain()
            if run.compaction is not None:
                await asyncio.gather(run.compaction, return_exceptions=True)
            # Whatever is still claimed (a send cut off at the deadline) goes back to
            # queued/, or to passed/ if this run or the journal says the server accepted
            # it (this run's memory wins: it knows acceptances the disk may have refused).
            # Worker processes, if any, are gone: their journals count too.
            left = await asyncio.to_thread(workers.worker_entries, self.workspace)
            journal.live.update({k: v for k, v in left.items() if k not in journal.live})
            run.dispatcher.recover({**left, **replay(journal.path), **journal.live,
                                    **run.dispatcher.unsettled})
            try:
                journal.compact_now()
                await asyncio.to_thread(workers.remove_worker_journals, self.workspace)
            except OSError as exc:
                logger.critical("cannot rewrite the journal (%s): %d accepted message(s) "
                                "are recorded only in memory and may be sent again",
                                exc, len(run.dispatcher.unsettled))
        finally:
            journal.close()
            run.dispatcher.stats.close()
            if run.dispatcher.signer is not None:
                run.dispatcher.signer.close()
            if run.dispatcher.delivery_log is not None:
                run.dispatcher.delivery_log.close()
            self._run = None
            self.workers = []
            self._lock.release()
            run.closed.set()
        await self.flush_events(self.config.server.grace)

    async def cleanup(self) -> dict[str, int]:
        """Requeue claimed-but-unfinished messages (refused while a deliverer runs). In
        the PostgreSQL store: settle claims whose lease expired."""
        if self.store_url:
            await self.pg_store.open()
            reaper = PgRun(self.pg_store, PgDelivery(self.pg_store, self.policy,
                                                     clock=self.clock),
                           TransportPool(self._transport_factory, idle_timeout=1.0), spawn=1,
                           lease=self.config.store.lease, grace=0, clock=self.clock)
            return await reaper.reap()
        run = await self._open_run()
        try:
            return dict(self.last_recovery)
        finally:
            await self._close_run(run)

    # -- feeding the queue -----------------------------------------------------------

    def _offer(self, run: _Run, msg_id: str, source: str) -> None:
        if run.pending.get(msg_id) == source or msg_id in run.dispatcher.claimed:
            return
        # A new source (retried or released by an operator) supersedes the older item.
        run.pending[msg_id] = source
        run.queue.put_nowait(WorkItem(priority_rank(msg_id), msg_id, source))

    async def _offer_all(self, run: _Run, ids: list[str]) -> None:
        for start in range(0, len(ids), _CHUNK):
            if start:
                await asyncio.sleep(0)  # a huge backlog must not freeze the loop
            for msg_id in ids[start:start + _CHUNK]:
                self._offer(run, msg_id, "queued")

    def _list_queued(self, gentle: bool = False) -> tuple[list[list[str]], int]:
        """The ids in ``queued/`` (run in a thread): per priority rank, sorted runs of at
        most ``_RUN_IDS`` ids, each packed in one string; and how many ids in all. No list
        of every name is built, and no sort holds the GIL (the event loop) for long;
        ``gentle`` (senders are busy): pause now and then to leave the loop the GIL."""
        strays: list[str] = []
        runs: list[list[str]] = [[], [], []]
        current: list[list[str]] = [[], [], []]
        count = 0
        match = _QUEUED_NAME.fullmatch
        ranks = {"h": 0, "n": 1, "l": 2}
        seen = 0
        with contextlib.suppress(FileNotFoundError), \
                os.scandir(self.spool.dir("queued")) as entries:
            for entry in entries:
                name = entry.name
                seen += 1
                if gentle and seen % _LIST_BURST == 0:
                    time.sleep(_LIST_PAUSE)
                if not match(name):
                    if not name.startswith("."):
                        strays.append(name)
                    continue
                rank = ranks[name[21]]
                ids = current[rank]
                ids.append(name[:-5])
                count += 1
                if len(ids) >= _RUN_IDS:
                    ids.sort()
                    runs[rank].append("".join(ids))
                    ids.clear()
        for rank, ids in enumerate(current):
            if ids:
                ids.sort()
                runs[rank].append("".join(ids))
        # Found by the same listing (a second one of a million names took seconds, and
        # freeing its list held the GIL, so the event loop, for tens of milliseconds).
        for name in strays:
            with contextlib.suppress(OSError):
                self.spool.quarantine(self.spool.dir("queued") / name,
                                      "not a message file name")
                logger.warning("quarantined stray spool entry %s", name)
        return runs, count

    @staticmethod
    def _unpack(packed: str) -> Iterator[str]:
        for start in range(0, len(packed), _ID_LEN):
            yield packed[start:start + _ID_LEN]

    async def _scan_queued(self, run: _Run, *, unless_since: float | None = None) -> None:
        """List ``queued/`` off the loop and keep it as the backlog to offer from (it
        replaces an older listing: what is still queued is in the new one too). A scan
        asked for while one runs is done once that one ends (never two listings at
        once, and none missed: a watcher's first scan must list after its watch).
        ``unless_since``: nothing to do if a listing began at or after that time."""
        if unless_since is not None and run.listed_since >= unless_since:
            return
        if run.scanning:
            run.scan_again = True
            return
        run.scanning = True
        try:
            while True:
                run.scan_again = False
                busy = bool(run.pending or run.dispatcher.claimed or run.backlog)
                run.listed_since = time.monotonic()
                runs, count = await asyncio.to_thread(self._list_queued, busy)
                run.listing_seconds = time.monotonic() - run.listed_since
                run.backlog = [heapq.merge(*map(self._unpack, rank_runs))
                               for rank_runs in runs]
                run.backlog_size = count
                # A chunk more than is queued: what this listing found of a higher
                # priority than the queued items (missed by the watcher) goes first.
                self._refill(run, run.queue.qsize() + _CHUNK)
                if not run.scan_again:
                    break
        finally:
            run.scanning = False

    def _refill(self, run: _Run, target: int | None = None) -> None:
        """Offer the next ids of the backlog, highest priority and oldest first, until
        ``target`` (default ``_CHUNK``) items are in the queue (ids already offered or
        claimed are skipped; one delivered since the listing is skipped by its claim,
        which finds it gone)."""
        backlog = run.backlog
        target = _CHUNK if target is None else target
        pulled = 0
        while backlog and run.queue.qsize() < target and pulled < 4 * _CHUNK:
            msg_id = next(backlog[0], None)
            if msg_id is None:
                del backlog[0]
                continue
            pulled += 1
            run.backlog_size -= 1
            self._offer(run, msg_id, "queued")
        if not backlog:
            run.backlog_size = 0
        elif run.queue.empty():  # all skipped: go on in the next loop step
            asyncio.get_running_loop().call_soon(self._refill, run)

    async def _watch_queued(self, run: _Run, stop: asyncio.Event) -> None:
        # watchfiles sets its watch up in this same loop step (nothing is awaited before
        # it): a listing begun after ``since`` misses nothing the watcher would not
        # report, so the watcher's first scan is skipped when serve's own one started
        # later (one listing of a huge queued/ at start-up, not two).
        since = time.monotonic()
        await watch_queued(self.spool.dir("queued"), lambda ids: self._offer_all(run, ids),
                           stop, on_ready=lambda: self._scan_queued(run, unless_since=since))

    def _read_due(self, state: str, msg_id: str) -> float | None:
        """When a waiting message is due (None if it is gone; a bad one is quarantined)."""
        path = self.spool.path(state, msg_id)
        try:
            due = self.spool.read(path).get("next_attempt_at") or 0
            if isinstance(due, bool) or not isinstance(due, int | float):
                raise CorruptRecord("malformed key 'next_attempt_at'")
            due = float(due)
            if not math.isfinite(due):
                raise CorruptRecord("non-finite next_attempt_at")
        except FileNotFoundError:
            return None
        except (CorruptRecord, OverflowError) as exc:
            with contextlib.suppress(OSError):
                self.spool.quarantine(path, getattr(exc, "reason", str(exc)))
                logger.warning("quarantined %s/%s: %s", state, msg_id, exc)
            return None
        return due

    async def _load_waiting(self, run: _Run, state: str, ids: list[str] | None = None,
                            ) -> None:
        """Set a timer for each message in ``deferred/`` or ``scheduled/``. The files are
        read off the loop; a full scan skips messages that already have a timer (their
        time is in memory), so a rescan reads only what is new."""
        def read() -> list[tuple[str, float]]:
            wanted = self.spool.ids(state) if ids is None else ids
            dues = []
            for msg_id in wanted:
                if ids is None and msg_id in run.timed:
                    continue
                due = self._read_due(state, msg_id)
                if due is not None:
                    dues.append((msg_id, due))
            return dues

        dues = await asyncio.to_thread(read)
        for start in range(0, len(dues), _CHUNK):
            if start:
                await asyncio.sleep(0)
            for msg_id, due in dues[start:start + _CHUNK]:
                self._schedule(run, msg_id, due, state)

    def _schedule(self, run: _Run, msg_id: str, due: float, state: str = "deferred") -> None:
        if not math.isfinite(due):
            due = self.clock()  # never a timer that cannot be ordered (records are checked)
        if run.timed.get(msg_id) == due:
            return  # a rescan found what is already scheduled
        run.timed[msg_id] = due  # an older entry for this id is now stale
        heapq.heappush(run.timers, (due, msg_id, state))
        run.timer_wake.set()

    def _release_due(self, run: _Run) -> None:
        now = self.clock()
        while run.timers and run.timers[0][0] <= now:
            due, msg_id, state = heapq.heappop(run.timers)
            if run.timed.get(msg_id) != due:
                continue  # superseded by a later schedule
            del run.timed[msg_id]
            self._offer(run, msg_id, state)

    def _finished(self, run: _Run, msg_id: str) -> None:
        run.domains.pop(msg_id, None)  # a deferred one may have fewer recipients now
        self.file_store.wake((msg_id,))
        self._maybe_compact(run)

    def _maybe_compact(self, run: _Run) -> None:
        if run.journal.entries_since_compaction >= self.config.server.journal_compact_after \
                and (run.compaction is None or run.compaction.done()):
            run.compaction = asyncio.ensure_future(self._compact(run))

    @staticmethod
    async def _compact(run: _Run) -> None:
        try:
            await run.journal.compact()  # keeps every live entry; appends wait meanwhile
        except OSError as exc:
            logger.error("cannot compact the journal now: %s", exc)

    async def _timers(self, run: _Run) -> None:
        while True:
            self._release_due(run)
            run.timer_wake.clear()
            timeout = max(0.0, run.timers[0][0] - self.clock()) if run.timers else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.timer_wake.wait(), timeout)

    async def _rescan(self, run: _Run) -> None:
        last_prune = self.clock()
        while True:
            # A huge queued/ takes seconds to list (a thread reading its folder, renames
            # into active/ waiting behind it): the safety net lists it at most 5% of
            # the time, so a million queued messages are re-listed every few minutes,
            # not every 30 s.
            await asyncio.sleep(rescan_interval(run.listing_seconds))
            await self._scan_queued(run)
            await self._load_waiting(run, "scheduled")
            await self._load_waiting(run, "deferred")  # a safety net: timers are in memory
            if self.clock() - last_prune >= _PRUNE_SECONDS:
                last_prune = self.clock()
                await asyncio.to_thread(self.prune)

    def prune(self) -> int:
        """Apply the ``[server] keep_*`` retention to passed/ and failed/ (also run at the
        start of every delivery run and every few minutes while serving)."""
        server = self.config.server
        removed = 0
        for state, days, count in (("passed", server.keep_passed_days, server.keep_passed),
                                   ("failed", server.keep_failed_days, server.keep_failed)):
            if days or count:  # the same mechanism as `purge` (one for both stores)
                removed += self.queue.purge(state, days * 86400 if days else None,
                                            keep=count)
        if removed:
            logger.info("retention removed %d old record(s)", removed)
        try:
            self.suppression.prune()  # expired entries ([suppression] ttl_days)
        except OSError as exc:
            logger.error("cannot prune the suppression list: %s", exc)
        return removed

    # -- senders ---------------------------------------------------------------------

    async def _sender(self, run: _Run, *, drain: bool,
                      progress: Callable[[WorkloadSummary], None] | None = None) -> None:
        throttle = run.dispatcher.throttle
        while not run.stop_event.is_set():
            if drain:
                if throttle.paused:
                    return  # the server pushed back: leave the rest for the next run
                try:
                    item = run.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if run.backlog:
                        self._refill(run)
                        await asyncio.sleep(0)
                        continue
                    if run.parked and await self._drain_wait(run):
                        continue
                    return
            else:
                item = await run.queue.get()
            if run.backlog and run.queue.qsize() < _CHUNK // 2:
                self._refill(run)
            if run.pending.get(item.msg_id) != item.source:
                continue  # stale: offered again from another folder since
            limiter = run.limiter
            domains: frozenset[str] = frozenset()
            if limiter is not None and limiter.active:
                domains = await self._domains(run, item)
                if run.pending.get(item.msg_id) != item.source:
                    continue
                self._unwoken(run, item.msg_id)
                blocked = limiter.blocked(domains)
                if blocked is not None:  # over a domain's budget: park it, take the next
                    del run.pending[item.msg_id]
                    run.parked.setdefault(blocked[0], {})[item.msg_id] = item
                    run.park_wake.set()
                    continue
                limiter.acquire(domains)
            del run.pending[item.msg_id]
            try:
                async with throttle:
                    # Connections are borrowed per message: idle ones are shared, capped
                    # and closed after idle_timeout, instead of one held open by every
                    # sender.
                    transport = await run.pool.borrow(limit=throttle.limit)
                    try:
                        await self._deliver(run, item, transport)
                    finally:
                        run.pool.give_back(transport, limit=throttle.limit)
            finally:
                if domains and limiter is not None:
                    limiter.release(domains)
                    if run.parked:
                        run.park_wake.set()
            if progress:
                progress(run.dispatcher.summary)

    async def _drain_wait(self, run: _Run) -> bool:
        """The queue is empty in a ``process`` pass: wait for parked messages of domains
        that are not paused (True), or end the pass (False: the rest stays queued)."""
        limiter = run.limiter
        if limiter is None or run.dispatcher.throttle.paused or not any(
                not limiter.paused(domain) for domain in run.parked):
            return False
        self._unpark(run)
        if run.queue.empty():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.park_wake.wait(), 0.05)
        return True

    # -- per-domain limits (issue 14 part 4) -----------------------------------------

    def _remember_domains(self, run: _Run, msg_id: str, recipients: list[str]) -> None:
        if len(run.domains) >= 100_000:
            run.domains.clear()  # a cache: what is dropped is read again
        run.domains[msg_id] = domains_of(recipients)

    async def _domains(self, run: _Run, item: WorkItem) -> frozenset[str]:
        """A message's recipient domains: remembered from create_work, or read once from
        its file (not claimed: the limits are looked at before claiming)."""
        found = run.domains.get(item.msg_id)
        if found is not None:
            return found
        path = self.spool.path(item.source, item.msg_id)
        try:
            record = self.spool.read_small(path, _INLINE_BYTES)
            if record is None:
                record = await asyncio.to_thread(self.spool.read, path)
            recipients = record.get("recipients") or []
        except (OSError, CorruptRecord):
            return frozenset()  # gone or bad: the claim sees to it
        if not isinstance(recipients, list):
            return frozenset()
        self._remember_domains(run, item.msg_id, [r for r in recipients if isinstance(r, str)])
        return run.domains[item.msg_id]

    @staticmethod
    def _unwoken(run: _Run, msg_id: str) -> None:
        """A message offered by ``_unpark`` reached a sender: its domain may offer the
        next one."""
        for domain in [d for d, (woken, _) in run.woken.items() if woken == msg_id]:
            del run.woken[domain]
            run.park_wake.set()

    def _unpark(self, run: _Run) -> float | None:
        """Offer again, one at a time per domain, parked messages whose domain is ready;
        returns the seconds until a domain is ready by time (None: only a finished send
        or a new park can make one ready)."""
        limiter = run.limiter
        if limiter is None:
            return None
        now = limiter.clock()
        next_at = math.inf
        for domain in list(run.parked):
            waiting = run.parked[domain]
            woken = run.woken.get(domain)
            if woken is not None:
                if now - woken[1] < 1.0:  # the one offered has not reached a sender yet
                    next_at = min(next_at, woken[1] + 1.0)
                    continue
                del run.woken[domain]
            at = limiter.ready_at(domain, now)
            if at > now:
                next_at = min(next_at, at)
                continue
            while waiting:
                msg_id = next(iter(waiting))
                item = waiting.pop(msg_id)
                if msg_id in run.pending or msg_id in run.dispatcher.claimed:
                    continue  # offered again meanwhile (a rescan, an operator)
                self._offer(run, msg_id, item.source)
                run.woken[domain] = (msg_id, now)
                next_at = min(next_at, now + 1.0)
                break
            if not waiting:
                del run.parked[domain]
        return None if math.isinf(next_at) else max(0.0, next_at - now)

    async def _unparker(self, run: _Run) -> None:
        while True:
            delay = self._unpark(run)
            run.park_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.park_wake.wait(), delay)

    async def _reaper(self, run: _Run) -> None:
        """Close connections nobody has used for ``idle_timeout``."""
        while True:
            await asyncio.sleep(min(1.0, run.pool.idle_timeout / 2))
            run.pool.reap()
            run.pool.trim(run.dispatcher.throttle.limit)

    async def _deliver(self, run: _Run, item: WorkItem, transport: Transport) -> None:
        task = asyncio.current_task()
        assert task is not None
        run.busy.add(task)
        try:
            state = await run.dispatcher.deliver(item, transport)
            if state == "requeued" and run.live:  # the relay failed, not the message
                self._offer(run, item.msg_id, "queued")
        except OSError as exc:  # SpoolError included: a full disk, say
            logger.error("spool error on message %s: %s", item.msg_id, exc)
            run.dispatcher.stats.store_error(exc)
            await asyncio.sleep(1.0)  # no hot loop while the disk is in trouble
            self._resume(run, item.msg_id)
        finally:
            run.busy.discard(task)

    def _resume(self, run: _Run, msg_id: str) -> None:
        """After a spool or journal error, see the message on to its next step at once
        (rather than at the end of the run): wherever it is now, it is offered, timed or,
        if the server accepted it, recorded as soon as the disk allows (never resent)."""
        dispatcher = run.dispatcher
        if msg_id in dispatcher.unsettled:
            run.settle_wake.set()
            return
        if msg_id in dispatcher.claimed:
            return  # another sender has it
        if msg_id in dispatcher.claiming:  # a claim in flight: look once it is decided
            asyncio.get_running_loop().call_later(0.05, self._resume, run, msg_id)
            return
        if os.path.lexists(self.spool.path("active", msg_id)):
            dispatcher.settle_claim(msg_id, None)
            if msg_id in dispatcher.unsettled:
                run.settle_wake.set()
                return
        found = self.spool.find(msg_id, ("queued", "deferred"))
        if found is None:
            return  # final, held, or gone
        if found[0] == "deferred":
            due = self._read_due("deferred", msg_id)
            if due is not None:
                self._schedule(run, msg_id, due)
        elif run.live:  # process_workload leaves it queued for the next run
            self._offer(run, msg_id, "queued")

    async def _settler(self, run: _Run) -> None:
        """Record, as soon as the disk allows, messages the server accepted while their
        records could not be written (their acceptance is kept in memory meanwhile)."""
        delay = 1.0
        while True:
            await run.settle_wake.wait()
            await asyncio.sleep(delay)
            run.dispatcher.retry_unsettled()  # rare, and its callbacks touch the loop
            if run.dispatcher.unsettled:
                delay = min(delay * 2, 30.0)
            else:
                run.settle_wake.clear()
                delay = 1.0

    async def process_workload(
        self, *, progress: Callable[[WorkloadSummary], None] | None = None,
    ) -> WorkloadSummary:
        """Deliver every message that is due now, then return what happened."""
        if self.store_url:
            return await self._deliver_from_store(drain=True, handle_signals=False)
        run = await self._open_run()
        try:
            await self._load_waiting(run, "deferred")
            await self._load_waiting(run, "scheduled")
            self._release_due(run)
            await self._scan_queued(run)
            self.workers = [asyncio.create_task(self._sender(run, drain=True, progress=progress))
                            for _ in range(self.spawn)]
            unparker = asyncio.create_task(self._unparker(run))
            try:
                await asyncio.gather(*self.workers)
            finally:
                unparker.cancel()
                await asyncio.gather(unparker, return_exceptions=True)
            return run.dispatcher.summary
        finally:
            for task in self.workers:
                task.cancel()
            await asyncio.gather(*self.workers, return_exceptions=True)
            await self._close_run(run)

    async def delegate_workload(self, *, handle_signals: bool = True) -> WorkloadSummary:
        """Deliver until ``stop()``, SIGTERM or SIGINT; then stop gracefully."""
        if self.store_url:
            return await self._deliver_from_store(drain=False, handle_signals=handle_signals)
        return await self._serve(await self._open_run(), handle_signals=handle_signals)

    def _pg_begin(self) -> None:
        if self._pg_done is not None and not self._pg_done.is_set():
            raise EssError("this manager is already delivering")
        self._pg_stop, self._pg_done = asyncio.Event(), asyncio.Event()

    async def _deliver_from_store(self, *, drain: bool, handle_signals: bool,
                                  begun: bool = False) -> WorkloadSummary:
        """A deliverer of the PostgreSQL store (any number run on any hosts; no
        workspace lock: leases keep them apart)."""
        if not begun:
            self._pg_begin()
        stop_event, done = self._pg_stop, self._pg_done
        assert stop_event is not None and done is not None
        try:
            return await deliver_from_store(self, stop_event, drain=drain,
                                            handle_signals=handle_signals)
        finally:
            done.set()

    async def _serve(self, run: _Run, *, handle_signals: bool) -> WorkloadSummary:
        try:
            await asyncio.to_thread(watcher.preload)
            with stop_on_signals(run.stop_event.set, enabled=handle_signals):
                watch_stop = asyncio.Event()
                run.live = True
                helpers = [asyncio.create_task(self._watch_queued(run, watch_stop)),
                    asyncio.create_task(watch_queued(
                        self.spool.dir("scheduled"),
                        lambda ids: self._load_waiting(run, "scheduled", ids), watch_stop,
                        on_ready=lambda: self._load_waiting(run, "scheduled"))),
                    asyncio.create_task(self._timers(run)),
                    asyncio.create_task(self._rescan(run)),
                    asyncio.create_task(self._settler(run)),
                    asyncio.create_task(self._reaper(run)),
                    asyncio.create_task(self._unparker(run))]
                if self.processes:  # senders in worker processes, fed from here
                    self._pool = workers.WorkerPool(self, run)
                    await self._pool.start()
                else:
                    self.workers = [asyncio.create_task(self._sender(run, drain=False))
                                    for _ in range(self.spawn)]
                await self._load_waiting(run, "deferred")
                await self._load_waiting(run, "scheduled")
                await self._scan_queued(run)
                logger.info("delivering %s with %d senders%s", self.workspace, self.spawn,
                            f" in each of {self.processes} processes" if self.processes else "")
                await self._start_metrics()
                await run.stop_event.wait()
                run.live = False
                watch_stop.set()
                if self._pool is not None:
                    await self._pool.stop()  # SIGTERM: each finishes within grace
                await self._shutdown(run, helpers)
                return run.dispatcher.summary
        finally:
            await self._stop_metrics()
            for task in self.workers:
                task.cancel()
            await asyncio.gather(*self.workers, return_exceptions=True)
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()  # every worker gone and settled before the lock goes
            await self._close_run(run)

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the worker processes delivering now (``processes``; else [])."""
        return self._pool.pids if self._pool is not None else []

    async def _shutdown(self, run: _Run, helpers: list[asyncio.Task[Any]]) -> None:
        for task in helpers:
            task.cancel()
        for task in self.workers:
            if task not in run.busy:
                task.cancel()  # idle: waiting on the queue, holding nothing
        in_flight = [t for t in self.workers if t in run.busy and not t.done()]
        if in_flight:
            logger.info("waiting up to %.0fs for %d in-flight sends", self.config.server.grace,
                        len(in_flight))
            _, late = await asyncio.wait(in_flight, timeout=self.config.server.grace)
            for task in late:
                # A send cut off here ends as outcome unknown if its data was sent,
                # else it goes back to queued/ untouched (see Dispatcher._attempt).
                task.cancel()
        await asyncio.gather(*helpers, *self.workers, return_exceptions=True)

    async def stop(self) -> None:
        """Stop delivering gracefully: in-flight sends finish, the rest stays queued."""
        if self._pg_stop is not None:
            self._pg_stop.set()
        run = self._run
        if run is not None:
            run.stop_event.set()
        task, self._serve_task = self._serve_task, None
        if task is not None:
            await task
        elif run is not None:
            await run.closed.wait()  # delegate_workload or process_workload in another task
        elif self._pg_done is not None:
            await self._pg_done.wait()  # the same, from the PostgreSQL store
        await self.flush_events(self.config.server.grace)

    # -- embedding -------------------------------------------------------------------

    async def __aenter__(self) -> Manager:
        if self.store_url:
            self._pg_begin()  # now: a stop() before the task starts must reach it
            self._serve_task = asyncio.create_task(
                self._deliver_from_store(drain=False, handle_signals=False, begun=True))
            return self
        run = await self._open_run()
        self._serve_task = asyncio.create_task(self._serve(run, handle_signals=False))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # -- metrics and health (issue 14 part 2) ----------------------------------------

    async def _start_metrics(self) -> None:
        if self.metrics_listen:
            host, port = parse_listen(self.metrics_listen, "server.metrics")
            server = MetricsServer(self, host, port)
            await server.start()
            self.metrics = server

    async def _stop_metrics(self) -> None:
        server, self.metrics = self.metrics, None
        if server is not None:
            await server.stop()


# Last: ess_async.workers builds on this module (its worker is a Manager).
from . import workers  # noqa: E402
