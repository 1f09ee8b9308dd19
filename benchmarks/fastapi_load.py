"""Embedded: the README's FastAPI example under a real HTTP load generator (issue 11).

    python benchmarks/fastapi_load.py [-n 5000] [-c 50] [--warmup 500] [--rounds 2]
        [--loop asyncio|uvloop|both] [--generator auto|ab|wrk|hey|python] [--spawn K]
        [--processes N] [--dir DIR] [--json OUT]

Needs uvicorn (``pip install -e '.[bench]'``) and, preferably, ApacheBench (``ab``,
Debian package ``apache2-utils``); without it ``wrk`` or ``hey``, else a load generator
in a separate Python process (asyncio, raw HTTP/1.1 keep-alive sockets).

For each event loop (``--loop``): writes the README's FastAPI example (the same code,
``Manager(workspace="ess_data")`` relative to a fresh temporary folder under ``--dir``)
plus a no-op endpoint in the same app (``POST /noop?email=...``, same signature, returns
the same JSON without touching the outbox), and ``ess_data/config.toml`` pointing the
SMTP transport at the benchmark sink (``sink.py``, 127.0.0.1). Runs the app under uvicorn
in a subprocess (one worker, no access log), warms both endpoints up, then measures
requests/s of ``/noop`` and ``/signup`` alternately, ``--rounds`` times, ``-n`` requests
each, ``-c`` concurrent connections. ``/signup`` enqueues one message per request with
``create_work`` while the same process delivers the queue to the sink.

Checks: every request of every run answered 200; the sink received exactly one message
per successful signup (warm-up included), all with distinct Message-IDs, and those are
the Message-IDs of the ``passed/`` records; nothing is left queued, deferred or failed.
Reports the ratio signup / noop (target: >= 0.6), the uvicorn process's own CPU per request
(its threads, not its children), how many messages reached the sink while the signup load
ran, the drain time after it, and "with delivery": requests / (load time + drain), the
rate at which delivery keeps up. ``--processes N`` is not the README's code: it measures
``Manager(workspace="ess_data", processes=N)`` (delivery in worker processes). All
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import json
import os
import platform
import re
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.6
EMAIL = "user%40example.com"

# Appended to the README's "FastAPI" example (read from README.md): a no-op endpoint of
# the same app.
NOOP_ENDPOINT = '''

# Benchmark only: the same app and signature, without the outbox.
@app.post("/noop")
async def noop(request: Request, email: str):
    return {"ok": True}
'''

CONFIG = '''\
[message]
from = "bench@example.com"

[transport.smtp]
host = "127.0.0.1"
port = {port}
local_hostname = "bench.example.com"
{server}'''

# The benchmark sink, keyed by Message-ID instead of Subject (every signup is "Welcome"):
# its "distinct" is then the number of distinct messages, so a duplicate shows.
SINK_BY_MESSAGE_ID = (
    "import asyncio, sys; sys.path.insert(0, {here!r}); import sink; "
    "sink.SUBJECT = b'\\r\\nMessage-ID: '; asyncio.run(sink.main())")


def readme_app() -> str:
    """README.md's FastAPI example, as written there: the app measured here."""
    readme = (HERE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### FastAPI", 1)[-1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if not match or "FastAPI(" not in match.group(1):
        raise SystemExit("README.md has no FastAPI example under '### FastAPI'")
    return match.group(1)


class SinkProc:
    """sink.py in its own process (127.0.0.1) and a blocking control connection."""

    def __init__(self) -> None:
        code = SINK_BY_MESSAGE_ID.format(here=str(HERE))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        port, ctl = self.proc.stdout.readline().split()
        self.port = int(port)
        self.ctl = socket.create_connection(("127.0.0.1", int(ctl)))
        self.ctl_file = self.ctl.makefile("rb")

    def ask(self, command: str) -> Any:
        self.ctl.sendall(command.encode() + b"\n")
        line = self.ctl_file.readline()
        return json.loads(line) if line.startswith(b"{") else line.strip().decode()

    def count(self) -> int:
        return int(self.ask("COUNT"))

    def close(self) -> None:
        self.ctl.close()
        self.proc.kill()
        self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a live process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- load generators -------------------------------------------------------------------


def pick_generator(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    for tool in ("ab", "wrk", "hey"):
        if shutil.which(tool):
            return tool
    return "python"


def run_generator(tool: str, url: str, n: int, c: int, workdir: Path) -> dict[str, Any]:
    """n POST requests to url over c concurrent connections; requests/s and failures."""
    before = children_cpu()
    c = min(c, n)  # ab refuses more connections than requests
    if tool == "ab":
        empty = workdir / "empty.txt"
        empty.write_bytes(b"")
        out = subprocess.run(["ab", "-q", "-k", "-n", str(n), "-c", str(c), "-p", str(empty),
                              "-T", "application/x-www-form-urlencoded", url],
                             capture_output=True, text=True, check=True).stdout

        def grab(label: str, default: str = "0") -> str:
            m = re.search(rf"^{re.escape(label)}:\s+([\d.]+)", out, re.M)
            return m.group(1) if m else default

        pcts = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", out, re.M))
        result = {"rps": float(grab("Requests per second")),
                  "complete": int(grab("Complete requests")),
                  "failed": int(grab("Failed requests")),
                  "non2xx": int(grab("Non-2xx responses")),
                  "keepalive": int(grab("Keep-Alive requests")),
                  "p50 ms": float(pcts.get("50", "nan")), "p99 ms": float(pcts.get("99", "nan"))}
    elif tool == "hey":
        out = subprocess.run(["hey", "-n", str(n), "-c", str(c), "-m", "POST", url],
                             capture_output=True, text=True, check=True).stdout
        codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
        ok = int(codes.get("200", "0"))
        result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
                  "complete": sum(int(v) for v in codes.values()), "failed": n - ok,
                  "non2xx": sum(int(v) for k, v in codes.items() if k != "200")}
    elif tool == "wrk":
        # wrk runs for a duration, not a count: about n requests at the noop's pace is
        # not knowable ahead, so it runs 10 s; "complete" is what it managed.
        script = workdir / "post.lua"
        script.write_text('wrk.method = "POST"\n')
        out = subprocess.run(["wrk", "-t1", f"-c{c}", "-d10s", "-s", str(script), url],
                             capture_output=True, text=True, check=True).stdout
        m = re.search(r"(\d+) requests in", out)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                           out)
        result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
                  "complete": int(m.group(1)) if m else 0,
                  "failed": sum(map(int, errors.groups())) if errors else 0,
                  "non2xx": int(bad.group(1)) if bad else 0}
    else:
        out = subprocess.run([sys.executable, __file__, "_loadgen", url, str(n), str(c)],
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out)
    result["generator cpu s"] = children_cpu() - before
    return result


