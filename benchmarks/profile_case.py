"""Profile one benchmark case, to see what bounds it.

    python benchmarks/profile_case.py CASE [-n N] [--spawn K] [--pipelining auto|off]
        [--loop asyncio|uvloop] [--pyinstrument OUT] [--cprofile OUT]

CASE is one of ``e2e`` (process_workload of N queued messages), ``enqueue`` (create_work
from 50 concurrent tasks), ``client`` (sync Client.create_work), ``latency`` (serving
idle, one message at a time), ``transport`` (SMTPTransport alone), ``ceiling`` (bare
aiosmtplib). It starts its own sink process like run.py. Without a profiler option it
just runs the case (for an outside sampler such as
``py-spy record --threads --format raw -o out.txt -- python benchmarks/profile_case.py e2e``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

from ess_async import Client, Manager


async def case_e2e(base: Path, sink: run.Sink, n: int, k: int, profiler: Any) -> str:
    ws, create_us = run.new_workspace(base)
    print(f"creating a file in the workspace: {create_us:.0f} us", file=sys.stderr)
    run.prequeue(ws, n)
    manager = Manager(ws, spawn=k, config=run.config_for(sink.port, PIPELINING))
    sink.reset()
    with run.CPU() as cpu:
        start = time.perf_counter()
        with profiler:
            await manager.process_workload()
        elapsed = time.perf_counter() - start
    run.checked(sink, n, "e2e")
    per = cpu.per(n)
    return (f"end to end spawn={k}: {n / elapsed:,.0f} msgs/s, CPU {per['cpu us/msg']:.0f} us/msg "
            f"(event loop {per['loop cpu us/msg']:.0f})")


async def case_enqueue(base: Path, sink: run.Sink, n: int, k: int, profiler: Any) -> str:
    ws, create_us = run.new_workspace(base)
    print(f"creating a file in the workspace: {create_us:.0f} us", file=sys.stderr)
    manager = Manager(ws, config=run.config_for(sink.port, PIPELINING))

    async def caller(offset: int) -> None:
        for i in range(offset, n, 50):
            await manager.create_work(**run.attrs(i))

    start = time.perf_counter()
    with profiler:
        await asyncio.gather(*[caller(j) for j in range(50)])
    return f"enqueue 50 tasks: {n / (time.perf_counter() - start):,.0f} msgs/s"


async def case_client(base: Path, sink: run.Sink, n: int, k: int, profiler: Any) -> str:
    ws, create_us = run.new_workspace(base)
    print(f"creating a file in the workspace: {create_us:.0f} us", file=sys.stderr)
    client = Client(ws, config=run.config_for(sink.port, PIPELINING))
    start = time.perf_counter()
    with profiler:
        for i in range(n):
            client.create_work(**run.attrs(i))
    return f"Client (sync): {n / (time.perf_counter() - start):,.0f} msgs/s"


async def case_latency(base: Path, sink: run.Sink, n: int, k: int, profiler: Any) -> str:
    with profiler:
        r = await run.latency(base, sink, n)
    return f"latency: p50 {r['p50 ms']:.1f} ms, p99 {r['p99 ms']:.1f} ms"


async def case_transport(base: Path, sink: run.Sink, n: int, k: int, profiler: Any) -> str:
    with profiler:
        r = await run.transport_ceiling(sink, n, k)
    return f"transport k={k}: {r['msgs/s']:,.0f} msgs/s"


async def case_ceiling(base: Path, sink: run.Sink, n: int, k: int, profiler: Any) -> str:
    with profiler:
        r = await run.client_ceiling(sink, n, k)
    return f"ceiling k={k}: {r['msgs/s']:,.0f} msgs/s"


PIPELINING = "auto"

CASES = {"e2e": case_e2e, "enqueue": case_enqueue, "client": case_client,
         "latency": case_latency, "transport": case_transport, "ceiling": case_ceiling}


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("-n", type=int, default=4000)
    parser.add_argument("--spawn", type=int, default=16)
    parser.add_argument("--pipelining", choices=["auto", "off"], default="auto")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--pyinstrument", type=Path, help="write pyinstrument's text here")
    parser.add_argument("--cprofile", type=Path, help="write cProfile's stats (text) here")
    parser.add_argument("--dir", type=Path, default=Path.cwd() / ".bench_tmp")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.dir))
    sink = run.Sink()
    profiler: Any = _Null()
    if args.pyinstrument:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.0005, async_mode="enabled")
    elif args.cprofile:
        profiler = cProfile.Profile()
    try:
        global PIPELINING
        PIPELINING = args.pipelining
        print(run.run_loop(CASES[args.case](base, sink, args.n, args.spawn, profiler),
                           args.loop), f"(pipelining {args.pipelining}, {args.loop})")
    finally:
        sink.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.pyinstrument:
        args.pyinstrument.write_text(profiler.output_text(unicode=False, color=False,
                                                          show_all=False))
    elif args.cprofile:
        with args.cprofile.open("w") as fh:
            stats = pstats.Stats(profiler, stream=fh)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
