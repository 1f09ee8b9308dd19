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
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import CONFIG_TEMPLATE, Config, load_config
from .enqueue import Enqueuer, GroupCommit, prepare
from .errors import EssError, MessageNotFound
from .journal import Journal, replay
from .lock import WorkspaceLock
from .ops import QueueOps
from .outcome import Outcome, message_id
from .retry import RetryPolicy
from .sender import Dispatcher, WorkItem, WorkloadSummary
from .spool import FINAL_STATES, CorruptRecord, Spool, priority_rank
from .throttle import Throttle
from .transports import Transport, create_transport
from .watcher import watch_queued

__all__ = ("Manager", "default_workspace")

logger = logging.getLogger("ess_async.manager")

JOURNAL_NAME = "journal.log"
_COMPACT_AFTER = 20_000  # journal entries
_RESCAN_SECONDS = 30.0  # safety net for watcher events that never came
_PRUNE_SECONDS = 600.0  # retention runs this often while serving


def default_workspace() -> Path:
    """``$ESS_DATA`` if set, else ``./ess_data``; always absolute."""
    return Path(os.environ.get("ESS_DATA") or "ess_data").absolute()


class _Run:
    """Everything that exists only while this manager is delivering."""

    def __init__(self, dispatcher: Dispatcher, journal: Journal) -> None:
        self.dispatcher = dispatcher
        self.journal = journal
        self.queue: asyncio.PriorityQueue[WorkItem] = asyncio.PriorityQueue()
        self.pending: dict[str, str] = {}  # id -> folder it was offered from
        self.timers: list[tuple[float, str, str]] = []  # (due, message id, folder)
        self.timed: dict[str, float] = {}  # id -> due time of its live timer entry
        self.timer_wake = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.busy: set[asyncio.Task[Any]] = set()
        self.live = False  # True while delegate_workload serves (new work is offered)
        self.closed = asyncio.Event()  # set once the run has settled and released the lock


