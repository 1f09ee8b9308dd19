"""Worker processes on one host (issue 12 part 2): ``serve --processes N``.

One supervisor process holds the workspace lock and does, once, what grows with the
backlog: it lists and watches ``queued/``, keeps the timers of ``deferred/`` and
``scheduled/``, and hands message ids to N deliverer processes, one ``<id> <folder>``
line at a time on each worker's stdin. A worker holds at most ``2 * spawn`` ids (credit:
it answers ``done <id> ...`` on its stdout once it no longer holds one), so no worker
hoards the queue and none lists a folder.

Each worker is a fresh interpreter (``python -c``, never a fork of a process with an
event loop and threads) running ``spawn`` senders with the file store's usual claims: an
id is claimed by the atomic rename into ``active/`` (a rename that fails: someone else
has it, skipped) and journaled in the worker's own ``journal/<name>.log``, held with an
flock on ``journal/<name>.lock`` for as long as the worker lives.

A worker that dies (SIGKILL, a crash) is noticed when its pipe closes and it is reaped:
the supervisor settles exactly the ids that worker held, from that worker's journal, as
recovery always does (accepted: finished as passed, never resent; the rest back to
``queued/`` or wherever their record says), and starts a replacement. A worker dies with
its supervisor (``PR_SET_PDEATHSIG``) and stops when its stdin closes; every start (and
``cleanup``, ``process``) reads ``journal.log`` and every ``journal/*.log`` together, once
their owners are gone.

The workspace-wide bounds are split: worker i of N gets ``max_connections // N`` (the
first ``max_connections % N`` one more) and ``max_per_second / N``. Push-back and an
unusable relay are the relay's: the worker that saw them reports ``pause <kind>`` and the
supervisor passes it on, so every worker pauses (each then probes for itself). Per-domain
limits (``[limits]``) hold per worker.

Lines from the supervisor: ``<id> <folder>``, ``pause pushback|down``. From a worker:
``ready``, ``done <id> <state> <due> <folder>``, ``event <json>``, ``pause ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib
import json
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .delivery import WorkItem
from .dkim import DkimSigner
from .errors import ConfigError, EssError
from .events import make_event
from .journal import Journal, replay
from .limits import DomainLimiter
from .manager import _CHUNK, Manager, _Run
from .metrics import LAST_ERROR_NAME
from .pool import TransportPool
from .sender import Dispatcher
from .spool import ID_PATTERN
from .throttle import Throttle
from .transports import Transport

__all__ = ("JOURNAL_DIR", "WorkerPool", "merge_entries", "remove_worker_journals",
           "worker_entries", "worker_main")

logger = logging.getLogger("ess_async.workers")

JOURNAL_DIR = "journal"  # in the workspace: <name>.log and <name>.lock per worker
CREDIT_PER_SENDER = 2  # ids a worker may hold per sender
_START_TIMEOUT = 60.0  # seconds for the first workers to say they are ready
_STOP_MARGIN = 10.0  # seconds past [server] grace before a worker that will not stop is killed
_OWNER_WAIT = 30.0  # seconds to wait for the owner of a worker journal to be gone
_SOURCES = frozenset({"queued", "deferred", "scheduled"})
_PAUSES = frozenset({"pushback", "down"})  # Throttle.push_back, Throttle.destination_down
# Tests: ESS_TEST_WORKER_CRASH_AT=w1=after_journal:3 sets ESS_TEST_CRASH_AT (faults.py)
# in the first process of that worker alone; no worker inherits ESS_TEST_CRASH_AT.
_CRASH_ENV = "ESS_TEST_WORKER_CRASH_AT"
# The worker imports this very package: its folder goes first on sys.path unless it is
# on it already (an installed package keeps the interpreter's order).
_ENTRY = ("import sys; d = sys.argv.pop(); d in sys.path or sys.path.insert(0, d); "
          "from ess_async.workers import worker_main; sys.exit(worker_main())")


# -- the journals of workers --------------------------------------------------------------


def journal_dir(workspace: Path) -> Path:
    return workspace / JOURNAL_DIR


def _rank(entry: dict[str, Any]) -> tuple[int, int]:
    if entry.get("op") != "accepted":
        return 0, 0
    attempt = entry.get("attempt")
    return 1, attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0


def merge_entries(*sources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per message from the last entries of several journals: an ``accepted``
    one wins (that of the highest attempt), else the later source's. A message is
    claimed by one process at a time, so at most one journal has its live claim; a stale
    acceptance of an earlier attempt is refused by ``settle_claim``'s attempt fence."""
    merged: dict[str, dict[str, Any]] = {}
    for entries in sources:
        for msg_id, entry in entries.items():
            old = merged.get(msg_id)
            if old is None or _rank(entry) >= _rank(old):
                merged[msg_id] = entry
    return merged


