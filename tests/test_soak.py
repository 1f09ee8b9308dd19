"""Soak: ``serve`` against a server that fails at random (a seeded mix of 250, 451, 550 and
dropped connections), SIGKILLed and restarted every few seconds. Afterwards every message
is in passed/ or failed/ for the right reason, none is lost, and the only duplicates are of
the unavoidable kind (a reply lost after the data, or a kill between 250 and the journal).

The default size suits CI; ESS_SOAK_N=20000 runs the full soak."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ess_async import Client
from ess_async.spool import decode_record

from .conftest import RecordingHandler, SMTPServer, write_config

N = int(os.environ.get("ESS_SOAK_N", "1500"))
SPAWN = 4
KILLS = int(os.environ.get("ESS_SOAK_KILLS", "4"))


class FlakyHandler(RecordingHandler):
    """Answers DATA from a seeded mix and remembers the last answer per subject."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.last_reply: dict[str, str] = {}
        self.drops = 0

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        roll = self.rng.random()
        reply = ("250 OK" if roll < 0.80 else "451 4.3.0 try later" if roll < 0.90
                 else "550 5.7.1 refused" if roll < 0.95 else "DROP")
        subject = _subject(envelope.original_content or b"")
        with self.lock:
            self.last_reply[subject] = reply
            if reply == "DROP":
                self.drops += 1
        self.data_replies.append(reply)
        return await super().handle_DATA(server, session, envelope)


def _subject(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if line.startswith(b"Subject: "):
            return line[9:].decode()
    return ""


def serve(ws: Path) -> subprocess.Popen[bytes]:
    with open(ws.parent / "serve.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "ess_async", "--log-level", "WARNING",
                                 "serve", "--workspace", str(ws), "--spawn", str(SPAWN)],
                                stdout=subprocess.DEVNULL, stderr=log)


def settled(ws: Path) -> int:
    return sum(1 for state in ("passed", "failed") for _ in (ws / state).rglob("*.json"))


@pytest.mark.timeout(600)
def test_soak_with_random_failures_and_kills(tmp_path: Path) -> None:
    server = SMTPServer()
    server.handler = handler = FlakyHandler(seed=20261128)
    server.start()
    ws = tmp_path / "ws"
    write_config(ws, server.port)
    client = Client(ws)
    for i in range(N):
        client.create_work(to=f"r{i % 50}@example.com", subject=f"m{i}")
    rng = random.Random(7)
    try:
        for _ in range(KILLS):
            proc = serve(ws)
            time.sleep(rng.uniform(1.0, 2.5))  # let it work, then kill it mid-flight
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        proc = serve(ws)
        deadline = time.monotonic() + 300
        while settled(ws) < N:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"only {settled(ws)} of {N} settled"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()

    final: dict[str, tuple[str, dict]] = {}
    for state in ("passed", "failed"):
        for path in (ws / state).rglob("*.json"):
            record = decode_record(path.read_bytes())
            assert record["subject"] not in final, (path, final[record["subject"]])
            final[record["subject"]] = (state, record)
    assert len(final) == N  # none lost
    for subject, (state, record) in final.items():
        last = handler.last_reply[subject]
        if state == "failed":
            assert record["result"]["code"] == 550 and last.startswith("550"), subject
        else:  # passed: the server's last answer was 250, or a dropped reply after data
            assert last == "250 OK" or last == "DROP", (subject, last)
    received = Counter(handler.subjects())
    duplicates = sum(received.values()) - len(received)
    assert duplicates <= handler.drops + KILLS * SPAWN
    for folder in ("queued", "active", "deferred"):
        assert list((ws / folder).iterdir()) == []
    print(f"\nsoak: {N} messages, {KILLS} kills, {handler.drops} dropped replies, "
          f"{duplicates} duplicates, {sum(1 for s, _ in final.values() if s == 'failed')} "
          "failed")