async def python_loadgen(url: str, n: int, c: int) -> dict[str, Any]:
    """The fallback generator (run in its own process): c keep-alive HTTP/1.1
    connections sharing n POST requests; a connection the server closes is reopened."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    host, port, target = m.group(1), int(m.group(2)), m.group(3)
    request = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Content-Length: 0\r\n\r\n").encode()
    remaining = n
    latencies: list[float] = []
    failed = non2xx = 0

    async def connection() -> None:
        nonlocal remaining, failed, non2xx
        reader = writer = None
        while remaining > 0:
            remaining -= 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not head.startswith(b"HTTP/1.1 200"):
                    non2xx += 1
                if re.search(rb"(?i)connection:\s*close", head):
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, AttributeError):
                failed += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(c)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": n / elapsed, "complete": n, "failed": failed, "non2xx": non2xx,
            "p50 ms": statistics.median(latencies) * 1000 if latencies else None,
            "p99 ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None}


# -- one app under uvicorn ---------------------------------------------------------------


class App:
    """The README app in a fresh folder, served by uvicorn in a subprocess."""

    def __init__(self, base: Path, sink_port: int, loop: str, spawn: int | None,
                 processes: int | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fastapi-", dir=base))
        code = readme_app()
        if processes:  # not the README's code: delivery in worker processes
            code = code.replace('Manager(workspace="ess_data")',
                                f'Manager(workspace="ess_data", processes={processes})')
        (self.dir / "app.py").write_text(code + NOOP_ENDPOINT)
        self.ws = self.dir / "ess_data"
        self.ws.mkdir()
        server = f"\n[server]\nspawn = {spawn}\n" if spawn else ""
        (self.ws / "config.toml").write_text(CONFIG.format(port=sink_port, server=server))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--loop", loop,
             "--no-access-log", "--log-level", "warning", "--backlog", "2048"],
            cwd=self.dir)
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("POST", f"/noop?email={EMAIL}")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"uvicorn did not start (exit {self.proc.poll()})")
            time.sleep(0.1)

    def stop(self) -> int:
        """SIGINT: uvicorn runs the lifespan's shutdown (the Manager stops gracefully)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise SystemExit("uvicorn did not stop within 60 s") from None

    def passed_message_ids(self) -> list[str]:
        ids = []
        for root, _, files in os.walk(self.ws / "passed"):
            for name in files:
                from ess_async.spool import decode_record  # records carry update lines

                record = decode_record(Path(root, name).read_bytes())
                found = re.search(r"\r\nMessage-ID: (\S+)\r\n", record["raw"])
                ids.append(found.group(1) if found else record.get("message_id", ""))
        return ids