@contextlib.contextmanager
def _owner_gone(lock: Path, wait: float) -> Iterator[None]:
    """Hold the flock of a worker journal's lock file (its owner is dead), waiting up to
    ``wait`` seconds for it; nothing to hold if there is no such file."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield
        return
    try:
        deadline = time.monotonic() + wait
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                if time.monotonic() > deadline:
                    raise EssError(f"{lock.with_suffix('.log')} is still in use by pid "
                                   f"{pid} (a worker of an earlier run?)") from None
                if not warned:
                    logger.warning("waiting for pid %s, the owner of %s, to exit", pid,
                                   lock.with_suffix(".log"))
                    warned = True
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def worker_entries(workspace: Path, *, wait: float = _OWNER_WAIT) -> dict[str, dict[str, Any]]:
    """The last entries of every message in the worker journals (``journal/*.log``),
    merged; each is read once its owner is gone (blocking: run it off the loop)."""
    merged: dict[str, dict[str, Any]] = {}
    folder = journal_dir(workspace)
    if not folder.is_dir():
        return merged
    for log in sorted(folder.glob("*.log")):
        with _owner_gone(log.with_suffix(".lock"), wait):
            merged = merge_entries(merged, replay(log))
    return merged


def remove_worker_journals(workspace: Path) -> None:
    """Remove the worker journals whose owners are gone, once what they said is in
    ``journal.log`` (recovery settled it and compacted the unsettled rest there)."""
    folder = journal_dir(workspace)
    if not folder.is_dir():
        return
    names = {p.stem for p in folder.iterdir() if p.suffix in (".log", ".lock", ".compact")}
    for name in sorted(names):
        try:
            with _owner_gone(folder / f"{name}.lock", 0.0):
                for suffix in (".log", ".compact", ".lock"):
                    (folder / f"{name}{suffix}").unlink(missing_ok=True)
        except (EssError, OSError) as exc:
            logger.warning("cannot remove the worker journal %s now: %s", name, exc)


# -- the supervisor -------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker's place: the process now in it (replaced when it dies)."""

    name: str
    connections: int
    rate: float
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    starts: int = 0
    failures: int = 0  # deaths in a row before it was ready, or soon after
    last_code: int | None = None  # None: it could not be started
    outstanding: dict[str, str] = field(default_factory=dict)  # id -> folder handed from


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class WorkerPool:
    """The supervisor's side: starts ``manager.processes`` workers, feeds them from the
    run's queue, settles and replaces those that die, stops them gracefully."""

    def __init__(self, manager: Manager, run: _Run) -> None:
        self.manager = manager
        self.run = run
        processes = manager.processes
        smtp = manager.config.transport.smtp
        if smtp.max_connections and smtp.max_connections < processes:
            raise ConfigError("transport.smtp.max_connections",
                              f"{smtp.max_connections} is fewer than the {processes} worker "
                              "processes (each needs one connection)")
        connections = (_shares(smtp.max_connections, processes) if smtp.max_connections
                       else [manager.spawn] * processes)
        rate = smtp.max_per_second / processes if smtp.max_per_second else 0.0
        self.slots = [_Slot(f"w{i + 1}", connections[i], rate) for i in range(processes)]
        self.credit = CREDIT_PER_SENDER * manager.spawn
        self.changed = asyncio.Event()  # a worker got ready, freed credit or died
        self.stopping = False
        self._stopped = asyncio.Event()
        self._keepers: list[asyncio.Task[None]] = []
        self._feeder: asyncio.Task[None] | None = None

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None
                and s.proc.returncode is None]

    # -- starting and stopping ---------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each is ready (EssError if one is not)."""
        self._keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                while not all(slot.ready for slot in self.slots):
                    failed = next((s for s in self.slots if s.failures), None)
                    if failed is not None:
                        raise EssError(f"worker {failed.name} exited with {failed.last_code} "
                                       "before it was ready (its log is above)")
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            await self.close()
            raise EssError(f"the worker processes were not ready within "
                           f"{_START_TIMEOUT:.0f}s") from None
        except BaseException:
            await self.close()
            raise
        self._feeder = asyncio.create_task(self._feed())
        logger.info("%d worker processes ready: pids %s", len(self.slots),
                    ", ".join(map(str, self.pids)))

    async def _end_feeding(self) -> None:
        self.stopping = True
        self._stopped.set()
        if self._feeder is not None:
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)

    async def stop(self) -> None:
        """Graceful: SIGTERM every worker (each finishes its sends within ``[server]
        grace``), wait for them and settle what they held; kill one that does not stop."""
        await self._end_feeding()
        for slot in self.slots:
            self._signal(slot, signal.SIGTERM)
        if not self._keepers:
            return
        _, late = await asyncio.wait(self._keepers,
                                     timeout=self.manager.config.server.grace + _STOP_MARGIN)
        if late:
            logger.error("worker processes did not stop in time: killing them")
            await self.close()

    async def close(self) -> None:
        """Kill whatever worker still runs, wait for them and settle what they held."""
        await self._end_feeding()
        for slot in self.slots:
            self._signal(slot, signal.SIGKILL)
        await asyncio.gather(*self._keepers, return_exceptions=True)

    @staticmethod
    def _signal(slot: _Slot, sig: signal.Signals) -> None:
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        if proc.stdin is not None:
            proc.stdin.close()  # a worker also stops when its stdin closes

    # -- one worker's life ---------------------------------------------------------------

    async def _keep(self, slot: _Slot) -> None:
        """Run a worker in ``slot``; when it dies, settle it and start a replacement."""
        loop = asyncio.get_running_loop()
        delay = 0.0
        while not self.stopping:
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), delay)
                if self.stopping:
                    break
            started = loop.time()
            try:
                pid, code, ready = await self._run_slot(slot)
            except OSError as exc:  # cannot start a process now (EMFILE, EAGAIN...)
                logger.error("cannot start worker %s: %s", slot.name, exc)
                pid, code, ready = 0, None, False
            except Exception:  # a bug here must not leave the slot empty for good
                logger.exception("worker %s: unexpected error", slot.name)
                pid, code, ready = 0, None, False
            slot.last_code = code
            if self.stopping:
                break
            # Dead before it was ready, or soon after: back off (a broken worker must
            # not be restarted in a hot loop); else replace it at once.
            slot.failures = 0 if ready and loop.time() - started > 5.0 else slot.failures + 1
            self.changed.set()
            delay = 0.0 if slot.failures <= 1 else min(30.0, 0.5 * 2 ** slot.failures)
            logger.error("worker %s (pid %d) exited with %s: its claims are settled; "
                         "a replacement starts%s", slot.name, pid, code,
                         f" in {delay:.0f}s" if delay else "")

    async def _run_slot(self, slot: _Slot) -> tuple[int, int | None, bool]:
        """Start a worker in ``slot``, read its lines until it exits, then settle what it
        held. Returns its pid, exit code, and whether it was ever ready."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _ENTRY, pickle.dumps(self._setup(slot)).hex(),
            str(Path(__file__).resolve().parent.parent), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=self._env(slot), limit=1 << 24)
        slot.starts += 1
        slot.proc = proc
        if self.stopping:
            self._signal(slot, signal.SIGTERM)
        ready = False
        try:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                ready = self._line(slot, line) or ready
        except BaseException:
            self._signal(slot, signal.SIGKILL)
            raise
        finally:
            # Reaped: the worker's journal and its lock are closed now.
            code = await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            slot.proc = None
            slot.ready = False
            self.changed.set()
            if ready:  # else it never held its journal's lock, nor anything to settle
                await self._settle(slot, proc.pid, code)
        return proc.pid, code, ready

    def _setup(self, slot: _Slot) -> dict[str, Any]:
        manager = self.manager
        return {"workspace": str(manager.workspace), "name": slot.name,
                "spawn": manager.spawn, "connections": slot.connections, "rate": slot.rate,
                "config": manager.config, "events": manager.events is not None,
                "parent": os.getpid(),
                "log_level": logging.getLogger("ess_async").getEffectiveLevel(),
                "uvloop": type(asyncio.get_running_loop()).__module__.startswith("uvloop")}

    def _env(self, slot: _Slot) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("ESS_TEST_CRASH_AT", None)
        env.pop("ESS_STORE_URL", None)  # workers deliver the file store (see _WorkerManager)
        crash = env.pop(_CRASH_ENV, "")
        name, _, point = crash.partition("=")
        if name == slot.name and slot.starts == 0:
            env["ESS_TEST_CRASH_AT"] = point
        return env

    def _line(self, slot: _Slot, raw: bytes) -> bool:
        """Handle one line from a worker; True if it said it is ready."""
        kind, _, rest = raw.decode("utf-8", "replace").rstrip("\n").partition(" ")
        if kind == "done":
            self._done(slot, rest.split(" "))
        elif kind == "event":
            events = self.manager.events
            if events is not None:
                with contextlib.suppress(ValueError):
                    events.emit(json.loads(rest))
        elif kind == "ready":
            slot.ready = True
            self.changed.set()
            return True
        elif kind == "pause" and rest in _PAUSES:
            # Push-back or an unusable relay is the relay's: every worker pauses.
            for other in self.slots:
                proc = other.proc
                if other is not slot and proc is not None and proc.stdin is not None \
                        and not proc.stdin.is_closing():
                    proc.stdin.write(f"pause {rest}\n".encode())
        else:
            logger.warning("worker %s: unexpected line %r", slot.name, raw[:200])
        return False

    def _done(self, slot: _Slot, words: list[str]) -> None:
        """``done <id> <state> <due> <folder>``: the worker no longer holds the id (the
        last two are ``-`` unless it is now waiting in that folder until ``due``)."""
        if len(words) != 4 or slot.outstanding.pop(words[0], None) is None:
            logger.warning("worker %s: unexpected done %r", slot.name, words)
            return
        msg_id, state, due, folder = words
        run = self.run
        run.dispatcher.claimed.pop(msg_id, None)
        summary = run.dispatcher.summary
        if state in ("passed", "failed", "deferred", "corrupt"):
            setattr(summary, state, getattr(summary, state) + 1)
        if due != "-":
            with contextlib.suppress(ValueError):
                self.manager._schedule(run, msg_id, float(due),
                                       folder if folder in _SOURCES else "deferred")
        self.manager._finished(run, msg_id)
        self.changed.set()

    async def _settle(self, slot: _Slot, pid: int, code: int) -> None:
        """The worker in ``slot`` has exited: settle exactly the ids it held, from its
        journal (as recovery does), and offer or time each where it is now."""
        manager, run = self.manager, self.run
        log = journal_dir(manager.workspace) / f"{slot.name}.log"

        def read() -> dict[str, dict[str, Any]]:
            with _owner_gone(log.with_suffix(".lock"), _OWNER_WAIT):
                return replay(log)

        entries = await asyncio.to_thread(read)
        counts: dict[str, int] = {}
        kept: dict[str, dict[str, Any]] = {}  # accepted, not yet recorded (disk trouble)
        broken = False
        for msg_id, source in list(slot.outstanding.items()):
            run.dispatcher.claimed.pop(msg_id, None)
            try:
                entry = self._settle_one(slot.name, msg_id, source, entries.get(msg_id),
                                         counts)
            except Exception:  # the others are settled; the next start sees to this one
                logger.exception("message %s: cannot settle it now", msg_id)
                broken = True
                continue
            if entry is not None:
                kept[msg_id] = entry
        slot.outstanding.clear()
        keep_log = broken
        if kept:
            try:
                for entry in kept.values():
                    run.journal.append(entry)
                await run.journal.sync()
            except OSError as exc:
                logger.error("cannot copy %d acceptance(s) to the journal (%s): keeping "
                             "the journal of worker %s", len(kept), exc, slot.name)
                keep_log = True
        try:
            if keep_log:  # read again by the next start
                log.replace(log.with_name(f"{slot.name}-{pid}.log"))
            else:
                log.unlink(missing_ok=True)
                log.with_suffix(".compact").unlink(missing_ok=True)
        except OSError as exc:
            logger.error("cannot remove the journal of worker %s: %s", slot.name, exc)
        if counts:
            logger.info("worker %s (pid %d) exited with %s holding claims: %s", slot.name,
                        pid, code, counts)

    def _settle_one(self, worker: str, msg_id: str, source: str,
                    entry: dict[str, Any] | None, counts: dict[str, int],
                    ) -> dict[str, Any] | None:
        """Settle one id a dead worker held; returns its acceptance if the disk refused
        its record for now (the settler retries it; it is never sent again)."""
        manager, run = self.manager, self.run
        dispatcher = run.dispatcher
        if os.path.lexists(manager.spool.path("active", msg_id)):
            outcome = dispatcher.settle_claim(msg_id, entry)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "passed" and dispatcher.last_settled is not None:
                state, record = dispatcher.last_settled
                logger.info("message %s: accepted before worker %s died; recorded %s, not "
                            "sent again", msg_id, worker, state)
                dispatcher._done(record, state)
            elif outcome == "unsettled" and entry is not None:
                run.settle_wake.set()
                return entry
        manager._resume(run, msg_id)  # offered or timed where it is now
        if source == "scheduled":  # never claimed: still in scheduled/ (or gone)
            due = manager._read_due(source, msg_id)
            if due is not None:
                manager._schedule(run, msg_id, due, source)
        return None

    # -- handing out ids -------------------------------------------------------------

    def _pick(self) -> _Slot | None:
        free = [s for s in self.slots if s.ready and s.proc is not None
                and len(s.outstanding) < self.credit]
        return min(free, key=lambda s: len(s.outstanding)) if free else None

    async def _feed(self) -> None:
        """Hand the run's queue out to workers with credit, best priority first."""
        manager, run = self.manager, self.run
        while True:
            if self._pick() is None:
                self.changed.clear()
                await self.changed.wait()
                continue
            item = await run.queue.get()
            if run.backlog and run.queue.qsize() < _CHUNK // 2:
                manager._refill(run)
            if run.pending.get(item.msg_id) != item.source:
                continue  # stale: offered again from another folder since
            slot = self._pick()  # a worker may have died meanwhile
            if slot is None or slot.proc is None or slot.proc.stdin is None:
                run.queue.put_nowait(item)  # still pending: offered once a worker can
                continue
            del run.pending[item.msg_id]
            self._hand(slot, slot.proc.stdin, item)

    def _hand(self, slot: _Slot, stdin: asyncio.StreamWriter, item: WorkItem) -> None:
        slot.outstanding[item.msg_id] = item.source
        self.run.dispatcher.claimed[item.msg_id] = None  # never offered twice meanwhile
        if not stdin.is_closing():  # else it is dying: its settling sees to the id
            stdin.write(f"{item.msg_id} {item.source}\n".encode())


# -- the worker -----------------------------------------------------------------------------


class _Out:
    """The worker's protocol lines to the supervisor (a private copy of its stdout)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def send(self, line: str) -> None:
        if self.broken:
            return
        data = memoryview((line + "\n").encode())
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            self.broken = True  # the supervisor is gone: stdin's end stops this worker


class _SharedThrottle(Throttle):
    """A worker's throttle: push-back and an unusable relay, seen here or reported by
    another worker (through the supervisor), pause this worker too."""

    def __init__(self, max_concurrency: int, out: _Out, *, max_per_second: float) -> None:
        super().__init__(max_concurrency, max_per_second=max_per_second)
        self.out = out

    def _report(self, kind: str, before: int) -> None:
        if self.events != before:  # a new event, not the same burst
            self.out.send(f"pause {kind}")

    def push_back(self) -> None:
        before = self.events
        super().push_back()
        self._report("pushback", before)

    def destination_down(self) -> None:
        before = self.events
        super().destination_down()
        self._report("down", before)

    def seen_elsewhere(self, kind: str) -> None:
        before = self.events
        if kind == "pushback":
            super().push_back()
        elif kind == "down":
            super().destination_down()
        if self.events != before:
            logger.warning("another worker saw %s: pausing too (%d concurrent sends)",
                           "push-back" if kind == "pushback" else "the relay down",
                           self.limit)


class _WorkerManager(Manager):
    """A worker's Manager: its senders take what the supervisor hands them; no workspace
    lock, no listing, no timers (a message to wait goes back to the supervisor)."""

    def __init__(self, setup: dict[str, Any], out: _Out) -> None:
        config = setup["config"]
        # Events go to the supervisor, which emits them (its callback and webhook) once.
        config = replace(config, events=replace(config.events, webhook=""),
                         store=replace(config.store, url=""))
        super().__init__(setup["workspace"], spawn=setup["spawn"], config=config)
        self.name: str = setup["name"]
        self.connections: int = setup["connections"]
        self.rate: float = setup["rate"]
        self.forward_events: bool = setup["events"]
        self.out = out
        self.held: set[str] = set()  # ids handed to this worker, not yet done
        self._sending: set[str] = set()
        self._step_states: dict[str, str] = {}  # id -> the state its last step ended in
        self._waiting: dict[str, tuple[float, str]] = {}  # id -> (due, folder)
        self._lock_fd = -1

    def open_worker_run(self) -> _Run:
        self._ensure()
        folder = journal_dir(self.workspace)
        folder.mkdir(mode=0o700, exist_ok=True)
        lock = folder / f"{self.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EssError(f"{lock} is held by another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        path = folder / f"{self.name}.log"
        if replay(path):  # the supervisor settles and removes it before a replacement
            raise EssError(f"{path} holds claims that are not settled")
        journal = Journal(path)
        smtp = self.config.transport.smtp
        throttle = _SharedThrottle(self.connections, self.out, max_per_second=self.rate)
        dispatcher = Dispatcher(self.spool, journal, self.policy, clock=self.clock,
                                rand=self.rand, throttle=throttle)
        if self.config.server.delivery_log:
            fd = os.open(self.workspace / "delivery.log",
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            dispatcher.delivery_log = os.fdopen(fd, "a", encoding="utf-8")
        dispatcher.limiter = DomainLimiter(self.config.limits,
                                           default_concurrency=throttle.max_concurrency)
        dispatcher.stats.error_file = self.workspace / LAST_ERROR_NAME
        dispatcher.signer = DkimSigner.from_config(self.config.dkim, self.workspace)
        pool = TransportPool(self._transport_factory, idle_timeout=smtp.idle_timeout)
        run = _Run(dispatcher, journal, pool)
        dispatcher.on_deferred = lambda msg_id, due: self._schedule(run, msg_id, due)
        dispatcher.on_finished = lambda msg_id, state: self._step_done(run, msg_id, state)
        dispatcher.on_event = self._on_outcome
        run.live = True
        self._run = run
        return run

    async def close_worker_run(self, run: _Run) -> None:
        journal = run.journal
        dispatcher = run.dispatcher
        try:
            await run.pool.close()
            await dispatcher.drain()
            if run.compaction is not None:
                await asyncio.gather(run.compaction, return_exceptions=True)
            # What the server accepted and the disk has not recorded yet stays in the
            # journal for the supervisor; claims cut off are settled by it too.
            journal.live.update(dispatcher.unsettled)
            try:
                journal.compact_now()
            except OSError as exc:
                logger.critical("cannot rewrite the journal (%s): %d accepted message(s) "
                                "may be sent again", exc, len(dispatcher.unsettled))
        finally:
            journal.close()
            dispatcher.stats.close()
            if dispatcher.signer is not None:
                dispatcher.signer.close()
            if dispatcher.delivery_log is not None:
                dispatcher.delivery_log.close()
            self._run = None
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)

    async def read_ids(self, run: _Run, reader: asyncio.StreamReader) -> None:
        """Take the ids the supervisor hands out; its end of the pipe closing stops us."""
        while line := await reader.readline():
            msg_id, _, source = line.decode("ascii", "replace").strip().partition(" ")
            throttle = run.dispatcher.throttle
            if msg_id == "pause" and isinstance(throttle, _SharedThrottle):
                throttle.seen_elsewhere(source)
                continue
            if not ID_PATTERN.match(msg_id) or source not in _SOURCES or msg_id in self.held:
                logger.warning("worker %s: unexpected line %r", self.name, line[:200])
                continue
            self.held.add(msg_id)
            self._offer(run, msg_id, source)
        run.stop_event.set()

    # -- hooks of Manager: what leaves this worker goes back to the supervisor ---------

    def _schedule(self, run: _Run, msg_id: str, due: float, state: str = "deferred") -> None:
        self._waiting[msg_id] = (due, state)  # the supervisor keeps the timers
        asyncio.get_running_loop().call_soon(self._release, run, msg_id)

    def _step_done(self, run: _Run, msg_id: str, state: str) -> None:
        self._step_states[msg_id] = state
        self._finished(run, msg_id)
        asyncio.get_running_loop().call_soon(self._release, run, msg_id)

    def _emit(self, kind: str, record: dict[str, Any], recipients: list[str] | None = None,
              ) -> None:
        if self.forward_events:
            event = make_event(kind, record, self.clock(), recipients=recipients)
            self.out.send("event " + json.dumps(event, separators=(",", ":"), default=str))

    async def _deliver(self, run: _Run, item: WorkItem, transport: Transport) -> None:
        self._sending.add(item.msg_id)
        try:
            await super()._deliver(run, item, transport)
        finally:
            self._sending.discard(item.msg_id)
            self._release(run, item.msg_id)

    def _release(self, run: _Run, msg_id: str) -> None:
        """Say ``done`` once nothing here holds ``msg_id`` (not queued, parked, claimed,
        being sent or awaiting its record): the supervisor may hand it out again."""
        if msg_id not in self.held or msg_id in self._sending or msg_id in run.pending \
                or msg_id in run.dispatcher.claimed \
                or any(msg_id in waiting for waiting in run.parked.values()):
            return
        self.held.discard(msg_id)
        state = self._step_states.pop(msg_id, "-")
        due, folder = self._waiting.pop(msg_id, (None, "-"))
        self.out.send(f"done {msg_id} {state} {'-' if due is None else repr(due)} {folder}")


def _die_with_parent(parent: int) -> bool:
    """SIGKILL this process when its parent dies (Linux); False if it is gone already."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    return os.getppid() == parent


async def _work(setup: dict[str, Any], proto_in: int, out: _Out) -> int:
    loop = asyncio.get_running_loop()
    manager = _WorkerManager(setup, out)
    run = manager.open_worker_run()  # nothing else runs yet: blocking here is fine
    try:
        reader = asyncio.StreamReader(limit=1 << 16)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(proto_in, "rb", buffering=0))
        loop.add_signal_handler(signal.SIGTERM, run.stop_event.set)
        # Ctrl-C reaches the whole process group: the supervisor decides, with SIGTERM.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        helpers = [asyncio.create_task(manager.read_ids(run, reader)),
                   asyncio.create_task(manager._settler(run)),
                   asyncio.create_task(manager._reaper(run)),
                   asyncio.create_task(manager._unparker(run))]
        manager.workers = [asyncio.create_task(manager._sender(run, drain=False))
                           for _ in range(manager.spawn)]
        out.send("ready")
        try:
            await run.stop_event.wait()
            run.live = False
            await manager._shutdown(run, helpers)
        finally:
            for task in (*helpers, *manager.workers):
                task.cancel()
            await asyncio.gather(*helpers, *manager.workers, return_exceptions=True)
    finally:
        await manager.close_worker_run(run)
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """A worker process: ``python -c <_ENTRY> <setup>`` (started by ``WorkerPool``)."""
    argv = sys.argv[1:] if argv is None else argv
    setup = pickle.loads(bytes.fromhex(argv[0]))  # from our own supervisor, never a user
    if not _die_with_parent(setup["parent"]):
        return 0
    # The protocol gets private copies of stdin and stdout; fd 1 becomes stderr, so
    # nothing printed by accident (or by a child) can garble it.
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    logging.basicConfig(level=setup["log_level"], stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[{setup['name']}]: "
                               "%(message)s")
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if setup.get("uvloop"):
        with contextlib.suppress(ImportError):
            factory = importlib.import_module("uvloop").new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_work(setup, proto_in, _Out(proto_out)))
    except (EssError, ValueError, OSError) as exc:
        print(f"ess-async worker {setup['name']}: error: {exc}", file=sys.stderr)
        return 2
