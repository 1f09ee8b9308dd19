"""``serve`` as a real process against a real SMTP server on 127.0.0.1: the start-up scan,
the watcher, the workspace lock, ``stop``, SIGTERM in a backlog and SIGKILL in a backlog."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ess_async import Client
from ess_async.lock import lock_holder
from ess_async.spool import decode_record

from .conftest import Server, SMTPServer, cli_env, wait_until, write_config

STATE_KEYS = ("queued", "scheduled", "active", "deferred", "held", "passed", "failed",
              "corrupt")


def run(ws: Path, command: str, *args: str, log_level: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ess_async"]
    if log_level is not None:
        argv += ["--log-level", log_level]
    return subprocess.run([*argv, command, "--workspace", str(ws), *args], capture_output=True,
                          text=True, timeout=timeout, env=cli_env(), cwd=ws.parent)


def status(ws: Path) -> dict[str, int]:
    result = run(ws, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def assert_adds_up(counts: dict[str, int], total: int) -> None:
    assert sum(counts[k] for k in STATE_KEYS) == counts["total"] == total, counts


def queue(ws: Path, count: int, prefix: str = "m") -> set[str]:
    """Queue ``count`` messages from the test process; returns their ids."""
    client = Client(ws)
    return {client.create_work(to=f"r{i % 7}@example.com", subject=f"{prefix}{i}").stem
            for i in range(count)}


def ids_in(ws: Path, state: str) -> set[str]:
    return {p.stem for p in (ws / state).rglob("*.json")}


def subjects_in(ws: Path, state: str) -> set[str]:
    return {decode_record(p.read_bytes())["subject"] for p in (ws / state).rglob("*.json")}


def assert_refused(result: subprocess.CompletedProcess[str], pid: int) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "already being delivered" in lines[0], lines[0]
    assert str(pid) in lines[0], lines[0]


# -- scan and watcher ------------------------------------------------------------------


def test_serve_delivers_scanned_and_watched_messages(tmp_path: Path, smtp_server: SMTPServer,
                                                     servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    handler = smtp_server.handler
    before = Client(ws).create_work(to="a@example.com", subject="before start").stem

    server = servers(ws)
    server.wait_serving()
    handler.wait_for(1, timeout=20)  # found by the start-up scan
    assert handler.subjects() == ["before start"]
    wait_until(lambda: before in ids_in(ws, "passed"), 10, "the scanned message in passed/")
    assert status(ws)["server_pid"] == server.pid

    # Dropped by another process while serve runs: only the watcher can see it within the
    # deadline (the safety-net rescan comes after 30 s).
    t0 = time.monotonic()
    dropped = run(ws, "email", "--to", "b@example.com", "--subject", "while serving")
    assert dropped.returncode == 0, dropped.stderr
    handler.wait_for(2, timeout=15)
    assert time.monotonic() - t0 < 25
    assert sorted(handler.subjects()) == ["before start", "while serving"]
    path = Path(dropped.stdout.strip())
    wait_until(lambda: path.stem in ids_in(ws, "passed"), 10, "the dropped message in passed/")

    # And a burst from the test process.
    burst = queue(ws, 20, prefix="burst")
    handler.wait_for(22, timeout=20)
    wait_until(lambda: burst <= ids_in(ws, "passed"), 10, "the burst in passed/")

    assert server.terminate_and_wait() == 0, server.log()
    assert lock_holder(ws) is None
    received = Counter(handler.subjects())
    assert max(received.values()) == 1
    assert len(received) == 22
    counts = status(ws)
    assert counts["passed"] == 22 and counts["active"] == 0 and counts["queued"] == 0
    assert counts["server_pid"] is None
    assert_adds_up(counts, 22)


# -- the workspace lock ----------------------------------------------------------------


def test_second_deliverer_and_cleanup_refused_while_email_works(
        tmp_path: Path, smtp_server: SMTPServer, servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    server = servers(ws)
    server.wait_serving()

    assert_refused(run(ws, "process"), server.pid)
    assert_refused(run(ws, "cleanup"), server.pid)
    second = servers(ws, name="second")
    assert second.wait(timeout=30) != 0
    lines = second.err.read_text().strip().splitlines()
    assert len(lines) == 1 and "already being delivered" in lines[0], second.log()
    assert lock_holder(ws) == server.pid  # nobody took the lock from the first
    assert server.proc.poll() is None, server.log()

    # Enqueueing never needs the lock: the running server delivers it.
    result = run(ws, "email", "--to", "a@example.com", "--subject", "still works")
    assert result.returncode == 0, result.stderr
    smtp_server.handler.wait_for(1, timeout=15)
    assert smtp_server.handler.subjects() == ["still works"]
    wait_until(lambda: status(ws)["passed"] == 1, 10, "the message in passed/")

    assert server.terminate_and_wait() == 0, server.log()
    # Once it is gone, the refused commands work.
    cleanup = run(ws, "cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert run(ws, "process").returncode == 0
    assert len(smtp_server.handler.messages) == 1


@pytest.mark.parametrize("how", ["stop", "SIGINT"])
def test_stop_command_stops_the_server(tmp_path: Path, smtp_server: SMTPServer,
                                       servers: Callable[..., Server], how: str) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    server = servers(ws)
    server.wait_serving()
    queue(ws, 3)
    smtp_server.handler.wait_for(3, timeout=15)

    if how == "stop":
        result = run(ws, "stop")
        assert result.returncode == 0, result.stderr
        assert "stopped" in result.stdout
    else:
        server.proc.send_signal(signal.SIGINT)
    assert server.wait(timeout=30) == 0, server.log()
    assert lock_holder(ws) is None
    assert "Traceback" not in server.log()
    again = run(ws, "stop")
    assert again.returncode != 0
    counts = status(ws)
    assert counts["passed"] == 3 and counts["server_pid"] is None
    assert_adds_up(counts, 3)


# -- signals in a backlog --------------------------------------------------------------


def test_sigterm_during_backlog_loses_nothing(tmp_path: Path, smtp_server: SMTPServer,
                                              servers: Callable[..., Server]) -> None:
    n, spawn = 300, 3
    ws = tmp_path / "ws"
    # A rate cap keeps a backlog around long enough to stop in the middle of it.
    write_config(ws, smtp_server.port, extra="max_per_second = 150\n")
    ids = queue(ws, n)
    handler = smtp_server.handler

    server = servers(ws, "--spawn", str(spawn))
    handler.wait_for(30, timeout=30)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.log()
    assert lock_holder(ws) is None

    at_stop = Counter(handler.subjects())
    assert sum(at_stop.values()) < n, "the backlog was gone before SIGTERM: nothing tested"
    assert max(at_stop.values()) == 1  # a graceful stop resends nothing
    assert ids_in(ws, "active") == set()
    assert list((ws / "active").iterdir()) == []
    queued, passed = ids_in(ws, "queued"), ids_in(ws, "passed")
    assert queued.isdisjoint(passed)
    assert queued | passed == ids  # none lost, none elsewhere
    # What the spool calls passed is exactly what the server has.
    assert subjects_in(ws, "passed") == set(at_stop)
    counts = status(ws)
    assert counts["queued"] == len(queued) > 0
    assert_adds_up(counts, n)

    rest = run(ws, "process", "--spawn", str(spawn), log_level="WARNING")
    assert rest.returncode == 0, rest.stderr
    received = Counter(handler.subjects())
    assert set(received) == {f"m{i}" for i in range(n)}
    assert max(received.values()) <= 2  # each at most once extra
    assert sum(received.values()) - n <= spawn
    counts = status(ws)
    assert counts["passed"] == n and counts["queued"] == 0 and counts["active"] == 0
    assert_adds_up(counts, n)


@pytest.mark.parametrize("restart", ["serve", "process"])
def test_sigkill_during_backlog_then_restart(tmp_path: Path, smtp_server: SMTPServer,
                                             servers: Callable[..., Server],
                                             restart: str) -> None:
    n, spawn = 500, 3
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    ids = queue(ws, n)
    handler = smtp_server.handler

    victim = servers(ws, "--spawn", str(spawn), name="victim")
    handler.wait_for(100, timeout=30)
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    at_kill = len(handler.messages)
    assert at_kill < n, "the backlog was gone before SIGKILL: nothing tested"
    wait_until(lambda: lock_holder(ws) is None, 10, "the kernel to drop the dead lock")

    if restart == "serve":
        fresh = servers(ws, "--spawn", str(spawn), name="fresh")
        # Counting first keeps the poll cheap (parsing 500 messages every 20 ms would
        # starve the SMTP server thread, which shares this process).
        wait_until(lambda: len(handler.messages) >= n and len(set(handler.subjects())) >= n,
                   40, "every message to reach the server")
        wait_until(lambda: ids_in(ws, "passed") == ids, 20, "every message in passed/")
        assert fresh.terminate_and_wait() == 0, fresh.log()
    else:
        result = run(ws, "process", "--spawn", str(spawn), log_level="WARNING")
        assert result.returncode == 0, result.stderr

    received = Counter(handler.subjects())
    assert set(received) == {f"m{i}" for i in range(n)}  # none lost
    duplicates = sum(received.values()) - n
    assert max(received.values()) <= 2, received.most_common(3)
    assert duplicates <= spawn, f"{duplicates} duplicates: {received.most_common(spawn + 1)}"
    assert ids_in(ws, "passed") == ids
    assert list((ws / "active").iterdir()) == []
    counts = status(ws)
    assert counts["passed"] == n and counts["queued"] == 0 and counts["active"] == 0
    assert_adds_up(counts, n)


def test_sigterm_cuts_hung_sends_at_grace(tmp_path: Path, servers: Callable[..., Server]) -> None:
    """A server that accepts connections and never answers: SIGTERM waits out the grace
    period (5 s in the test config), then the claimed messages go back to queued/."""
    ws = tmp_path / "ws"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(20)
        write_config(ws, listener.getsockname()[1])
        ids = queue(ws, 3)
        server = servers(ws, "--spawn", "2")
        conns = [listener.accept()[0] for _ in range(2)]
        try:
            wait_until(lambda: len(ids_in(ws, "active")) == 2, 10, "two claims in active/")
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0, server.log()
            assert time.monotonic() - t0 < 15  # grace (5 s) plus shutdown, not the timeout
        finally:
            for conn in conns:
                conn.close()
    assert ids_in(ws, "active") == set()
    assert ids_in(ws, "queued") == ids
    assert_adds_up(status(ws), 3)


def test_deferred_message_is_retried_while_serving(tmp_path: Path, smtp_server: SMTPServer,
                                                   servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)  # min_backoff 1 s, max_backoff 2 s
    smtp_server.handler.data_replies.append("451 4.3.0 try again later")
    [msg_id] = queue(ws, 1)
    server = servers(ws)
    smtp_server.handler.wait_for(1, timeout=20)  # the 451 is not recorded; the retry is
    wait_until(lambda: msg_id in ids_in(ws, "passed"), 10, "the retried message in passed/")
    [path] = (ws / "passed").rglob(f"{msg_id}.json")
    assert decode_record(path.read_bytes())["attempts"] == 2
    assert server.terminate_and_wait() == 0, server.log()
    counts = status(ws)
    assert counts["passed"] == 1 and counts["deferred"] == 0
    assert_adds_up(counts, 1)