def measure(loop: str, tool: str, sink: SinkProc, base: Path, n: int, c: int, warmup: int,
            rounds: int, spawn: int | None, processes: int | None) -> dict[str, Any]:
    sink.ask("RESET")
    app = App(base, sink.port, loop, spawn, processes)
    noop_url = f"{app.url}/noop?email={EMAIL}"
    signup_url = f"{app.url}/signup?email={EMAIL}"
    runs: list[dict[str, Any]] = []
    signups = 0
    try:
        for url in (noop_url, signup_url):
            r = run_generator(tool, url, warmup, c, app.dir)
            signups += r["complete"] - r["failed"] - r["non2xx"] if url == signup_url else 0
        sink.ask(f"WAIT {signups} 60")  # start each measurement with an empty queue
        for i in range(rounds):
            for name, url in (("noop", noop_url), ("signup", signup_url)):
                at_sink = sink.count()
                cpu = cpu_seconds(app.proc.pid)
                r = run_generator(tool, url, n, c, app.dir)
                r["server cpu us/req"] = (cpu_seconds(app.proc.pid) - cpu) / r["complete"] * 1e6
                r.update(endpoint=name, round=i + 1)
                if name == "signup":
                    ended = time.monotonic()
                    r["delivered during"] = sink.count() - at_sink
                    signups += r["complete"] - r["failed"] - r["non2xx"]
                    reply = sink.ask(f"WAIT {signups} 120")
                    if reply["at"] is None:
                        raise SystemExit(f"the sink has {reply['count']} of {signups}")
                    r["drain s"] = max(0.0, reply["at"] - ended)
                    # Requests answered and their messages at the sink: the rate the app
                    # could sustain if delivery had to keep up.
                    r["with delivery rps"] = r["complete"] / (r["complete"] / r["rps"]
                                                              + r["drain s"])
                runs.append(r)
                print(f"  [{loop}] round {i + 1} {name:6}: {r['rps']:8,.0f} req/s  "
                      f"server CPU {r['server cpu us/req']:5.0f} us/req  "
                      f"failed {r['failed']} non-2xx {r['non2xx']}"
                      + (f"  delivered during {r['delivered during']}/{r['complete']}, "
                         f"drained {r['drain s']:.2f} s after "
                         f"({r['with delivery rps']:,.0f} req/s with delivery)"
                         if name == "signup" else ""),
                      file=sys.stderr)
    finally:
        exit_code = app.stop()
    time.sleep(0.2)  # anything sent twice would arrive right behind
    stats = sink.ask("STATS")
    from ess_async.spool import Spool  # here: the parent process needs no FastAPI
    counts = {k: v for k, v in Spool(app.ws).counts().items() if v}
    passed_ids = app.passed_message_ids()
    sink_ids = set(sink.ask("TIMES"))
    check = {"signups": signups, "sink count": stats["count"], "sink distinct": stats["distinct"],
             "spool": counts, "uvicorn exit": exit_code,
             "passed == sink ids": set(passed_ids) == sink_ids and len(passed_ids) == signups}
    check["ok"] = (stats["count"] == signups == stats["distinct"] and counts == {"passed": signups}
                   and check["passed == sink ids"]
                   and all(r["failed"] == r["non2xx"] == 0 for r in runs))
    shutil.rmtree(app.dir, ignore_errors=True)
    noop = [r["rps"] for r in runs if r["endpoint"] == "noop"]
    signup = [r["rps"] for r in runs if r["endpoint"] == "signup"]
    pairs = [s / o for s, o in zip(signup, noop, strict=True)]
    return {"loop": loop, "runs": runs, "check": check, "noop rps": noop, "signup rps": signup,
            "ratio per round": pairs, "ratio of means": statistics.mean(signup)
            / statistics.mean(noop),
            "with delivery ratio": statistics.mean(
                r["with delivery rps"] for r in runs if r["endpoint"] == "signup")
            / statistics.mean(noop)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="requests per measured run")
    parser.add_argument("-c", type=int, default=50, help="concurrent connections")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--generator", choices=("auto", "ab", "wrk", "hey", "python"),
                        default="auto")
    parser.add_argument("--spawn", type=int,
                        help="[server] spawn in the app's config (default: the config's 3)")
    parser.add_argument("--processes", type=int,
                        help="Manager(..., processes=N): delivery in N worker processes "
                             "(not the README's code; default: the app's process delivers)")
    parser.add_argument("--dir", type=Path, default=Path(".bench_tmp"),
                        help="where the temporary app folders go (default ./.bench_tmp)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if importlib.util.find_spec("uvicorn") is None:
        raise SystemExit("uvicorn is not installed: pip install -e '.[bench]'")
    readme_app()  # fails early if README.md lost its example
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    if "uvloop" in loops and importlib.util.find_spec("uvloop") is None:
        print("uvloop is not installed: asyncio only", file=sys.stderr)
        loops = [loop for loop in loops if loop != "uvloop"] or ["asyncio"]
    tool = pick_generator(args.generator)
    if tool != "python" and not shutil.which(tool):
        raise SystemExit(f"{tool} is not installed")
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    args.dir.mkdir(parents=True, exist_ok=True)
    import uvicorn

    env = {"python": platform.python_version(), "uvicorn": uvicorn.__version__,
           "http": http_impl, "generator": tool, "cores": os.cpu_count(),
           "load before": os.getloadavg(), "n": args.n, "c": args.c,
           "warmup": args.warmup, "rounds": args.rounds, "spawn": args.spawn or 3,
           "processes": args.processes or 0}
    print(f"uvicorn {env['uvicorn']} ({http_impl}), generator {tool}, {args.c} connections, "
          f"{args.n} requests per run, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    sink = SinkProc()
    results = []
    try:
        for loop in loops:
            results.append(measure(loop, tool, sink, args.dir, args.n, args.c, args.warmup,
                                   args.rounds, args.spawn, args.processes))
    finally:
        sink.close()
    env["load after"] = os.getloadavg()

    print(textwrap.dedent(f"""
        uvicorn {env['uvicorn']} ({http_impl}), 1 worker, {tool}, -c {args.c}, -n {args.n},
        {args.rounds} rounds, spawn {args.spawn or 3}, processes {args.processes or 0};
        load average {env['load before'][0]:.2f} -> {env['load after'][0]:.2f}
        """))
    print("| loop | noop req/s | signup req/s | ratio (per round) | signup with delivery "
          "req/s (ratio) | server CPU us/req noop / signup | delivered during signup "
          "| check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    met = True
    for res in results:
        runs = res["runs"]
        cpu = {e: statistics.mean(r["server cpu us/req"] for r in runs if r["endpoint"] == e)
               for e in ("noop", "signup")}
        during = [f"{r['delivered during']}/{r['complete']}" for r in runs
                  if r["endpoint"] == "signup"]
        ratio = res["ratio of means"]
        with_delivery = [f"{r['with delivery rps']:,.0f}" for r in runs
                         if r["endpoint"] == "signup"]
        met = met and ratio >= TARGET_RATIO and res["check"]["ok"]
        print(f"| {res['loop']} | {' / '.join(f'{x:,.0f}' for x in res['noop rps'])} "
              f"| {' / '.join(f'{x:,.0f}' for x in res['signup rps'])} "
              f"| {ratio:.2f} ({' / '.join(f'{x:.2f}' for x in res['ratio per round'])}) "
              f"| {' / '.join(with_delivery)} ({res['with delivery ratio']:.2f}) "
              f"| {cpu['noop']:.0f} / {cpu['signup']:.0f} | {', '.join(during)} "
              f"| {'OK' if res['check']['ok'] else 'FAILED'} |")
        print(f"  check [{res['loop']}]: {res['check']}", file=sys.stderr)
    print(f"\ntarget signup >= {TARGET_RATIO} x noop: {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1))
    if not all(res["check"]["ok"] for res in results):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        url, n, c = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(python_loadgen(url, n, c))))
    else:
        main()
