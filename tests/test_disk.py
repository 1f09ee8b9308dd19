"""A full disk (RLIMIT_FSIZE in a child process): clear errors, no partial files, and a
delivered message whose passed/ record cannot be written is never sent again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ess_async import Client
from ess_async.spool import decode_record

from .conftest import SMTPServer, write_config

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""

ENQUEUE_BIG = LIMITED + """
from ess_async import Client, SpoolError
try:
    Client(sys.argv[1]).create_work(to="a@example.com", subject="big",
                                    attachments=[("big.bin", b"x" * 200_000, "application/x")])
except SpoolError as exc:
    print("SpoolError:", exc)
    sys.exit(3)
"""

PROCESS = LIMITED + """
import asyncio
from ess_async import Manager
print(asyncio.run(Manager(sys.argv[1], spawn=1).process_workload()))
"""


def test_enqueue_on_a_full_disk(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write_config(ws, 25)
    Client(ws).create_work(to="a@example.com", subject="small")  # creates the folders
    proc = subprocess.run([sys.executable, "-c", ENQUEUE_BIG, str(ws), "50000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "File too large" in proc.stdout and "cannot write" in proc.stdout
    assert len(list((ws / "queued").iterdir())) == 1  # only the small one
    assert list((ws / "tmp").iterdir()) == []  # the partial write was removed


def test_passed_record_unwritable_is_not_resent(tmp_path: Path,
                                                smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    path = Client(ws).create_work(to="a@example.com", subject="once")
    # Big enough for the journal, too small for the passed record (it adds the result).
    limit = path.stat().st_size + 10
    proc = subprocess.run([sys.executable, "-c", PROCESS, str(ws), str(limit)],
                          capture_output=True, text=True, timeout=60)
    assert smtp_server.handler.subjects() == ["once"]
    assert "File too large" in proc.stderr
    assert list((ws / "active").iterdir()) != []  # delivered, but not yet recorded
    journal = [json.loads(line) for line in (ws / "journal.log").read_text().splitlines()]
    assert [e["op"] for e in journal] == ["accepted"]

    # Space again: the next run finishes it as passed without sending it again.
    proc = subprocess.run([sys.executable, "-m", "ess_async", "process", "--workspace",
                           str(ws)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert smtp_server.handler.subjects() == ["once"]
    (passed,) = list((ws / "passed").rglob("*.json"))
    assert decode_record(passed.read_bytes())["result"]["code"] == 250


def test_unwritable_deferral_puts_the_message_back(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    path = Client(ws).create_work(to="a@example.com", subject="later")
    smtp_server.handler.data_replies.append("451 4.3.0 try later")
    # Room for the journal, not for the deferred record (it adds the error).
    limit = path.stat().st_size + 10
    proc = subprocess.run([sys.executable, "-c", PROCESS, str(ws), str(limit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "File too large" in proc.stderr
    assert [p.name for p in (ws / "queued").iterdir()] == [path.name]  # back, not lost
    assert list((ws / "active").iterdir()) == []
    assert list((ws / "deferred").iterdir()) == []
