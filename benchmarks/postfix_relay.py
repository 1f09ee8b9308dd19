"""Postfix used as a relay beside ess_async, in one run, with the same sink (issue 11).

    python benchmarks/postfix_relay.py [-n 5000] [--repeats 3] [--dir DIR]

Needs root and Postfix's binaries (``apt-get install postfix``; its own service need not
run); skips (exit 0) without them. Starts the benchmark sink (benchmarks/sink.py,
127.0.0.1) and a private Postfix instance (its own config, queue and data directories
under a temp folder in --dir, default ./.bench_tmp; stopped and removed at the end, also
on errors) that accepts mail on 127.0.0.1 only and relays everything to
``[127.0.0.1]:<sink port>``: no DNS, no TLS, no other destination. Then, for N 2 KB
messages (the shape of run.py's), the median of --repeats runs of

1. Postfix draining a backlog: N messages submitted over SMTP to a listener that puts
   them on hold (untimed), then ``postsuper -H ALL`` + ``postqueue -f``, timed from the
   release to the N-th message at the sink;
2. Postfix while the application enqueues: aiosmtplib clients (1 and 8 connections)
   submit N pre-rendered messages as fast as Postfix accepts them, delivery running;
   timed from the first submission to the N-th message at the sink;
3. ess_async: a prequeued backlog drained by ``Manager(spawn=8 / 16).process_workload()``
   and a serving Manager (spawn 16) while ``create_work`` is called N times (1 and 8
   tasks), timed the same way.

Every case checks that the sink got exactly N messages, N distinct. Prints a table and
the ratio ess_async / Postfix. Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402
    AsyncControl,
    Sink,
    attrs,
    checked,
    config_for,
    fs_probe,
    new_workspace,
    prequeue,
)

from ess_async import Manager  # noqa: E402
from ess_async.message import build_message  # noqa: E402

TARGET_RATIO = 3.0
# Outbound concurrency of the private Postfix: as many connections to the sink as
# ess_async's spawn 16. Everything else about the queue is left at Postfix's defaults.
POSTFIX_CONCURRENCY = 16
POSTFIX_PROCESS_LIMIT = 100  # default_process_limit (Postfix's default value, stated)

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
127.0.0.1:{hold_port} inet n - n - - smtpd
  -o smtpd_data_restrictions=check_client_access,static:HOLD
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
smtp unix - - n - - smtp
relay unix - - n - - smtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def postfix_settings(folder: Path, sink_port: int) -> dict[str, str]:
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(folder / "queue"),
        "data_directory": str(folder / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "bench.localdomain",
        "mydomain": "localdomain",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        # Everything goes to the sink, by address (brackets: no MX lookup), never to DNS.
        "relayhost": f"[127.0.0.1]:{sink_port}",
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_tls_security_level": "none",
        "smtp_tls_security_level": "none",
        "maillog_file": str(folder / "maillog"),
        "maillog_file_prefixes": str(folder),
        "default_process_limit": str(POSTFIX_PROCESS_LIMIT),
        "smtp_destination_concurrency_limit": str(POSTFIX_CONCURRENCY),
        "default_destination_concurrency_limit": str(POSTFIX_CONCURRENCY),
        "biff": "no",
    }


def cpu_times() -> tuple[float, float, float]:
    """(busy, iowait, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    total = sum(fields[:8])
    return total - idle - iowait, iowait, total


class MachineCPU:
    """Share of both cores busy (and in iowait) over a block, every process counted
    (Postfix's daemons, the sink, ess_async, and whatever else runs on the machine)."""

    def __enter__(self) -> MachineCPU:
        self._start = cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, iowait, total = (b - a for a, b in zip(self._start, cpu_times(), strict=True))
        self.busy, self.iowait = busy / total * 100, iowait / total * 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postfix_available() -> str | None:
    """Why Postfix cannot run here, or None."""
    missing = [b for b in ("postfix", "postsuper", "postqueue", "postconf")
               if shutil.which(b) is None]
    if missing:
        return f"Postfix is not installed ({', '.join(missing)} not found)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user"
    return None


class Postfix:
    """A private Postfix instance under ``folder``, relaying only to the sink."""

    def __init__(self, base: Path, sink_port: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="postfix-", dir=base))
        self.folder.chmod(0o755)  # the postfix user must reach its queue
        self.conf = self.folder / "conf"
        for sub in ("conf", "queue", "data"):
            (self.folder / sub).mkdir()
        shutil.chown(self.folder / "data", "postfix")
        self.port, self.hold_port = free_port(), free_port()
        self.settings = postfix_settings(self.folder, sink_port)
        (self.conf / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        (self.conf / "master.cf").write_text(
            MASTER_CF.format(port=self.port, hold_port=self.hold_port))
        self.started = False

    def command(self, *args: str) -> str:
        name, *rest = args
        proc = subprocess.run([name, "-c", str(self.conf), *rest], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()}\n{self.log_tail()}")
        return proc.stdout

    def log_tail(self, lines: int = 15) -> str:
        log = self.folder / "maillog"
        if not log.exists():
            return "(no maillog)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        self.command("postfix", "start")
        self.started = True
        for _ in range(100):  # until both listeners accept
            try:
                for port in (self.port, self.hold_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"Postfix did not start listening\n{self.log_tail()}")

    def queued(self) -> int:
        """Queue files in every queue Postfix delivers from or holds."""
        total = 0
        for queue in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(self.folder / "queue" / queue):
                total += len(files)
        return total

    def wait_queued(self, n: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while (count := self.queued()) != n:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postfix holds {count} queue files, expected {n}\n"
                                 f"{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(SystemExit):
                self.command("postfix", "stop")
            self.started = False
            time.sleep(0.5)
        shutil.rmtree(self.folder, ignore_errors=True)


def rendered(n: int, prefix: str) -> list[tuple[str, list[str], bytes]]:
    """N messages as ess_async renders them (Date, Message-ID, ~2.3 KB), each with its own
    Subject (the sink's duplicate check)."""
    out = []
    for i in range(n):
        spec = build_message({"from_": "bench@example.com", **attrs(i, prefix)})
        out.append((spec.mail_from, spec.recipients, spec.raw))
    return out


async def submit(port: int, messages: list[tuple[str, list[str], bytes]],
                 connections: int) -> None:
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
               for _ in range(connections)]
    await asyncio.gather(*(c.connect() for c in clients))

    async def one(smtp: aiosmtplib.SMTP, j: int) -> None:
        for i in range(j, len(messages), connections):
            sender, rcpts, raw = messages[i]
            await smtp.sendmail(sender, rcpts, raw)

    await asyncio.gather(*(one(c, j) for j, c in enumerate(clients)))
    await asyncio.gather(*(c.quit() for c in clients))


def postfix_drain(pf: Postfix, sink: Sink, n: int, run: int) -> dict[str, Any]:
    messages = rendered(n, f"pd{run}-")
    sink.reset()
    asyncio.run(submit(pf.hold_port, messages, 4))
    pf.wait_queued(n)  # all in hold/, nothing delivered
    if sink.count():
        raise SystemExit("Postfix delivered held mail")
    with MachineCPU() as cpu:
        start = time.monotonic()
        pf.command("postsuper", "-H", "ALL")
        pf.command("postqueue", "-f")
        stats = sink.wait(n, timeout=600)
    checked(sink, n, f"postfix drain {run}")
    pf.wait_queued(0)
    return {"msgs/s": n / (stats["at"] - start), "first delivery s": stats["first"] - start,
            "busy %": cpu.busy, "iowait %": cpu.iowait}


def postfix_live(pf: Postfix, sink: Sink, n: int, connections: int, run: int
                 ) -> dict[str, Any]:
    messages = rendered(n, f"pl{connections}-{run}-")
    sink.reset()
    with MachineCPU() as cpu:
        start = time.monotonic()
        asyncio.run(submit(pf.port, messages, connections))
        submitted = time.monotonic()
        stats = sink.wait(n, timeout=600)
    checked(sink, n, f"postfix live {connections} conn {run}")
    pf.wait_queued(0)
    return {"msgs/s": n / (stats["at"] - start), "submit msgs/s": n / (submitted - start),
            "busy %": cpu.busy, "iowait %": cpu.iowait}


async def ess_drain(base: Path, sink: Sink, n: int, spawn: int, run: int) -> dict[str, Any]:
    ws, create_us = new_workspace(base)
    prequeue(ws, n)
    manager = Manager(ws, spawn=spawn, config=config_for(sink.port))
    sink.reset()
    with MachineCPU() as cpu:
        start = time.monotonic()
        summary = await manager.process_workload()
    assert summary.passed == n, summary
    stats = checked(sink, n, f"ess_async drain spawn {spawn} {run}")
    shutil.rmtree(ws, ignore_errors=True)
    return {"msgs/s": n / (stats["at"] - start), "create us": create_us,
            "busy %": cpu.busy, "iowait %": cpu.iowait}


async def ess_live(base: Path, sink: Sink, n: int, tasks: int, run: int) -> dict[str, Any]:
    ws, create_us = new_workspace(base)
    sink.reset()
    control = await AsyncControl.open(sink.ctl_port)
    async with Manager(ws, spawn=16, config=config_for(sink.port)) as manager:
        await asyncio.sleep(0.5)  # serving, idle

        async def caller(j: int) -> None:
            for i in range(j, n, tasks):
                await manager.create_work(**attrs(i, f"el{tasks}-{run}-"))

        with MachineCPU() as cpu:
            start = time.monotonic()
            await asyncio.gather(*(caller(j) for j in range(tasks)))
            enqueued = time.monotonic()
            stats = await control.wait(n, timeout=600)
    await control.close()
    checked(sink, n, f"ess_async live {tasks} tasks {run}")
    shutil.rmtree(ws, ignore_errors=True)
    return {"msgs/s": n / (stats["at"] - start), "submit msgs/s": n / (enqueued - start),
            "create us": create_us, "busy %": cpu.busy, "iowait %": cpu.iowait}


def median_of(label: str, repeats: int, fn: Callable[[int], dict[str, Any]]
              ) -> dict[str, Any]:
    runs = []
    for r in range(repeats):
        result = fn(r)
        print(f"  {label} #{r + 1}: {result['msgs/s']:,.0f} msgs/s", file=sys.stderr)
        runs.append(result)
    out: dict[str, Any] = {"runs": [x["msgs/s"] for x in runs],
                           "msgs/s": statistics.median(x["msgs/s"] for x in runs)}
    for key in ("busy %", "iowait %", "create us"):
        if key in runs[0]:
            out[key] = statistics.median(x[key] for x in runs)
    if "submit msgs/s" in runs[0]:
        out["submit msgs/s"] = statistics.median(x["submit msgs/s"] for x in runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="messages per case (5000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, median (3)")
    parser.add_argument("--dir", type=Path, default=Path.cwd() / ".bench_tmp",
                        help="where the Postfix instance and workspaces go (./.bench_tmp)")
    args = parser.parse_args()
    why = postfix_available()
    if why:
        print(f"skipped: {why}")
        return 0
    n, repeats = args.n, args.repeats
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.dir))
    base.chmod(0o755)
    load_before = os.getloadavg()
    fs_before = fs_probe(base / "probe")
    print(f"  creating a file under {args.dir}: {fs_before:.0f} us", file=sys.stderr)
    version = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    sink = Sink()
    pf = Postfix(base, sink.port)
    rows: dict[str, dict[str, Any]] = {}
    try:
        pf.start()
        rows["postfix drain"] = median_of(
            "Postfix drain", repeats, lambda r: postfix_drain(pf, sink, n, r))
        for k in (1, 8):
            rows[f"postfix live {k}"] = median_of(
                f"Postfix live, {k} conn", repeats,
                lambda r, k=k: postfix_live(pf, sink, n, k, r))
        for k in (8, 16):
            rows[f"ess drain {k}"] = median_of(
                f"ess_async drain, spawn {k}", repeats,
                lambda r, k=k: asyncio.run(ess_drain(base, sink, n, k, r)))
        for k in (1, 8):
            rows[f"ess live {k}"] = median_of(
                f"ess_async live, {k} tasks", repeats,
                lambda r, k=k: asyncio.run(ess_live(base, sink, n, k, r)))
    finally:
        pf.stop()
        sink.close()
        fs_after = fs_probe(base / "probe")
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()

    def rate(key: str) -> str:
        v = rows[key]
        text = f"{v['msgs/s']:,.0f}"
        if "submit msgs/s" in v:
            text += f" (accepted {v['submit msgs/s']:,.0f}/s)"
        text += "; runs " + " / ".join(f"{x:,.0f}" for x in v["runs"])
        text += f"; CPU busy {v['busy %']:.0f}%, iowait {v['iowait %']:.0f}%"
        if "create us" in v:
            text += f"; file create {v['create us']:.0f} us"
        return text

    print(f"\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; nproc {os.cpu_count()}; Postfix "
          f"{version}; load {load_before[0]:.2f} -> {load_after[0]:.2f}; N = {n}, median of "
          f"{repeats}; creating a file: {fs_before:.0f} us (at the end {fs_after:.0f} us)")
    print(f"Postfix: relayhost [127.0.0.1]:<sink>, smtp_destination_concurrency_limit "
          f"{POSTFIX_CONCURRENCY}, default_process_limit {POSTFIX_PROCESS_LIMIT}, queue "
          "defaults otherwise; CPU busy/iowait: both cores, every process on the machine")
    table = [
        ("Postfix drain (postsuper -H ALL + postqueue -f)", rate("postfix drain")),
        ("Postfix live, aiosmtplib 1 conn", rate("postfix live 1")),
        ("Postfix live, aiosmtplib 8 conn", rate("postfix live 8")),
        ("ess_async drain, process_workload spawn 8", rate("ess drain 8")),
        ("ess_async drain, process_workload spawn 16", rate("ess drain 16")),
        ("ess_async live, serving spawn 16, 1 task", rate("ess live 1")),
        ("ess_async live, serving spawn 16, 8 tasks", rate("ess live 8")),
    ]
    width = max(len(a) for a, _ in table)
    for name, value in table:
        print(f"  {name.ljust(width)}  {value}")
    print("\nratios ess_async / Postfix (target >= 3.0 x):")
    pd = rows["postfix drain"]["msgs/s"]
    for k in (8, 16):
        ratio = rows[f"ess drain {k}"]["msgs/s"] / pd
        print(f"  {'met   ' if ratio >= TARGET_RATIO else 'MISSED'}  drain, spawn {k}: "
              f"{ratio:.2f} x")
    for k in (1, 8):
        ratio = rows[f"ess live {k}"]["msgs/s"] / rows[f"postfix live {k}"]["msgs/s"]
        print(f"  {'met   ' if ratio >= TARGET_RATIO else 'MISSED'}  live, {k} task(s) vs "
              f"{k} conn: {ratio:.2f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
