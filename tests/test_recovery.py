"""Crash recovery from the journal, and a hostile spool that must not stop delivery."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ess_async import Client, Manager
from ess_async.journal import replay
from ess_async.spool import decode_record

from .conftest import SMTPServer, make_config


def claim_by_hand(workspace: Path, path: Path) -> Path:
    """What a crashed deliverer leaves behind: the message renamed into active/."""
    active = workspace / "active" / path.name
    os.rename(path, active)
    return active


async def test_claimed_but_unsent_is_requeued_and_sent(tmp_path: Path,
                                                       smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    path = Client(ws, config=config).create_work(to="a@example.com", subject="crashed")
    claim_by_hand(ws, path)
    with open(ws / "journal.log", "a") as journal:
        journal.write(json.dumps({"op": "claim", "id": path.stem, "at": 1}) + "\n")
    manager = Manager(ws, config=config)
    assert await manager.cleanup() == {"requeued": 1, "passed": 0, "corrupt": 0,
                                      "unsettled": 0}
    assert path.exists()
    assert (await manager.process_workload()).passed == 1
    assert smtp_server.handler.subjects() == ["crashed"]


async def test_accepted_in_journal_is_never_resent(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    path = Client(ws, config=config).create_work(to="a@example.com", subject="sent once")
    claim_by_hand(ws, path)
    entry = {"op": "accepted", "id": path.stem, "at": 1_800_000_000.0, "code": 250,
             "reply": "OK queued as 1234", "refused": {}}
    # A torn line after it (crash mid-append) must not hide the entry before it.
    (ws / "journal.log").write_text(json.dumps(entry) + "\n" + '{"op": "cla')
    manager = Manager(ws, config=config)
    summary = await manager.process_workload()
    assert summary.total == 0
    assert smtp_server.handler.messages == []
    (passed,) = list((ws / "passed").rglob("*.json"))
    record = decode_record(passed.read_bytes())
    assert record["result"] == {"code": 250, "message": "OK queued as 1234", "refused": {}}
    assert passed.parent.name == "2027-01-15"  # sharded by the journaled acceptance time
    assert manager.status()["active"] == 0
    assert replay(ws / "journal.log") == {}  # compacted once settled


async def test_hostile_spool_is_quarantined(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port, server={"max_message_size": 100_000})
    client = Client(ws, config=config)
    good = [client.create_work(to="a@example.com", subject=f"good{i}") for i in range(3)]
    queued = ws / "queued"
    names = {
        "00000000000000000001-n0000000a.json": b"",
        "00000000000000000002-n0000000b.json": b'{"id": "000',
        "00000000000000000003-n0000000c.json": b"not json at all",
        "00000000000000000004-n0000000d.json": b'["a list"]',
        "00000000000000000005-n0000000e.json": b'{"id": "x", "recipients": "nope"}',
        "00000000000000000006-n0000000f.json": b" " * 200_000,
    }
    for name, data in names.items():
        (queued / name).write_bytes(data)
    os.symlink("/etc/passwd", queued / "00000000000000000007-n00000010.json")
    os.mkfifo(queued / "00000000000000000008-n00000011.json")
    (queued / "00000000000000000009-n00000012.json").mkdir()
    (queued / "evil name.json").write_bytes(b"{}")
    wrong_id = decode_record(good[0].read_bytes())
    (queued / "00000000000000000010-n00000013.json").write_text(json.dumps(wrong_id))

    summary = await Manager(ws, config=config).process_workload()
    assert summary.passed == 3
    assert sorted(smtp_server.handler.subjects()) == ["good0", "good1", "good2"]
    assert os.listdir(queued) == []
    corrupt = sorted(p.name for p in (ws / "corrupt").iterdir() if p.suffix == ".json")
    assert len(corrupt) == 11
    reasons = [json.loads(p.read_text())["reason"]
               for p in (ws / "corrupt").iterdir() if p.suffix == ".reason"]
    assert any("not a regular file" in r for r in reasons)
    assert any("max_message_size" in r for r in reasons)
    assert any("cannot open" in r for r in reasons)  # the symlink was never followed
    assert Path("/etc/passwd").exists()


async def test_unsynced_next_state_copy_is_dropped(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    """A crash before the group sync can leave a torn copy in the next state beside the
    claimed one: recovery drops the torn copy and requeues the claim."""
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    path = Client(ws, config=config).create_work(to="a@example.com", subject="torn")
    claim_by_hand(ws, path)
    (ws / "deferred" / path.name).write_bytes(b"")  # never reached the disk whole
    manager = Manager(ws, config=config)
    assert (await manager.process_workload()).passed == 1
    assert smtp_server.handler.subjects() == ["torn"]
    assert not (ws / "deferred" / path.name).exists()


async def test_spool_record_cannot_inject_smtp_commands(tmp_path: Path,
                                                        smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    path = Client(ws, config=config).create_work(to="a@example.com", subject="tampered")
    record = decode_record(path.read_bytes())
    record["recipients"] = ["a@example.com>\r\nRCPT TO:<evil@example.com"]
    path.write_text(json.dumps(record))
    summary = await Manager(ws, config=config).process_workload()
    assert summary.corrupt == 1
    assert smtp_server.handler.messages == []
    reason = next((ws / "corrupt").glob("*.reason")).read_text()
    assert "recipients" in reason
