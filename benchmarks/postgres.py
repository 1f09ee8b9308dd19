"""The PostgreSQL store's figures (issue 12): concurrent enqueue, and draining a backlog
with 1 and 3 deliverer processes (`serve --store`), peak connections used.

``python benchmarks/postgres.py [--quick]`` starts a throwaway PostgreSQL cluster (the
tests' ``tests/pgserver.py``; fsync and synchronous_commit ON, so commits are durable
as in production) on 127.0.0.1 and the benchmark sink, prints a table and writes
``benchmarks/results-postgres.json``. ``run.py`` runs it too when PostgreSQL is there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from pgserver import PgServer, pg_available  # noqa: E402
from run import CPU, Sink, attrs, checked, config_for  # noqa: E402

from ess_async import Manager  # noqa: E402


async def _connections(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")) - 1
    finally:
        await conn.close()


async def enqueue(url: str, ws: Path, sink: Sink, n: int) -> dict[str, Any]:
    """50 concurrent callers of `await create_work` in one process."""
    manager = Manager(ws, config=config_for(sink.port), store=url)
    await manager.pg_store.migrate()
    await manager.pg_store.open()

    async def caller(offset: int) -> None:
        for i in range(offset, n, 50):
            await manager.create_work(**attrs(i, "e"))

    with CPU() as cpu:
        start = time.perf_counter()
        await asyncio.gather(*[caller(j) for j in range(50)])
        elapsed = time.perf_counter() - start
    queued = (await manager.counts())["queued"]
    peak = await _connections(url)
    await manager.pg_store.close()
    if queued != n:
        raise SystemExit(f"postgres enqueue: {queued} queued, expected {n}")
    return {"msgs/s": n / elapsed, "n": n, "connections": peak, **cpu.per(n)}


def drain(url: str, base: Path, sink: Sink, n: int, processes: int, spawn: int
          ) -> dict[str, Any]:
    """`processes` deliverers (`serve --store`) drain a backlog of n already queued."""
    ws = base / f"drain{processes}"
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "config.toml").write_text(
        f'[message]\nfrom = "bench@example.com"\n[transport.smtp]\nhost = "127.0.0.1"\n'
        f"port = {sink.port}\n")

    async def fill() -> None:
        manager = Manager(ws, store=url)
        await manager.pg_store.migrate()
        await asyncio.gather(*[manager.create_work(**attrs(i, f"d{processes}-"))
                               for i in range(n)])
        await manager.pg_store.close()

    asyncio.run(fill())
    sink.reset()
    env = {k: v for k, v in os.environ.items() if k != "ESS_STORE_URL"}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "ess_async", "--log-level", "WARNING",
                               "serve", "--workspace", str(ws), "--store", url,
                               "--spawn", str(spawn)], env=env, stderr=subprocess.DEVNULL)
             for _ in range(processes)]
    peak = 0
    try:
        deadline = time.monotonic() + 300
        while sink.stats()["count"] < n and time.monotonic() < deadline:
            peak = max(peak, asyncio.run(_connections(url)))
            time.sleep(0.5)
        stats = checked(sink, n, f"postgres drain, {processes} deliverer(s)")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
    return {"msgs/s": n / (stats["at"] - start), "n": n, "processes": processes,
            "spawn": spawn, "peak connections": peak,
            "first delivery s": stats["first"] - start}


def bench(base: Path, sink: Sink, n: int) -> dict[str, Any]:
    """Every PostgreSQL case on a fresh cluster; {} with a reason if there is none."""
    reason = pg_available()
    if reason:
        return {"skipped": reason}
    server = PgServer(durable=True)
    server.start()
    try:
        results: dict[str, Any] = {}
        for name, case in (
                ("enqueue, 50 tasks", lambda url: asyncio.run(
                    enqueue(url, base / "pg-enqueue", sink, n))),
                ("drain, 1 deliverer", lambda url: drain(url, base, sink, n, 1, 16)),
                ("drain, 3 deliverers", lambda url: drain(url, base, sink, n, 3, 16))):
            db = f"bench_{len(results)}"
            server.create_database(db)
            print(f"  postgres {name} ...", file=sys.stderr)
            results[name] = case(server.url(db))
        return results
    finally:
        server.stop()


def report(results: dict[str, Any]) -> None:
    if "skipped" in results:
        print(f"\nPostgreSQL store: skipped ({results['skipped']})")
        return
    print("\nPostgreSQL store (fsync on, synchronous_commit on, loopback):")
    for name, row in results.items():
        extra = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if k not in ("msgs/s", "n"))
        print(f"  {name:<22} {row['msgs/s']:>8.0f} msgs/s  (n={row['n']}; {extra})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "results-postgres.json")
    args = parser.parse_args()
    import tempfile

    sink = Sink()
    try:
        with tempfile.TemporaryDirectory(prefix="ess_pgbench_") as tmp:
            results = bench(Path(tmp), sink, 1000 if args.quick else 5000)
    finally:
        sink.close()
    report(results)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
