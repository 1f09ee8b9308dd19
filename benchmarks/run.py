"""ess_async benchmarks: the SMTP ceiling and ess_async measured in one run, on loopback.

    python benchmarks/run.py [--quick] [--json OUT] [--dir DIR] [--processes-only]

Starts its own sink process (benchmarks/sink.py, 127.0.0.1 only) and measures

1. the sink's own ceiling (a raw pipelining client) and a bare aiosmtplib client's with
   K persistent connections (K = 1, 3, 4, 16), plus ess_async's own SMTP transport with
   no spool (K = 3, 16), to tell protocol cost from spool cost;
2. durable enqueue: ``await Manager.create_work`` from 1 task and from 50 concurrent
   tasks, and the synchronous ``Client.create_work``;
3. end to end: a queued backlog delivered by ``process_workload()`` with spawn K = 3, 16,
   start to the last message at the sink, and its ratio to the ceiling at the same K;
4. latency while serving idle (``async with Manager``): create_work -> at the sink;
5. scale: 1k / 10k / 100k queued (--quick: 1k / 5k), each drained in its own process:
   start-up, the scan, peak RSS of that process (wait4's ru_maxrss), msgs/s.
6. worker processes: a backlog served by ``python -m ess_async serve`` in one process
   and with ``--processes 1`` and ``2`` (issue 12 part 2), start to the last message at
   the sink (interpreter start-ups included) and steady msgs/s (first to last message);
   ``--processes-only`` runs these alone;
7. the PostgreSQL store (``benchmarks/postgres.py``, fsync and synchronous_commit on;
   skipped without PostgreSQL's server binaries): 50 concurrent create_work callers, a
   backlog drained by 1 and by 3 ``serve --store`` processes, peak connections;
8. ``--scale N`` alone (e.g. ``--scale 1000000``; off by default, it takes minutes): a
   backlog of N served (``async with Manager``, as ``serve`` does) for ``--window``
   seconds, then a forced rescan, beside a 1k backlog served the same way in the same
   run: time to first delivery, the largest gap of a 10 ms ticker during start-up and
   during the rescan, msgs/s over the window, peak RSS (issue 11 item 5).

Every figure comes with a correctness check: the sink received exactly N messages, N
distinct (no loss, no duplicate). Enqueued messages are delivered afterwards (untimed) to
check them too. Prints a table, the targets met or missed, and writes JSON. Not a test:
the numbers depend on the machine and on what else runs on it (the load average is
recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib

from ess_async import Client, Manager
from ess_async.config import Config, parse_config
from ess_async.message import build_message
from ess_async.spool import Spool, new_id, new_record
from ess_async.transports.smtp import SMTPTransport

HERE = Path(__file__).resolve().parent
# ~2 KB of text in 72-column lines (as mail is written: a single long line would be sent
# quoted-printable, which is neither typical nor free).
BODY = "".join(f"{line}\n" for line in textwrap.wrap(
    "The quick brown fox jumps over the lazy dog. " * 45, 72))[:2000] + "\n"

# Targets from the issue, checked at the end of a run.
# Issue 11: end to end (durable, pipelining sink) >= 5,000 msgs/s and >= 1.5 x the best
# bare aiosmtplib figure; without PIPELINING >= 1.0 x bare aiosmtplib at the same K.
TARGET_E2E_RATE, TARGET_E2E_RATIO, TARGET_E2E_LOCKSTEP = 5000.0, 1.5, 1.0
TARGET_ENQUEUE, TARGET_SYNC_ENQUEUE = 3000.0, 2500.0
TARGET_P50_MS, TARGET_P99_MS = 2.0, 10.0
TARGET_RSS_MB, TARGET_SCALE_DROP, TARGET_SCAN_S = 150.0, 0.20, 5.0

CHECKS: dict[str, dict[str, Any]] = {}


class Sink:
    """The sink process and a (blocking) control connection to it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "sink.py")],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        port, ctl = self.proc.stdout.readline().split()
        self.port = int(port)
        self.ctl_port = int(ctl)
        self.ctl = socket.create_connection(("127.0.0.1", self.ctl_port))
        self.ctl_file = self.ctl.makefile("rb")

    def _ask(self, command: str) -> bytes:
        self.ctl.sendall(command.encode() + b"\n")
        return self.ctl_file.readline()

    def count(self) -> int:
        return int(self._ask("COUNT"))

    def stats(self) -> dict[str, Any]:
        return json.loads(self._ask("STATS"))  # type: ignore[no-any-return]

    def wait(self, n: int, timeout: float = 60.0) -> dict[str, Any]:
        """STATS once n messages have arrived, with "at": when the n-th one did."""
        return json.loads(self._ask(f"WAIT {n} {timeout}"))  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._ask("RESET")

    def close(self) -> None:
        self.ctl.close()
        self.proc.kill()
        self.proc.wait()