class Manager:
    """Enqueue and deliver the messages of one workspace (see the README for the API)."""

    def __init__(self, workspace: str | os.PathLike[str] | None = None, *,
                 spawn: int | None = None, config: Config | None = None,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 transport_factory: Callable[[], Transport] | None = None) -> None:
        self.workspace = Path(workspace).absolute() if workspace else default_workspace()
        self.config = config if config is not None else load_config(self.config_path)
        if spawn is not None and (not isinstance(spawn, int) or spawn < 1):
            raise ValueError(f"spawn must be a positive integer, not {spawn!r}")
        self.spawn = spawn or self.config.server.spawn
        self.clock = clock
        self.rand = rand
        self.spool = Spool(self.workspace, max_size=self.config.server.max_message_size)
        self.policy = RetryPolicy.from_config(self.config.retry)
        self._transport_factory = transport_factory or (
            lambda: create_transport(self.config.transport, self.workspace))
        self._lock = WorkspaceLock(self.workspace)
        self._ensured = False
        self._run: _Run | None = None
        self._serve_task: asyncio.Task[WorkloadSummary] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self._commit = GroupCommit(Enqueuer(self.spool)).commit
        self.last_recovery: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    @property
    def config_path(self) -> Path:
        return self.workspace / "config.toml"

    def _ensure(self) -> None:
        if not self._ensured:
            self.spool.ensure()
            self._ensured = True

    # -- enqueueing ------------------------------------------------------------------

    async def create_work(self, *, priority: str = "normal", send_at: object = None,
                          idempotency_key: str | None = None, **attrs: Any) -> Path:
        """Validate and spool one message; the file is durable when this returns.

        ``attrs`` are the message (to, cc, bcc, from_, reply_to, subject, body, html,
        headers, attachments, tags); ``priority`` is high, normal or low; ``send_at`` a
        datetime before which it is not sent; ``idempotency_key`` makes a repeated call
        return the first message's path while that message is in the spool.
        """
        prepared = prepare(attrs, self.config.message, now=self.clock(), priority=priority,
                           send_at=send_at, idempotency_key=idempotency_key)
        self._ensure()
        path: Path = await self._commit(prepared)
        run = self._run
        if run is not None and run.live and path.stem == prepared.record["id"]:
            if prepared.state == "queued":
                self._offer(run, path.stem, "queued")
            else:
                self._schedule(run, path.stem, prepared.record["next_attempt_at"], "scheduled")
        return path

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
        """How many messages are in each state (a folder count; cheap)."""
        return self.spool.counts()

    async def wait(self, message: str | os.PathLike[str], *,
                   timeout: float | None = None) -> Outcome:
        """Wait until the message (an id or a path from ``create_work``) is passed, failed
        or quarantined, and return how it ended. It may be delivered by this manager or by
        another process. Raises TimeoutError, or MessageNotFound for an unknown id."""
        msg_id = message_id(str(message))
        event = self._waiters.setdefault(msg_id, asyncio.Event())
        delay = 0.005
        misses = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    found = self.spool.find(msg_id)
                    if found is None:
                        misses += 1  # it may be between two folders: look again first
                        if misses > 3:
                            raise MessageNotFound(msg_id)
                    elif found[0] in FINAL_STATES:
                        return self._outcome(*found)
                    else:
                        misses = 0
                    # Woken at once by this manager's senders, or by polling for others.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), delay)
                    delay = min(delay * 2, 0.5)
        finally:
            self._waiters.pop(msg_id, None)

    def _outcome(self, state: str, path: Path) -> Outcome:
        if state == "corrupt":
            return Outcome(id=path.stem, state=state, path=path)
        return Outcome.from_record(state, path, self.spool.read(path))

    # -- opening and closing a delivery run ------------------------------------------

    def _open_run(self) -> _Run:
        if self._run is not None:
            raise EssError("this manager is already delivering")
        self._ensure()
        self._lock.acquire()
        try:
            journal_path = self.workspace / JOURNAL_NAME
            entries = replay(journal_path)
            journal = Journal(journal_path)
            smtp = self.config.transport.smtp
            throttle = Throttle(smtp.max_connections or self.spawn,
                                max_per_second=smtp.max_per_second)
            log = None
            if self.config.server.delivery_log:
                fd = os.open(self.workspace / "delivery.log",
                             os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                log = os.fdopen(fd, "a", encoding="utf-8")
            dispatcher = Dispatcher(self.spool, journal, self.policy, clock=self.clock,
                                    rand=self.rand, throttle=throttle, delivery_log=log)
            self.last_recovery = settled = dispatcher.recover(entries)
            if any(settled.values()):
                logger.info("recovered claims from an earlier run: %s", settled)
            journal.compact(dispatcher.unsettled)
            self.spool.clean_tmp()
            self.prune()
        except BaseException:
            self._lock.release()
            raise
        run = _Run(dispatcher, journal)
        dispatcher.on_deferred = lambda msg_id, due: self._schedule(run, msg_id, due)
        dispatcher.on_finished = lambda msg_id, state: self._finished(run, msg_id)
        self._run = run
        return run

    async def _close_run(self, run: _Run) -> None:
        try:
            await run.dispatcher.drain()
            # Whatever is still claimed (a send cut off at the deadline) goes back to
            # queued/, or to passed/ if the journal shows the server accepted it.
            run.dispatcher.recover(replay(run.journal.path))
            run.journal.compact(run.dispatcher.unsettled)
        finally:
            run.journal.close()
            if run.dispatcher.delivery_log is not None:
                run.dispatcher.delivery_log.close()
            self._run = None
            self.workers = []
            self._lock.release()
            run.closed.set()

    async def cleanup(self) -> dict[str, int]:
        """Requeue claimed-but-unfinished messages (refused while a deliverer runs)."""
        run = self._open_run()
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

    def _offer_all(self, run: _Run, ids: list[str]) -> None:
        for msg_id in ids:
            self._offer(run, msg_id, "queued")

    def _scan_queued(self, run: _Run) -> None:
        for stray in self.spool.strays("queued"):
            with contextlib.suppress(OSError):
                self.spool.quarantine(stray, "not a message file name")
                logger.warning("quarantined stray spool entry %s", stray.name)
        self._offer_all(run, self.spool.ids("queued"))

    def _load_waiting(self, run: _Run, state: str, ids: list[str] | None = None) -> None:
        """Set a timer for each message in ``deferred/`` or ``scheduled/``."""
        for msg_id in self.spool.ids(state) if ids is None else ids:
            path = self.spool.path(state, msg_id)
            try:
                due = float(self.spool.read(path).get("next_attempt_at") or 0)
            except FileNotFoundError:
                continue
            except (CorruptRecord, TypeError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    self.spool.quarantine(path, getattr(exc, "reason", str(exc)))
                continue
            self._schedule(run, msg_id, due, state)

    def _schedule(self, run: _Run, msg_id: str, due: float, state: str = "deferred") -> None:
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
        waiter = self._waiters.get(msg_id)
        if waiter is not None:
            waiter.set()
        self._maybe_compact(run)

    def _maybe_compact(self, run: _Run) -> None:
        journal = run.journal
        if journal.entries_written >= _COMPACT_AFTER and not journal.syncing:
            journal.compact([*run.dispatcher.unsettled,
                             *(e for e in run.dispatcher.claimed.values() if e is not None)])

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
            await asyncio.sleep(_RESCAN_SECONDS)
            self._scan_queued(run)
            self._load_waiting(run, "scheduled")
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
            if days or count:
                removed += self.spool.prune(state, max_age=days * 86400, max_count=count,
                                            now=self.clock())
        if removed:
            logger.info("retention removed %d old record(s)", removed)
        return removed

    # -- senders ---------------------------------------------------------------------

    async def _sender(self, run: _Run, *, drain: bool,
                      progress: Callable[[WorkloadSummary], None] | None = None) -> None:
        transport = self._transport_factory()
        throttle = run.dispatcher.throttle
        try:
            while not run.stop_event.is_set():
                if drain:
                    if throttle.paused:
                        return  # the server pushed back: leave the rest for the next run
                    try:
                        item = run.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                else:
                    item = await run.queue.get()
                if run.pending.get(item.msg_id) != item.source:
                    continue  # stale: offered again from another folder since
                del run.pending[item.msg_id]
                if throttle.paused or throttle.active >= throttle.limit:
                    # The server pushed back (or the cap is reached): a sender that must
                    # wait gives up its connection, so fewer stay open meanwhile.
                    await transport.close()
                async with throttle:
                    await self._deliver(run, item, transport)
                if progress:
                    progress(run.dispatcher.summary)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.close(), 5)

    async def _deliver(self, run: _Run, item: WorkItem, transport: Transport) -> None:
        task = asyncio.current_task()
        assert task is not None
        run.busy.add(task)
        try:
            await run.dispatcher.deliver(item, transport)
        except OSError as exc:  # SpoolError included: a full disk, say
            logger.error("spool error on message %s: %s", item.msg_id, exc)
            await asyncio.sleep(1.0)  # no hot loop while the disk is in trouble
            # Settle the claim now rather than at the end of the run: back to queued/ if
            # nothing was sent; an accepted one keeps its journal entry (never resent).
            accepted = next((e for e in run.dispatcher.unsettled
                             if e["id"] == item.msg_id), None)
            if os.path.lexists(self.spool.path("active", item.msg_id)) and \
                    run.dispatcher.settle_claim(item.msg_id, accepted) == "requeued" and \
                    run.live:
                self._offer(run, item.msg_id, "queued")  # process_workload leaves it queued
        finally:
            run.busy.discard(task)

    async def process_workload(
        self, *, progress: Callable[[WorkloadSummary], None] | None = None,
    ) -> WorkloadSummary:
        """Deliver every message that is due now, then return what happened."""
        run = self._open_run()
        try:
            self._load_waiting(run, "deferred")
            self._load_waiting(run, "scheduled")
            self._release_due(run)
            self._scan_queued(run)
            self.workers = [asyncio.create_task(self._sender(run, drain=True, progress=progress))
                            for _ in range(self.spawn)]
            await asyncio.gather(*self.workers)
            return run.dispatcher.summary
        finally:
            for task in self.workers:
                task.cancel()
            await asyncio.gather(*self.workers, return_exceptions=True)
            await self._close_run(run)

    async def delegate_workload(self, *, handle_signals: bool = True) -> WorkloadSummary:
        """Deliver until ``stop()``, SIGTERM or SIGINT; then stop gracefully."""
        return await self._serve(self._open_run(), handle_signals=handle_signals)

    async def _serve(self, run: _Run, *, handle_signals: bool) -> WorkloadSummary:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        try:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                        loop.add_signal_handler(sig, run.stop_event.set)
                        installed.append(sig)
            watch_stop = asyncio.Event()
            helpers = [asyncio.create_task(watch_queued(
                self.spool.dir("queued"), lambda ids: self._offer_all(run, ids), watch_stop,
                on_ready=lambda: self._scan_queued(run))),
                asyncio.create_task(watch_queued(
                    self.spool.dir("scheduled"),
                    lambda ids: self._load_waiting(run, "scheduled", ids), watch_stop,
                    on_ready=lambda: self._load_waiting(run, "scheduled")))]
            self._load_waiting(run, "deferred")
            self._load_waiting(run, "scheduled")
            self._scan_queued(run)
            run.live = True
            helpers += [asyncio.create_task(self._timers(run)),
                        asyncio.create_task(self._rescan(run))]
            self.workers = [asyncio.create_task(self._sender(run, drain=False))
                            for _ in range(self.spawn)]
            logger.info("delivering %s with %d senders", self.workspace, self.spawn)
            await run.stop_event.wait()
            run.live = False
            watch_stop.set()
            await self._shutdown(run, helpers)
            return run.dispatcher.summary
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for task in self.workers:
                task.cancel()
            await asyncio.gather(*self.workers, return_exceptions=True)
            await self._close_run(run)

    async def _shutdown(self, run: _Run, helpers: list[asyncio.Task[Any]]) -> None:
        for task in helpers:
            task.cancel()
        for task in self.workers:
            if task not in run.busy:
                task.cancel()  # idle: waiting on the queue, holding nothing
        in_flight = [t for t in self.workers if not t.done()]
        if in_flight:
            logger.info("waiting up to %.0fs for %d in-flight sends", self.config.server.grace,
                        len(in_flight))
            _, late = await asyncio.wait(in_flight, timeout=self.config.server.grace)
            for task in late:
                task.cancel()
        await asyncio.gather(*helpers, *self.workers, return_exceptions=True)

    async def stop(self) -> None:
        """Stop delivering gracefully: in-flight sends finish, the rest stays queued."""
        run = self._run
        if run is not None:
            run.stop_event.set()
        task, self._serve_task = self._serve_task, None
        if task is not None:
            await task
        elif run is not None:
            await run.closed.wait()  # delegate_workload or process_workload in another task

    # -- embedding -------------------------------------------------------------------

    async def __aenter__(self) -> Manager:
        run = self._open_run()
        self._serve_task = asyncio.create_task(self._serve(run, handle_signals=False))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
