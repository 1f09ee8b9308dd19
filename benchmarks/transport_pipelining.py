"""Transport-level throughput (issue 11 item 1): N messages of ~2 KB over C connections,
SMTPTransport (aiosmtplib, one command at a time) against PipeliningTransport, each
``transport.send`` in a loop, no spool. Medians of R runs.

    python benchmarks/sink.py &        # prints PORT CONTROL_PORT
    python benchmarks/transport_pipelining.py PORT [N=5000] [C=8] [R=3]
"""

from __future__ import annotations

import asyncio
import sys
import time

from ess_async.config import parse_config
from ess_async.transports import PipeliningTransport, SMTPTransport

BODY = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s%d\r\n\r\n"
        + (b"x" * 70 + b"\r\n") * 27)


async def run(cls: type[SMTPTransport], port: int, n: int, c: int) -> tuple[float, float]:
    cfg = parse_config({"transport": {"smtp": {"host": "127.0.0.1", "port": port}}})
    transports = [cls(cfg.transport.smtp) for _ in range(c)]
    for transport in transports:  # connected before the clock starts
        await transport.send("a@example.com", ["b@example.com"], BODY % 0)
    left = iter(range(n))

    async def worker(transport: SMTPTransport) -> None:
        for i in left:
            await transport.send("a@example.com", ["b@example.com"], BODY % i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(t) for t in transports))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for transport in transports:
        await transport.close()
    return n / wall, cpu / n * 1e6


async def main() -> None:
    port = int(sys.argv[1])
    n, c, repeats = (int(a) for a in (sys.argv[2:] + ["5000", "8", "3"][len(sys.argv) - 2:]))
    for cls in (SMTPTransport, PipeliningTransport):
        results = [await run(cls, port, n, c) for _ in range(repeats)]
        rates = sorted(r for r, _ in results)
        cpus = sorted(u for _, u in results)
        print(f"{cls.__name__:20s} median {rates[len(rates) // 2]:7.0f} msg/s, client CPU "
              f"{cpus[len(cpus) // 2]:4.0f} us/msg (runs: {', '.join(f'{r:.0f}' for r in rates)})")


if __name__ == "__main__":
    asyncio.run(main())