class AsyncControl:
    """A control connection for code running on an event loop (never blocks it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> AsyncControl:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 26))

    async def wait(self, n: int, timeout: float = 60.0) -> dict[str, Any]:
        self.writer.write(f"WAIT {n} {timeout}\n".encode())
        return json.loads(await self.reader.readline())  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        self.writer.write(b"STATS\n")
        return json.loads(await self.reader.readline())  # type: ignore[no-any-return]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# [transport.smtp] pipelining for every case ("auto": the sink offers PIPELINING, so
# ess_async pipelines where the installed version can; "off": one command at a time).
PIPELINING = "auto"


def config_for(port: int, pipelining: str | None = None) -> Config:
    smtp: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if pipelining_supported():
        smtp["pipelining"] = pipelining or PIPELINING
    return parse_config({"message": {"from": "bench@example.com"},
                         "transport": {"smtp": smtp}})


def pipelining_supported() -> bool:
    """Whether this ess_async has the pipelining transport (issue 11 item 1)."""
    return importlib.util.find_spec("ess_async.transports.pipelining") is not None


def run_loop(coro: Awaitable[Any], loop: str = "asyncio") -> Any:
    """Run ``coro`` on asyncio's own event loop or on uvloop."""
    factory = None
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def attrs(i: int, prefix: str = "m") -> dict[str, Any]:
    return {"to": f"user{i % 100}@example.com", "subject": f"{prefix}{i}", "body": BODY}


def raw_message(i: int, prefix: str = "c") -> bytes:
    return (f"From: bench@example.com\r\nTo: user@example.com\r\nSubject: {prefix}{i}\r\n\r\n"
            + BODY.replace("\n", "\r\n")).encode()


def checked(sink: Sink, expected: int, what: str) -> dict[str, Any]:
    """The sink must hold exactly ``expected`` distinct messages; print and record it."""
    stats = sink.wait(expected, timeout=60)
    time.sleep(0.05)  # anything sent twice would arrive right behind
    stats = {**stats, **sink.stats()}
    ok = stats["count"] == expected and stats["distinct"] == expected
    CHECKS[what] = {"expected": expected, "count": stats["count"],
                    "distinct": stats["distinct"], "ok": ok}
    print(f"  check {what}: sink has {stats['count']}/{expected} messages, "
          f"{stats['distinct']} distinct: {'OK' if ok else 'FAILED'}", file=sys.stderr)
    if not ok:
        raise SystemExit(f"{what}: correctness check failed: {CHECKS[what]}")
    return stats


class CPU:
    """CPU time spent in a block: the whole process (all threads) and the calling thread
    alone (the event loop's), per message."""

    def __enter__(self) -> CPU:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._process = usage.ru_utime + usage.ru_stime
        self._thread = time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.process = usage.ru_utime + usage.ru_stime - self._process
        self.thread = time.thread_time() - self._thread

    def per(self, n: int) -> dict[str, float]:
        return {"cpu us/msg": self.process / n * 1e6, "loop cpu us/msg": self.thread / n * 1e6}


def best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the highest ``key`` (other tenants of the machine only slow us down)."""
    return max(runs, key=lambda r: r[key])


# -- 1. ceilings ---------------------------------------------------------------------


async def sink_ceiling(sink: Sink, n: int) -> dict[str, Any]:
    """A raw client that pipelines whole transactions: what the sink itself can take."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port, limit=1 << 24)
    await reader.readline()
    writer.write(b"EHLO bench\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    transactions = [b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
                    + raw_message(i, "s") + b"\r\n.\r\n" for i in range(n)]
    sink.reset()
    start = time.perf_counter()
    for offset in range(0, n, 100):
        writer.write(b"".join(transactions[offset:offset + 100]))
        await writer.drain()
    replies = 0
    while replies < 4 * n:  # MAIL, RCPT, DATA (354), end of data
        replies += (await reader.read(1 << 20)).count(b"\r\n")
    elapsed = time.perf_counter() - start
    writer.close()
    checked(sink, n, "sink ceiling")
    return {"msgs/s": n / elapsed, "n": n}


async def client_ceiling(sink: Sink, n: int, k: int) -> dict[str, Any]:
    """A bare aiosmtplib client with k persistent connections (no spool, no durability):
    connected first, then timed from the first MAIL to the last reply."""
    messages = [raw_message(i) for i in range(n)]
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
               for _ in range(k)]
    await asyncio.gather(*(c.connect() for c in clients))
    sink.reset()

    async def connection(smtp: aiosmtplib.SMTP, j: int) -> None:
        for i in range(j, n, k):
            await smtp.sendmail("bench@example.com", ["user@example.com"], messages[i])

    with CPU() as cpu:
        start = time.perf_counter()
        await asyncio.gather(*(connection(c, j) for j, c in enumerate(clients)))
        elapsed = time.perf_counter() - start
    await asyncio.gather(*(c.quit() for c in clients))
    checked(sink, n, f"ceiling k={k}")
    return {"msgs/s": n / elapsed, "n": n, **cpu.per(n)}


async def transport_ceiling(sink: Sink, n: int, k: int) -> dict[str, Any]:
    """ess_async's own SMTPTransport.send from k tasks, without spool or journal: the
    SMTP part of end to end on its own."""
    config = config_for(sink.port).transport.smtp
    transports = [SMTPTransport(config) for _ in range(k)]
    messages = [raw_message(i, "t") for i in range(n)]
    for t in transports:  # connect (and EHLO) before timing, as for the bare client
        await t.send("bench@example.com", ["user@example.com"], raw_message(-1, "warm"))
    sink.reset()

    async def sender(t: SMTPTransport, j: int) -> None:
        for i in range(j, n, k):
            await t.send("bench@example.com", ["user@example.com"], messages[i])

    with CPU() as cpu:
        start = time.perf_counter()
        await asyncio.gather(*(sender(t, j) for j, t in enumerate(transports)))
        elapsed = time.perf_counter() - start
    await asyncio.gather(*(t.close() for t in transports))
    checked(sink, n, f"transport k={k}")
    return {"msgs/s": n / elapsed, "n": n, **cpu.per(n)}


