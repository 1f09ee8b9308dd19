"""How long the event loop is held while `serve` starts on a big backlog.

``python benchmarks/loop_lag.py WORKSPACE N`` fills ``WORKSPACE/queued`` with N copies of
one message (once), starts a Manager whose transport never finishes a send, and reports
how long it took to offer the backlog and the longest gap seen by a 5 ms ticker task.
"""

import asyncio, os, sys, time, json
from pathlib import Path
from ess_async import Manager, Client
from ess_async.transports import Transport, SendResult
from ess_async.spool import new_id

ws = Path(sys.argv[1]); n = int(sys.argv[2])
client = Client(ws)
p = client.create_work(to="a@example.com", subject="x", from_="s@example.com")
data = p.read_bytes()
q = ws / "queued"
if len(os.listdir(q)) < n:
    for i in range(n):
        mid = new_id()
        (q / f"{mid}.json").write_bytes(data.replace(p.stem.encode(), mid.encode()))

class Never(Transport):
    async def send(self, *a, **k):
        await asyncio.Event().wait()

T0 = time.perf_counter()
async def main():
    lags = []
    stop = False
    async def ticker():
        while not stop:
            t = time.perf_counter(); await asyncio.sleep(0.005); lags.append(time.perf_counter() - t - 0.005); None
    tk = asyncio.create_task(ticker())
    m = Manager(ws, spawn=1, transport_factory=Never)
    t0 = time.perf_counter()
    async with m:
        while m._run is None or m._run.queue.qsize() < n - 5:
            await asyncio.sleep(0.05)
        print("offered", m._run.queue.qsize(), "in %.2fs" % (time.perf_counter() - t0))
    stop = True; await tk
    print("max loop lag %.1f ms" % (max(lags) * 1000))
asyncio.run(main())
