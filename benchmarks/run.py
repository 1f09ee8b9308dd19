"""ess_async benchmarks: the SMTP ceiling and ess_async measured in one run, on loopback.

    python benchmarks/run.py [--quick] [--json OUT] [--dir DIR]

Starts its own sink process (benchmarks/sink.py), measures (1) the sink's own ceiling and
a bare aiosmtplib client's, (2) durable enqueue, (3) end-to-end delivery of a backlog,
(4) latency while serving idle, (5) how a 1k / 10k / 100k backlog scales. Every figure
comes with a correctness check: the sink's count equals what was sent. Not a test: the
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib

from ess_async import Client, Manager
from ess_async.config import Config, parse_config
from ess_async.message import build_message
from ess_async.spool import Spool, new_id, new_record

HERE = Path(__file__).resolve().parent
BODY = ("The quick brown fox jumps over the lazy dog. " * 45)[:2000] + "\n"  # ~2 KB


class Sink:
    """The sink process and its control connection."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "sink.py")],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        port, ctl = self.proc.stdout.readline().split()
        self.port = int(port)
        self.ctl = socket.create_connection(("127.0.0.1", int(ctl)))
        self.ctl_file = self.ctl.makefile("rb")

    def _ask(self, command: str) -> bytes:
        self.ctl.sendall(command.encode() + b"\n")
        return self.ctl_file.readline()

    def count(self) -> int:
        return int(self._ask("COUNT"))

    def times(self) -> dict[str, float]:
        return json.loads(self._ask("TIMES"))  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._ask("RESET")

    def close(self) -> None:
        self.ctl.close()
        self.proc.kill()
        self.proc.wait()


def config_for(port: int) -> Config:
    return parse_config({"message": {"from": "bench@example.com"},
                         "transport": {"smtp": {"host": "127.0.0.1", "port": port}}})


def attrs(i: int, prefix: str = "m") -> dict[str, Any]:
    return {"to": f"user{i % 100}@example.com", "subject": f"{prefix}{i}", "body": BODY}


def raw_message(i: int) -> bytes:
    return (f"From: bench@example.com\r\nTo: user@example.com\r\nSubject: c{i}\r\n\r\n"
            + BODY.replace("\n", "\r\n")).encode()