# -- 2. enqueue ----------------------------------------------------------------------


async def drain_check(ws: Path, sink: Sink, n: int, what: str) -> None:
    """Deliver what a benchmark queued (untimed) and check the sink got all of it."""
    sink.reset()
    summary = await Manager(ws, spawn=16, config=config_for(sink.port)).process_workload()
    assert summary.passed == n, summary
    checked(sink, n, what)


async def enqueue(base: Path, n: int, sink: Sink, *, verify: bool = True
                  ) -> dict[str, dict[str, Any]]:
    config = config_for(sink.port)
    results: dict[str, dict[str, Any]] = {}

    async def single(ws: Path) -> None:
        manager = Manager(ws, config=config)
        for i in range(n):
            await manager.create_work(**attrs(i))

    async def concurrent(ws: Path) -> None:
        manager = Manager(ws, config=config)

        async def caller(offset: int) -> None:
            for i in range(offset, n, 50):
                await manager.create_work(**attrs(i))

        await asyncio.gather(*[caller(j) for j in range(50)])

    async def sync_client(ws: Path) -> None:
        client = Client(ws, config=config)
        for i in range(n):
            client.create_work(**attrs(i))

    cases: list[tuple[str, Callable[[Path], Awaitable[None]]]] = [
        ("create_work, 1 task", single), ("create_work, 50 tasks", concurrent),
        ("Client (sync)", sync_client)]
    for name, case in cases:
        ws, create_us = new_workspace(base)
        with CPU() as cpu:
            start = time.perf_counter()
            await case(ws)
            elapsed = time.perf_counter() - start
        queued = len(os.listdir(ws / "queued"))
        if queued != n:
            raise SystemExit(f"enqueue {name}: {queued} files in queued/, expected {n}")
        results[name] = {"msgs/s": n / elapsed, "n": n, "create us": create_us,
                         **cpu.per(n)}
        if verify:
            await drain_check(ws, sink, n, f"enqueue {name}")
        shutil.rmtree(ws, ignore_errors=True)
    return results


# -- 3. end to end -------------------------------------------------------------------


def prequeue(ws: Path, n: int) -> None:
    """Fill queued/ fast: one rendered message, n records with their own ids (and their
    own Subject header, which the sink uses to find duplicates)."""
    spool = Spool(ws)
    spool.ensure()
    spec = build_message({"from_": "bench@example.com", **attrs(0, "q")})
    base = new_record(spec, time.time())
    marker = "\r\nSubject: q0\r\n"
    assert base["raw"].count(marker) == 1
    for offset in range(0, n, 1000):
        batch = [("queued", {**base, "id": new_id(), "subject": f"q{i}",
                             "raw": base["raw"].replace(marker, f"\r\nSubject: q{i}\r\n")})
                 for i in range(offset, min(n, offset + 1000))]
        for result in spool.write_many(batch):
            if isinstance(result, Exception):
                raise result


async def end_to_end(base: Path, sink: Sink, n: int, k: int,
                     pipelining: str = "auto") -> dict[str, Any]:
    ws, create_us = new_workspace(base)
    prequeue(ws, n)
    manager = Manager(ws, spawn=k, config=config_for(sink.port, pipelining))
    sink.reset()
    with CPU() as cpu:
        start = time.monotonic()
        summary = await manager.process_workload()
        returned = time.monotonic()
    assert summary.passed == n, summary
    stats = checked(sink, n, f"end to end k={k} pipelining {pipelining}")
    shutil.rmtree(ws, ignore_errors=True)
    return {"msgs/s": n / (stats["at"] - start), "n": n,
            "to return msgs/s": n / (returned - start),
            "first delivery s": stats["first"] - start, "create us": create_us,
            **cpu.per(n)}


# -- 4. latency ----------------------------------------------------------------------


async def latency(base: Path, sink: Sink, n: int, *, warmup: int = 10,
                  gap: float = 0.002) -> dict[str, Any]:
    """One message at a time to a serving manager; each is timed from the create_work
    call to its arrival at the sink (the sink's clock), then ``gap`` seconds of idle."""
    ws, create_us = new_workspace(base)
    sink.reset()
    control = await AsyncControl.open(sink.ctl_port)
    total: list[float] = []
    enqueue_ms: list[float] = []
    async with Manager(ws, spawn=3, config=config_for(sink.port)) as manager:
        await asyncio.sleep(0.5)  # let the watchers settle: "serve idle"
        for i in range(warmup + n):
            start = time.monotonic()
            await manager.create_work(**attrs(i, "lat"))
            queued = time.monotonic()
            reply = await control.wait(i + 1, timeout=30)
            if reply["at"] is None:
                raise SystemExit(f"latency: message {i} never arrived")
            if i >= warmup:
                total.append((reply["at"] - start) * 1000)
                enqueue_ms.append((queued - start) * 1000)
            await asyncio.sleep(gap)
    await control.close()
    checked(sink, warmup + n, "latency")
    shutil.rmtree(ws, ignore_errors=True)
    total.sort()

    def pct(p: float) -> float:
        return total[min(len(total) - 1, int(len(total) * p))]

    return {"n": n, "p50 ms": statistics.median(total), "p90 ms": pct(0.90),
            "p99 ms": pct(0.99), "max ms": total[-1],
            "create_work p50 ms": statistics.median(enqueue_ms), "create us": create_us}


