"""How long the event loop is held while `serve` starts on a big backlog.

``python benchmarks/loop_lag.py WORKSPACE N`` fills ``WORKSPACE/queued`` with N copies of
one message (once), starts a Manager whose transport never finishes a send, and reports
how long it took to offer the backlog and the longest gap seen by a 5 ms ticker task.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from ess_async import Client, Manager
from ess_async.spool import new_id
from ess_async.transports import SendResult, Transport


class NeverFinishes(Transport):
    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def fill(workspace: Path, count: int) -> None:
    queued = workspace / "queued"
    if queued.is_dir() and len(os.listdir(queued)) >= count:
        return
    path = Client(workspace).create_work(to="a@example.com", subject="x",
                                         from_="s@example.com")
    data = path.read_bytes()
    for _ in range(count):
        msg_id = new_id()
        (queued / f"{msg_id}.json").write_bytes(data.replace(path.stem.encode(),
                                                             msg_id.encode()))


async def measure(workspace: Path, count: int) -> None:
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    async with Manager(workspace, spawn=1, transport_factory=NeverFinishes) as manager:
        # The listing is kept as a backlog and offered a chunk at a time (issue 11 item
        # 5): done once it is listed (queued items plus the backlog's rest).
        while manager._run is None or manager._run.scanning or \
                manager._run.queue.qsize() + manager._run.backlog_size < count:
            await asyncio.sleep(0.05)
        run = manager._run
        print(f"listed {run.queue.qsize() + run.backlog_size} ({run.queue.qsize()} offered) "
              f"in {time.perf_counter() - started:.2f} s")
    done.set()
    await tick
    print(f"longest loop lag {max(lags) * 1000:.1f} ms")


if __name__ == "__main__":
    ws, n = Path(sys.argv[1]), int(sys.argv[2])
    fill(ws, n)
    asyncio.run(measure(ws, n))
