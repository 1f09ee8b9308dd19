"""DKIM signing cost and event-loop lag: inline, in a thread pool, in a process pool.

    .venv/bin/python benchmarks/dkim_sign.py [N]

Prints the CPU time of one signature (RSA-2048, Ed25519) and, for N messages signed
while a 1 ms ticker runs on the loop, the worst tick delay (the loop stall) and the
throughput of each way. Needs the dkim extra.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ess_async.dkim import DEFAULT_HEADERS, load_key, sign_message
from ess_async.message import build_message

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100


def key_file(folder: Path, kind: str) -> Path:
    key = (rsa.generate_private_key(65537, 2048) if kind == "rsa"
           else ed25519.Ed25519PrivateKey.generate())
    path = folder / f"{kind}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


async def run(executor: concurrent.futures.Executor | None, key, raw: bytes) -> None:
    loop = asyncio.get_running_loop()
    if executor is not None:  # warm the pool up (process start, imports)
        await asyncio.gather(*(loop.run_in_executor(executor, sign_message, key, raw,
                                                    DEFAULT_HEADERS, "relaxed/relaxed")
                               for _ in range(4)))
    stop, lags = asyncio.Event(), []
    tick = asyncio.create_task(ticker(stop, lags))
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    for _ in range(N):
        if executor is None:
            sign_message(key, raw, DEFAULT_HEADERS, "relaxed/relaxed")
            await asyncio.sleep(0)
        else:
            await loop.run_in_executor(executor, sign_message, key, raw, DEFAULT_HEADERS,
                                       "relaxed/relaxed")
    elapsed = time.perf_counter() - start
    stop.set()
    await tick
    name = "inline" if executor is None else type(executor).__name__
    print(f"  {name:<22} {N / elapsed:7.0f} msg/s  loop lag max {max(lags) * 1000:6.2f} ms"
          f"  p99 {statistics.quantiles(lags, n=100)[98] * 1000:6.2f} ms")


def main() -> None:
    record = build_message({"to": "b@example.org", "subject": "Hello",
                            "body": "Hello world.\n" * 200},
                           {"from_": "a@example.org"})
    raw = record.raw
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("rsa", "ed25519"):
            key = load_key(key_file(Path(tmp), kind), domain="example.org", selector="s",
                           config_key="dkim.key_file")
            t = time.process_time()
            for _ in range(20):
                sign_message(key, raw, DEFAULT_HEADERS, "relaxed/relaxed")
            print(f"{key.algorithm}: {(time.process_time() - t) / 20 * 1000:.2f} ms CPU per "
                  f"signature ({len(raw)} byte message)")
            with concurrent.futures.ThreadPoolExecutor(1) as threads, \
                    concurrent.futures.ProcessPoolExecutor(
                        1, mp_context=multiprocessing.get_context("spawn")) as procs:
                for executor in (None, threads, procs):
                    asyncio.run(run(executor, key, raw))


if __name__ == "__main__":
    main()