# -- 6. worker processes (issue 12 part 2) ---------------------------------------------


def served(base: Path, sink: Sink, n: int, k: int, processes: int) -> dict[str, Any]:
    """A prequeued backlog drained by a ``serve`` process (``processes`` > 0: through that
    many worker processes), timed from its start to the last message at the sink."""
    ws, create_us = new_workspace(base)
    prequeue(ws, n)
    smtp = f'host = "127.0.0.1"\nport = {sink.port}\n'
    if pipelining_supported():
        smtp += f'pipelining = "{PIPELINING}"\n'
    (ws / "config.toml").write_text('[message]\nfrom = "bench@example.com"\n\n'
                                    f"[transport.smtp]\n{smtp}")
    extra = ["--processes", str(processes)] if processes else []
    sink.reset()
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ess_async", "--log-level", "WARNING",
                             "serve", "--workspace", str(ws), "--spawn", str(k), *extra])
    try:
        stats = checked(sink, n, f"serve processes={processes} k={k}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    if code != 0:
        raise SystemExit(f"serve --processes {processes}: exited with {code}")
    shutil.rmtree(ws, ignore_errors=True)
    return {"n": n, "spawn": k, "processes": processes, "msgs/s": n / (stats["at"] - start),
            "start s": stats["first"] - start,
            "steady msgs/s": (n - 1) / max(stats["at"] - stats["first"], 1e-9),
            "create us": create_us}


def processes_cases(base: Path, sink: Sink, n: int, repeats: int) -> list[dict[str, Any]]:
    return [best([timed(f"serve, processes {p}", lambda p=p: served(base, sink, n, 16, p))
                  for _ in range(repeats)], "steady msgs/s") for p in (0, 1, 2)]


def processes_main(args: argparse.Namespace) -> int:
    """``--processes-only``: the worker-process cases alone."""
    args.dir.mkdir(parents=True, exist_ok=True)
    n = 1000 if args.quick else 4000
    base = Path(tempfile.mkdtemp(dir=args.dir))
    sink = Sink()
    try:
        rows = processes_cases(base, sink, n, 1 if args.quick else 2)
    finally:
        sink.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nnproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; N = {n}, spawn 16")
    for row in rows:
        print(f"  {processes_label(row)}")
    args.json.write_text(json.dumps({"machine": machine(args.quick), "processes": rows},
                                    indent=2))
    return 0


def processes_label(row: dict[str, Any]) -> str:
    how = f"--processes {row['processes']}" if row["processes"] else "one process"
    return (f"serve, {how}: {row['msgs/s']:,.0f} msgs/s from start (first delivery "
            f"{row['start s']:.2f}s), steady {row['steady msgs/s']:,.0f} msgs/s")


# -- 5. scale (each size drained in its own process, for its peak RSS) -----------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def scale_child(ws: Path, port: int, ctl_port: int, n: int, k: int) -> dict[str, Any]:
    """Runs in its own process: drain the backlog at ``ws``; time the parts of start-up."""
    manager = Manager(ws, spawn=k, config=config_for(port))
    parts: dict[str, float] = {}

    def timed_part(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    # Instance attributes shadow the methods: process_workload calls these wrappers.
    manager._open_run = timed_part("open s", manager._open_run)  # type: ignore[method-assign]
    manager._scan_queued = timed_part(  # type: ignore[method-assign]
        "scan s", manager._scan_queued)
    baseline = _rss_mb()
    with CPU() as cpu:
        start = time.monotonic()
        summary = await manager.process_workload()
        returned = time.monotonic()
    assert summary.passed == n, summary
    with socket.create_connection(("127.0.0.1", ctl_port)) as ctl:
        ctl.sendall(f"WAIT {n} 60\n".encode())
        stats = json.loads(ctl.makefile("rb").readline())
    return {"n": n, "spawn": k, "start s": stats["first"] - start,
            "open s": parts.get("open s", 0.0), "scan s": parts.get("scan s", 0.0),
            "msgs/s": n / (stats["at"] - start), "to return msgs/s": n / (returned - start),
            "steady msgs/s": (n - 1) / max(stats["at"] - stats["first"], 1e-9),
            "baseline RSS MB": baseline, **cpu.per(n)}


def scale(base: Path, sink: Sink, n: int, k: int) -> dict[str, Any]:
    ws, create_us = new_workspace(base)
    t = time.perf_counter()
    prequeue(ws, n)
    seeded = time.perf_counter() - t
    sink.reset()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--scale-child", str(n), "--ws", str(ws), "--port",
         str(sink.port), "--ctl", str(sink.ctl_port), "--spawn", str(k)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"scale {n}: child exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    checked(sink, n, f"scale {n}")
    result["peak RSS MB"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["seed s"] = seeded
    result["create us"] = create_us
    shutil.rmtree(ws, ignore_errors=True)
    return result


# -- 7. a huge backlog served (--scale N; issue 11 item 5) ------------------------------

TARGET_BIG_START_S, TARGET_BIG_GAP_MS, TARGET_BIG_RSS_MB = 5.0, 50.0, 300.0


def fill_copies(ws: Path, n: int) -> None:
    """Fill queued/ fast, unsynced: one valid record written n times with its own id and
    Subject (the sink finds duplicates by Subject)."""
    prequeue(ws, 1)
    queued = Spool(ws).dir("queued")
    (name,) = os.listdir(queued)
    data = (queued / name).read_bytes()
    old_id = name[:-5].encode()
    assert data.count(b"Subject: q0\\r\\n") == 1
    os.unlink(queued / name)
    folder = str(queued)
    for i in range(n):
        msg_id = new_id()
        body = data.replace(old_id, msg_id.encode()).replace(
            b"Subject: q0\\r\\n", f"Subject: q{i}\\r\\n".encode())
        fd = os.open(f"{folder}/{msg_id}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)


async def backlog_child(ws: Path, port: int, ctl_port: int, n: int, k: int,
                        window: float) -> dict[str, Any]:
    """Runs in its own process: serve the backlog at ``ws`` for ``window`` seconds (or
    until all of it is delivered), force a rescan, stop."""
    ctl = await AsyncControl.open(ctl_port)
    manager = Manager(ws, spawn=k, config=config_for(port))
    ticks: list[tuple[float, float]] = []  # (seconds since start, gap beyond 10 ms)
    done = asyncio.Event()

    watchdog = None
    if os.environ.get("ESS_BENCH_WATCHDOG"):  # a diagnostic: see loopwatch.py
        from loopwatch import Watchdog

        watchdog = Watchdog()
        watchdog.start()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            ticks.append((now - start, now - last - 0.01))
            last = now
            if watchdog is not None:
                watchdog.tick()

    def largest(since: float, until: float) -> float:
        return max((g for t, g in ticks if since <= t <= until), default=0.0) * 1000

    start = time.monotonic()
    tick = asyncio.create_task(ticker())
    with CPU() as cpu:
        async with manager:
            first = await ctl.wait(1, 60)
            run = manager._run
            assert run is not None
            at_window = await ctl.wait(n, max(0.0, window - (time.monotonic() - start)))
            window_end = time.monotonic()
            count = at_window["count"]
            rescan_start = time.monotonic() - start
            await manager._scan_queued(run)
            rescan_s = time.monotonic() - start - rescan_start
            await asyncio.sleep(1.0)
            rescan_end = time.monotonic() - start
        summary = run.dispatcher.summary
    stopped = time.monotonic() - start
    done.set()
    await tick
    if watchdog is not None:
        watchdog.report()
    stats = await ctl.stats()
    await ctl.close()
    last = at_window["at"] if at_window.get("at") else window_end
    return {"n": n, "spawn": k, "window s": window, "start s": first["first"] - start,
            "startup gap ms": largest(0.0, min(10.0, window_end - start)),
            "serving gap ms": largest(0.0, window_end - start),
            "rescan gap ms": largest(rescan_start, rescan_end),
            "rescan s": rescan_s, "stop gap ms": largest(rescan_end, math.inf),
            "stop s": stopped - rescan_end,
            "delivered in window": count, "msgs/s": count / (last - start),
            "steady msgs/s": (count - 1) / max(last - first["first"], 1e-9),
            "delivered": stats["count"], "distinct": stats["distinct"],
            "passed": summary.passed, **cpu.per(max(stats["count"], 1))}


def backlog(base: Path, sink: Sink, n: int, k: int, window: float) -> dict[str, Any]:
    ws, create_us = new_workspace(base)
    t = time.perf_counter()
    fill_copies(ws, n)
    seeded = time.perf_counter() - t
    print(f"  filled {n:,} in {seeded:.0f}s", file=sys.stderr)
    sink.reset()
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--backlog-child", str(n), "--ws", str(ws), "--port",
             str(sink.port), "--ctl", str(sink.ctl_port), "--spawn", str(k),
             "--window", str(window)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"backlog {n}: child exited with {status}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        print(f"  child: {out.strip().splitlines()[-1]}", file=sys.stderr)
        time.sleep(0.05)
        stats = sink.stats()
        ok = stats["count"] == stats["distinct"] == result["passed"] == result["delivered"]
        CHECKS[f"backlog {n}"] = {"expected": result["passed"], "count": stats["count"],
                                  "distinct": stats["distinct"], "ok": ok}
        print(f"  check backlog {n}: passed {result['passed']}, sink has {stats['count']}, "
              f"{stats['distinct']} distinct: {'OK' if ok else 'FAILED'}", file=sys.stderr)
        result["peak RSS MB"] = usage.ru_maxrss / 1024  # KiB on Linux
        result["seed s"] = seeded
        result["create us"] = create_us
        if not ok:
            raise SystemExit(f"backlog {n}: correctness check failed")
    finally:
        t = time.perf_counter()
        shutil.rmtree(ws, ignore_errors=True)
        print(f"  removed the workspace in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return result


def backlog_main(args: argparse.Namespace) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.dir))
    results: dict[str, Any] = {"machine": machine(False)}
    sink = Sink()
    try:
        results["backlog"] = [timed(f"backlog {s}", lambda s=s: backlog(
            base, sink, s, args.spawn, args.window)) for s in (1000, args.scale)]
    finally:
        sink.close()
        shutil.rmtree(base, ignore_errors=True)
    results["machine"]["loadavg after"] = os.getloadavg()
    small, big = results["backlog"]
    m = results["machine"]
    print(f"\nnproc {m['nproc']}, Python {m['python']}, load "
          f"{m['loadavg before'][0]:.2f} -> {m['loadavg after'][0]:.2f}")
    for r in (small, big):
        print(f"backlog {r['n']:,} (spawn {r['spawn']}): first delivery {r['start s']:.2f}s, "
              f"largest loop gap: first 10 s {r['startup gap ms']:.0f} ms, "
              f"window {r['serving gap ms']:.0f} ms; rescan {r['rescan s']:.2f}s, gap "
              f"{r['rescan gap ms']:.0f} ms; stop {r['stop s']:.2f}s, gap "
              f"{r['stop gap ms']:.0f} ms; "
              f"{r['msgs/s']:,.0f} msgs/s over {r['delivered in window']:,} (steady "
              f"{r['steady msgs/s']:,.0f}); peak RSS {r['peak RSS MB']:.0f} MB; CPU "
              f"{r['cpu us/msg']:.0f} / {r['loop cpu us/msg']:.0f} us/msg")
    drop = 1 - big["msgs/s"] / small["msgs/s"]
    print("\ntargets:")
    for name, met, value in [
            ("first delivery <= 5 s", big["start s"] <= TARGET_BIG_START_S,
             f"{big['start s']:.2f} s"),
            ("loop never blocked > 50 ms (start-up, serving, rescan)",
             max(big["serving gap ms"], big["rescan gap ms"]) <= TARGET_BIG_GAP_MS,
             f"{big['serving gap ms']:.0f} ms serving, {big['rescan gap ms']:.0f} ms rescan "
             f"({big['stop gap ms']:.0f} ms while stopping)"),
            ("peak RSS <= 300 MB", big["peak RSS MB"] <= TARGET_BIG_RSS_MB,
             f"{big['peak RSS MB']:.0f} MB"),
            ("msgs/s within 20% of 1k", drop <= TARGET_SCALE_DROP,
             f"{big['msgs/s']:,.0f} vs {small['msgs/s']:,.0f} ({-drop:+.0%})")]:
        print(f"  {'met   ' if met else 'MISSED'}  {big['n']:,} backlog: {name}: {value}")
    args.json.write_text(json.dumps(results, indent=2))
    return 0


# -- the filesystem ------------------------------------------------------------------


def fs_probe(folder: Path, n: int = 200) -> float:
    """Microseconds to create, write (3 KB) and close one file in ``folder`` (then the
    files are removed). A workspace's tmp/ is where the spool creates every file.

    On the VM these numbers were first taken on, this cost 8-60 us in most folders but
    300-700 us in others (same ext4 filesystem; it depends on the part of the disk the
    folder landed on, and did not improve with use), which dominated the spool's cost
    per message. Each result records it so that such a disk shows up in the results.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = b"x" * 3000
    names = [folder / f"probe-{i}.tmp" for i in range(n)]
    start = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
    elapsed = time.perf_counter() - start
    for name in names:
        name.unlink()
    return elapsed / n * 1e6


def new_workspace(base: Path) -> tuple[Path, float]:
    """A fresh workspace and what creating a file costs in its tmp/."""
    ws = Path(tempfile.mkdtemp(dir=base))
    Spool(ws).ensure()
    return ws, fs_probe(ws / "tmp")


# -- driver --------------------------------------------------------------------------


def timed(label: str, fn: Callable[[], Any]) -> Any:
    print(f"{label} ...", file=sys.stderr)
    start = time.perf_counter()
    result = fn()
    print(f"  {label}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return result


def machine(quick: bool) -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "arch": platform.machine(), "kernel": platform.release(),
            "quick": quick, "loadavg before": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--json", type=Path, default=HERE / "results.json",
                        help="where to write the results (default benchmarks/results.json)")
    parser.add_argument("--dir", type=Path, default=Path.cwd() / ".bench_tmp",
                        help="where workspaces go (default ./.bench_tmp)")
    parser.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ws", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ctl", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spawn", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, help="only the huge-backlog case with this "
                        "many messages (e.g. 1000000; minutes), beside a 1k one")
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds to serve each --scale backlog (default 30)")
    parser.add_argument("--backlog-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--processes-only", action="store_true",
                        help="only serve in one process against --processes 1 and 2")
    args = parser.parse_args()
    if args.processes_only:
        return processes_main(args)
    if args.backlog_child:
        result = asyncio.run(backlog_child(args.ws, args.port, args.ctl, args.backlog_child,
                                           args.spawn, args.window))
        print(json.dumps(result))
        return 0
    if args.scale:
        return backlog_main(args)
    if args.scale_child:
        result = asyncio.run(scale_child(args.ws, args.port, args.ctl, args.scale_child,
                                         args.spawn))
        print(json.dumps(result))
        return 0

    args.dir.mkdir(parents=True, exist_ok=True)
    n = 1000 if args.quick else 4000
    repeats = 1 if args.quick else 2
    scales = [1000, 5000] if args.quick else [1000, 10000, 100000]
    base = Path(tempfile.mkdtemp(dir=args.dir))
    results: dict[str, Any] = {"machine": machine(args.quick), "n": n, "repeats": repeats}
    started = time.perf_counter()
    fs: dict[str, Any] = {"dir": str(args.dir.resolve()),
                          "create us": fs_probe(base / "probe")}
    results["machine"]["filesystem"] = fs
    print(f"  creating a file under {args.dir}: {fs['create us']:.0f} us", file=sys.stderr)
    sink = Sink()
    try:
        results["sink ceiling"] = timed(
            "sink ceiling", lambda: asyncio.run(sink_ceiling(sink, 4 * n)))
        results["ceiling"] = {k: best([timed(f"ceiling k={k}", lambda k=k: asyncio.run(
            client_ceiling(sink, n, k))) for _ in range(repeats)], "msgs/s")
            for k in (1, 3, 4, 16)}
        results["transport"] = {k: best([timed(f"transport k={k}", lambda k=k: asyncio.run(
            transport_ceiling(sink, n, k))) for _ in range(repeats)], "msgs/s")
            for k in (3, 16)}
        results["enqueue"] = timed("enqueue", lambda: asyncio.run(enqueue(base, n, sink)))
        results["end to end"] = {}
        for name, k, pipelining, loop in e2e_cases():
            results["end to end"][name] = {"spawn": k, **best([timed(
                f"end to end {name}", lambda k=k, p=pipelining, lp=loop: run_loop(
                    end_to_end(base, sink, n, k, p), lp)) for _ in range(repeats)], "msgs/s")}
        results["latency"] = timed("latency", lambda: asyncio.run(
            latency(base, sink, 200 if args.quick else 1000)))
        results["scale"] = [timed(f"scale {s}", lambda s=s: scale(base, sink, s, 16))
                            for s in scales]
        results["processes"] = processes_cases(base, sink, n, repeats)
        # The PostgreSQL store (issue 12 part 4): its own cluster, fsync on. It uses this
        # module's sink and checks: the same module, not a second copy named "run".
        sys.modules.setdefault("run", sys.modules[__name__])
        import postgres

        results["postgres"] = timed("postgres", lambda: postgres.bench(base, sink, n))
    finally:
        sink.close()
        shutil.rmtree(base, ignore_errors=True)
    results["machine"]["loadavg after"] = os.getloadavg()
    fs["create us after"] = fs_probe(args.dir / f"probe-{os.getpid()}")
    shutil.rmtree(args.dir / f"probe-{os.getpid()}", ignore_errors=True)
    results["elapsed s"] = time.perf_counter() - started
    results["checks"] = CHECKS
    results["targets"] = targets(results)
    report(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.json} ({results['elapsed s']:.0f}s in all)", file=sys.stderr)
    return 0


def e2e_cases() -> list[tuple[str, int, str, str]]:
    """(name, spawn, pipelining, event loop) of each end-to-end case."""
    cases = [(f"spawn {k}", k, "auto", "asyncio") for k in (3, 16)]
    if pipelining_supported():
        cases = [(f"spawn {k}, pipelining", k, "auto", "asyncio") for k in (3, 16)]
        cases += [(f"spawn {k}, no pipelining", k, "off", "asyncio") for k in (3, 16)]
    if importlib.util.find_spec("uvloop") is not None:
        cases += [(f"{cases[1][0]}, uvloop", 16, cases[1][2], "uvloop")]
    return cases


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name: str, met: bool, value: str) -> None:
        rows.append({"target": name, "met": met, "value": value})

    e2e = r["end to end"]
    bare = max(r["ceiling"].values(), key=lambda v: v["msgs/s"])["msgs/s"]
    piped = {k: v for k, v in e2e.items() if "no pipelining" not in k}
    top_name, top = max(piped.items(), key=lambda kv: kv[1]["msgs/s"])
    add(f"end to end >= {TARGET_E2E_RATE:,.0f} msgs/s", top["msgs/s"] >= TARGET_E2E_RATE,
        f"{top['msgs/s']:,.0f} ({top_name})")
    add(f"end to end >= {TARGET_E2E_RATIO} x best bare aiosmtplib",
        top["msgs/s"] >= TARGET_E2E_RATIO * bare, f"{top['msgs/s'] / bare:.2f} x {bare:,.0f}")
    for name, v in e2e.items():
        if "no pipelining" in name or (not pipelining_supported() and "uvloop" not in name):
            k = v["spawn"]
            ratio = v["msgs/s"] / r["ceiling"][k]["msgs/s"]
            add(f"without pipelining >= {TARGET_E2E_LOCKSTEP} x bare aiosmtplib, spawn {k}",
                ratio >= TARGET_E2E_LOCKSTEP, f"{ratio:.2f} x")
    rate = r["enqueue"]["create_work, 50 tasks"]["msgs/s"]
    add(f"durable enqueue >= {TARGET_ENQUEUE:,.0f} msgs/s, 50 callers",
        rate >= TARGET_ENQUEUE, f"{rate:,.0f} msgs/s")
    rate = r["enqueue"]["Client (sync)"]["msgs/s"]
    add(f"sync Client.create_work >= {TARGET_SYNC_ENQUEUE:,.0f} msgs/s",
        rate >= TARGET_SYNC_ENQUEUE, f"{rate:,.0f} msgs/s")
    lat = r["latency"]
    add(f"latency p50 <= {TARGET_P50_MS:.0f} ms idle", lat["p50 ms"] <= TARGET_P50_MS,
        f"{lat['p50 ms']:.1f} ms")
    add(f"latency p99 <= {TARGET_P99_MS:.0f} ms idle", lat["p99 ms"] <= TARGET_P99_MS,
        f"{lat['p99 ms']:.1f} ms")
    small, big = r["scale"][0], r["scale"][-1]
    label = f"{big['n'] // 1000}k backlog"
    add(f"{label}: peak RSS <= {TARGET_RSS_MB:.0f} MB", big["peak RSS MB"] <= TARGET_RSS_MB,
        f"{big['peak RSS MB']:.0f} MB")
    drop = 1 - big["msgs/s"] / small["msgs/s"]
    add(f"{label}: msgs/s within {TARGET_SCALE_DROP:.0%} of {small['n'] // 1000}k",
        drop <= TARGET_SCALE_DROP, f"{big['msgs/s']:.0f} vs {small['msgs/s']:.0f} "
        f"({-drop:+.0%})")
    add(f"{label}: start-up <= {TARGET_SCAN_S:.0f} s", big["start s"] <= TARGET_SCAN_S,
        f"{big['start s']:.2f} s to first delivery (scan {big['scan s']:.2f} s)")
    return rows


def workspace_create_us(r: dict[str, Any]) -> list[tuple[str, float]]:
    """(case, microseconds to create a file in its workspace's tmp/) for every case."""
    out = [(f"enqueue {k}", v["create us"]) for k, v in r["enqueue"].items()]
    out += [(f"end to end {k}", v["create us"]) for k, v in r["end to end"].items()]
    out += [("latency", r["latency"]["create us"])]
    out += [(f"scale {s['n']}", s["create us"]) for s in r["scale"]]
    return out


def report(r: dict[str, Any]) -> None:
    ceiling = r["ceiling"]
    lat = r["latency"]

    def cpu(v: dict[str, Any]) -> str:
        return f"{v['cpu us/msg']:.0f} / {v['loop cpu us/msg']:.0f}" if "cpu us/msg" in v else ""

    def disk(v: dict[str, Any]) -> str:
        return f"{v['create us']:.0f}" if "create us" in v else ""

    rows = [("sink ceiling (raw pipelined client, 1 conn)",
             f"{r['sink ceiling']['msgs/s']:,.0f}", "", "")]
    rows += [(f"ceiling: bare aiosmtplib, {k} conn", f"{v['msgs/s']:,.0f}", cpu(v), "")
             for k, v in ceiling.items()]
    rows += [(f"ess_async SMTPTransport alone (no spool), {k} conn", f"{v['msgs/s']:,.0f}",
              cpu(v), "") for k, v in r["transport"].items()]
    rows += [(f"enqueue: {k}", f"{v['msgs/s']:,.0f}", cpu(v), disk(v))
             for k, v in r["enqueue"].items()]
    for k, v in r["end to end"].items():
        ratio = v["msgs/s"] / ceiling[v["spawn"]]["msgs/s"]
        rows.append((f"end to end, {k}", f"{v['msgs/s']:,.0f} ({ratio:.2f} x bare "
                     f"aiosmtplib at {v['spawn']})", cpu(v), disk(v)))
    rows += [("latency idle, create_work -> sink",
              f"p50 {lat['p50 ms']:.1f} / p90 {lat['p90 ms']:.1f} / p99 {lat['p99 ms']:.1f} / "
              f"max {lat['max ms']:.1f} ms (create_work alone p50 "
              f"{lat['create_work p50 ms']:.1f} ms)", "", disk(lat))]
    rows += [(processes_label(p).partition(": ")[0] + f" (spawn {p['spawn']})",
              processes_label(p).partition(": ")[2], "", disk(p))
             for p in r.get("processes", [])]
    pg = r.get("postgres", {})
    if "skipped" in pg:
        rows.append(("PostgreSQL store", f"skipped: {pg['skipped']}", "", ""))
    for name, v in ({} if "skipped" in pg else pg).items():
        conns = v.get("peak connections", v.get("connections"))
        rows.append((f"PostgreSQL store: {name}", f"{v['msgs/s']:,.0f} ({conns} connections)",
                     cpu(v), ""))
    rows += [(f"scale {s['n']:,} (spawn {s['spawn']})",
              f"start {s['start s']:.2f}s (scan {s['scan s']:.2f}s) / {s['msgs/s']:,.0f} "
              f"msgs/s / peak RSS {s['peak RSS MB']:.0f} MB", cpu(s), disk(s))
             for s in r["scale"]]
    header = ("measure", "value (msgs/s unless marked)", "CPU us/msg all/loop",
              "file create us")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    m = r["machine"]
    fs = m["filesystem"]
    print(f"\nnproc {m['nproc']}, {m['arch']}, Python {m['python']}, "
          f"load {m['loadavg before'][0]:.2f} -> {m['loadavg after'][0]:.2f}"
          f"{', quick' if m['quick'] else ''}; N = {r['n']}, best of {r['repeats']}; "
          f"creating a file: {fs['create us']:.0f} us (at the end: "
          f"{fs['create us after']:.0f} us)")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    slow = [f"{name} ({us:.0f} us)" for name, us in workspace_create_us(r) if us > 100]
    if slow:
        print("WARNING: creating a file cost more than 100 us in the workspaces of "
              + ", ".join(slow) + ": their figures are bounded by the disk (see fs_probe)")
    passed = sum(c["ok"] for c in r["checks"].values())
    print(f"correctness: {passed}/{len(r['checks'])} checks passed (sink count == N, "
          "all distinct)")
    print("\ntargets:")
    for t in r["targets"]:
        print(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['value']}")


if __name__ == "__main__":
    raise SystemExit(main())