def checked(sink: Sink, expected: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while (got := sink.count()) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    if got != expected:
        raise SystemExit(f"{what}: the sink has {got} messages, expected {expected}")


# -- 1. ceilings ---------------------------------------------------------------------


async def sink_ceiling(sink: Sink, n: int) -> float:
    """A raw client that pipelines whole transactions: what the sink itself can take."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port, limit=1 << 24)
    await reader.readline()
    writer.write(b"EHLO bench\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    one = (b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
           + raw_message(0) + b"\r\n.\r\n")
    sink.reset()
    start = time.perf_counter()
    for offset in range(0, n, 100):
        writer.write(one * min(100, n - offset))
        await writer.drain()
    replies = 0
    while replies < 4 * n:  # MAIL, RCPT, DATA (354), end of data
        replies += (await reader.read(1 << 20)).count(b"\r\n")
    elapsed = time.perf_counter() - start
    writer.close()
    checked(sink, n, "sink ceiling")
    return n / elapsed


async def client_ceiling(sink: Sink, n: int, k: int) -> float:
    """A bare aiosmtplib client with k persistent connections (no spool, no durability)."""
    sink.reset()

    async def connection(count: int, first: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await smtp.connect()
        for i in range(first, first + count):
            await smtp.sendmail("bench@example.com", ["user@example.com"], raw_message(i))
        await smtp.quit()

    share = [n // k + (1 if i < n % k else 0) for i in range(k)]
    start = time.perf_counter()
    await asyncio.gather(*[connection(c, sum(share[:i])) for i, c in enumerate(share)])
    elapsed = time.perf_counter() - start
    checked(sink, n, f"ceiling k={k}")
    return n / elapsed


# -- 2. enqueue ----------------------------------------------------------------------


async def enqueue(base: Path, n: int, sink: Sink) -> dict[str, float]:
    config = config_for(sink.port)
    results = {}
    ws = Path(tempfile.mkdtemp(dir=base))
    manager = Manager(ws, config=config)
    start = time.perf_counter()
    for i in range(n):
        await manager.create_work(**attrs(i))
    results["create_work, 1 task"] = n / (time.perf_counter() - start)

    ws = Path(tempfile.mkdtemp(dir=base))
    manager = Manager(ws, config=config)

    async def caller(offset: int) -> None:
        for i in range(offset, n, 50):
            await manager.create_work(**attrs(i))

    start = time.perf_counter()
    await asyncio.gather(*[caller(j) for j in range(50)])
    results["create_work, 50 tasks"] = n / (time.perf_counter() - start)
    assert len(os.listdir(ws / "queued")) == n

    ws = Path(tempfile.mkdtemp(dir=base))
    client = Client(ws, config=config)
    start = time.perf_counter()
    for i in range(n):
        client.create_work(**attrs(i))
    results["Client (sync)"] = n / (time.perf_counter() - start)
    return results


# -- 3. end to end -------------------------------------------------------------------


def prequeue(ws: Path, n: int, port: int) -> None:
    """Fill queued/ fast: one rendered message, n records with their own ids."""
    spool = Spool(ws)
    spool.ensure()
    spec = build_message({"from_": "bench@example.com", **attrs(0)})
    base = new_record(spec, time.time())
    for offset in range(0, n, 1000):
        batch = [("queued", {**base, "id": new_id(), "subject": f"q{i}"})
                 for i in range(offset, min(n, offset + 1000))]
        for result in spool.write_many(batch):
            if isinstance(result, Exception):
                raise result


async def end_to_end(base: Path, sink: Sink, n: int, k: int) -> float:
    ws = Path(tempfile.mkdtemp(dir=base))
    prequeue(ws, n, sink.port)
    manager = Manager(ws, spawn=k, config=config_for(sink.port))
    sink.reset()
    start = time.perf_counter()
    summary = await manager.process_workload()
    elapsed = time.perf_counter() - start
    assert summary.passed == n, summary
    checked(sink, n, f"end to end k={k}")
    return n / elapsed


# -- 4. latency ----------------------------------------------------------------------


async def latency(base: Path, sink: Sink, n: int) -> dict[str, float]:
    ws = Path(tempfile.mkdtemp(dir=base))
    sink.reset()
    sent: dict[str, float] = {}
    async with Manager(ws, spawn=3, config=config_for(sink.port)) as manager:
        await asyncio.sleep(0.5)  # let the watchers settle: "serve idle"
        for i in range(n):
            subject = f"lat{i}"
            sent[subject] = time.monotonic()
            await manager.create_work(**{**attrs(i), "subject": subject})
            while sink.count() < i + 1:
                await asyncio.sleep(0.0002)
    checked(sink, n, "latency")
    arrived = sink.times()
    samples = sorted((arrived[s] - t) * 1000 for s, t in sent.items())
    return {"p50 ms": statistics.median(samples),
            "p99 ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "max ms": samples[-1]}


# -- 5. scale (each size in its own process, for its peak RSS) -------------------------


async def scale_child(base: Path, port: int, n: int, k: int) -> dict[str, float]:
    ws = Path(tempfile.mkdtemp(dir=base))
    prequeue(ws, n, port)
    first: list[float] = []

    def progress(summary: Any) -> None:
        if not first:
            first.append(time.perf_counter())

    manager = Manager(ws, spawn=k, config=config_for(port))
    start = time.perf_counter()
    summary = await manager.process_workload(progress=progress)
    elapsed = time.perf_counter() - start
    assert summary.passed == n, summary
    shutil.rmtree(ws)
    return {"n": n, "start s": first[0] - start, "msgs/s": n / elapsed,
            "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scale(base: Path, sink: Sink, n: int, k: int) -> dict[str, float]:
    sink.reset()
    out = subprocess.run([sys.executable, __file__, "--scale-child", str(n), "--port",
                          str(sink.port), "--dir", str(base), "--spawn", str(k)],
                         capture_output=True, text=True, check=True)
    checked(sink, n, f"scale {n}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- driver --------------------------------------------------------------------------


def timed(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    print(f"  {label}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--dir", type=Path, default=Path.cwd() / ".bench_tmp",
                        help="where workspaces go (default ./.bench_tmp)")
    parser.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spawn", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.scale_child:
        result = asyncio.run(scale_child(args.dir, args.port, args.scale_child, args.spawn))
        print(json.dumps(result))
        return 0

    n = 1000 if args.quick else 4000
    scales = [1000, 5000] if args.quick else [1000, 10000, 100000]
    base = Path(tempfile.mkdtemp(dir=args.dir))
    sink = Sink()
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "arch": platform.machine(), "quick": args.quick}}
    try:
        results["sink ceiling msgs/s"] = timed(
            "sink ceiling", lambda: asyncio.run(sink_ceiling(sink, 4 * n)))
        results["ceiling msgs/s"] = {k: timed(f"ceiling k={k}", lambda k=k: asyncio.run(
            client_ceiling(sink, n, k))) for k in (1, 3, 4, 16)}
        results["enqueue msgs/s"] = timed("enqueue", lambda: asyncio.run(
            enqueue(base, n, sink)))
        results["end to end msgs/s"] = {k: timed(f"end to end k={k}", lambda k=k: asyncio.run(
            end_to_end(base, sink, n, k))) for k in (3, 16)}
        results["latency"] = timed("latency", lambda: asyncio.run(
            latency(base, sink, 200 if args.quick else 1000)))
        results["scale"] = [timed(f"scale {s}", lambda s=s: scale(args.dir, sink, s, 8))
                            for s in scales]
    finally:
        sink.close()
        shutil.rmtree(base, ignore_errors=True)
    report(results)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict[str, Any]) -> None:
    ceiling = r["ceiling msgs/s"]
    rows = [("sink ceiling (raw pipelined client, 1 conn)", f"{r['sink ceiling msgs/s']:.0f}"),
            *[(f"ceiling: bare aiosmtplib, {k} conn", f"{v:.0f}") for k, v in ceiling.items()],
            *[(f"enqueue: {k}", f"{v:.0f}") for k, v in r["enqueue msgs/s"].items()],
            *[(f"end to end, spawn={k}", f"{v:.0f}  ({v / ceiling[k]:.2f} x ceiling)")
              for k, v in r["end to end msgs/s"].items()],
            *[(f"latency {k}", f"{v:.1f}") for k, v in r["latency"].items()],
            *[(f"scale {s['n']}: start / msgs/s / peak RSS",
               f"{s['start s']:.2f}s / {s['msgs/s']:.0f} / {s['peak RSS MB']:.0f} MB")
              for s in r["scale"]]]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value (msgs/s unless marked)")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    raise SystemExit(main())
