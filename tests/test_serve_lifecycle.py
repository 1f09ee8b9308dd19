"""``serve`` as a real process: scan and watcher, SIGTERM and SIGKILL in a backlog, the
workspace lock, and ``stop``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ess_async import Client

from .conftest import SMTPServer, write_config


def cli(ws: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ess_async", "--log-level", "WARNING", *args,
                           "--workspace", str(ws)], capture_output=True, text=True,
                          input=stdin, timeout=120)


def start_serve(ws: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = open(ws.parent / "serve.log", "ab")  # noqa: SIM115 - closed by the process's end
    try:
        return subprocess.Popen([sys.executable, "-m", "ess_async", "--log-level", "INFO",
                                 "serve", "--workspace", str(ws), *extra],
                                stdout=subprocess.DEVNULL, stderr=log)
    finally:
        log.close()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def status(ws: Path) -> dict[str, int]:
    result = cli(ws, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def queue(ws: Path, count: int) -> None:
    client = Client(ws)
    for i in range(count):
        client.create_work(to=f"r{i % 20}@example.com", subject=f"m{i}")


def test_scan_watcher_lock_and_stop(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    Client(ws).create_work(to="a@example.com", subject="before start")  # found by the scan
    proc = start_serve(ws)
    try:
        wait_until(lambda: smtp_server.handler.subjects() == ["before start"], what="scan")
        # Dropped by another process while serving: found by the watcher.
        result = cli(ws, "email", "--to", "b@example.com", "--subject", "while serving",
                     "--body", "hi")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(smtp_server.handler.messages) == 2, what="watcher")
        # One deliverer per workspace; enqueueing still works.
        for command in ("process", "serve", "cleanup"):
            refused = cli(ws, command)
            assert refused.returncode == 2
            assert "already being delivered" in refused.stderr
            assert str(proc.pid) in refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
        assert status(ws)["server_pid"] == proc.pid
        stopped = cli(ws, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status(ws)["server_pid"] is None
    assert cli(ws, "stop").returncode == 1  # nobody to stop


def test_sigterm_in_a_backlog_is_graceful(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 1000)
    proc = start_serve(ws, "--spawn", "3")
    try:
        wait_until(lambda: len(smtp_server.handler.messages) >= 100, what="deliveries")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    counts = status(ws)
    assert counts["active"] == 0  # nothing left claimed
    assert counts["queued"] + counts["passed"] == 1000  # nothing lost
    sent = Counter(smtp_server.handler.subjects())
    assert max(sent.values()) == 1
    assert len(sent) == counts["passed"]
    # The rest is delivered by the next run, each message once.
    assert cli(ws, "process").returncode == 0
    assert Counter(smtp_server.handler.subjects()) == Counter(f"m{i}" for i in range(1000))
    counts = status(ws)
    assert counts["passed"] == counts["total"] == 1000


def test_sigkill_in_a_backlog_loses_nothing(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 500)
    spawn = 3
    proc = start_serve(ws, "--spawn", str(spawn))
    try:
        wait_until(lambda: len(smtp_server.handler.messages) >= 100, what="deliveries")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status(ws)["active"] >= 0  # claims may be left; the next start settles them
    proc = start_serve(ws, "--spawn", str(spawn))
    try:
        wait_until(lambda: status(ws)["passed"] == 500, timeout=120, what="the rest")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    sent = Counter(smtp_server.handler.subjects())
    assert set(sent) == {f"m{i}" for i in range(500)}  # none lost
    duplicates = sum(sent.values()) - 500
    assert duplicates <= spawn
    counts = status(ws)
    assert (counts["passed"], counts["active"], counts["queued"], counts["total"]) == \
        (500, 0, 0, 500)


def test_serve_survives_a_bad_file_and_keeps_going(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    proc = start_serve(ws)
    try:
        Client(ws).create_work(to="a@example.com", subject="first")
        wait_until(lambda: len(smtp_server.handler.messages) == 1, what="first")
        (ws / "queued" / "00000000000000000001-n0000000a.json").write_text("{not json")
        Client(ws).create_work(to="a@example.com", subject="after the bad one")
        wait_until(lambda: len(smtp_server.handler.messages) == 2, what="second")
        wait_until(lambda: status(ws)["corrupt"] == 1, what="quarantine")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert os.listdir(ws / "queued") == []


def test_serve_delivers_a_1000_message_backlog(tmp_path: Path,
                                               smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 1000)
    proc = start_serve(ws, "--spawn", "3")
    try:
        wait_until(lambda: len(smtp_server.handler.messages) >= 1000, timeout=120,
                   what="the backlog")
        wait_until(lambda: status(ws)["passed"] == 1000, what="the records")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert Counter(smtp_server.handler.subjects()) == Counter(f"m{i}" for i in range(1000))
    counts = status(ws)
    assert counts["total"] == counts["passed"] == 1000
