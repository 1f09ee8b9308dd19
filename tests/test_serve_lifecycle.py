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


def test_stop_ends_a_process_run_gracefully(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port, extra="max_per_second = 50\n")
    queue(ws, 300)
    with open(tmp_path / "process.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ess_async", "process", "--workspace",
                                 str(ws)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until(lambda: len(smtp_server.handler.messages) >= 20, what="deliveries")
        stopped = cli(ws, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(30) == 0  # not killed: it finished its in-flight sends
    finally:
        if proc.poll() is None:
            proc.kill()
    counts = status(ws)
    assert counts["active"] == 0
    assert counts["queued"] + counts["passed"] == 300
    assert counts["passed"] == len(smtp_server.handler.messages) < 300
