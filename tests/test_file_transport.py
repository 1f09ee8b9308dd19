"""Issue 13 part 5: the file transport writes each message, as sent, to an .eml file."""

from __future__ import annotations

import os
import stat
from email import message_from_bytes, policy
from pathlib import Path

from ess_async import Manager
from ess_async.config import parse_config
from ess_async.spool import decode_record
from ess_async.transports import FileTransport


def file_manager(workspace: Path, **table: object) -> Manager:
    config = parse_config({"message": {"from": "sender@example.com"},
                           "transport": {"type": "file", "file": table}})
    return Manager(workspace, config=config)


async def test_each_message_is_an_eml_file(tmp_path: Path) -> None:
    """Issue 13 part 5: <workspace>/outbox/<time>-<random>.eml, 0600 in a 0700 folder,
    the exact bytes that would be sent (CRLF), in delivery order, no temporary left."""
    manager = file_manager(tmp_path / "ws")
    await manager.create_work(to="a@example.com", bcc="hidden-bcc@example.com", subject="one",
                              body="Grüße\n")
    await manager.create_work(to="c@example.com", subject="two", body="x")
    summary = await manager.process_workload()
    assert summary.passed == 2
    folder = tmp_path / "ws" / "outbox"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(os.listdir(folder))
    assert len(files) == 2 and all(f.endswith(".eml") for f in files)
    passed = {r["subject"]: r for r in (decode_record(p.read_bytes())
                                        for p in (tmp_path / "ws" / "passed").rglob("*.json"))}
    for name in files:
        path = folder / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n") > 0
        msg = message_from_bytes(data, policy=policy.default)
        record = passed[str(msg["Subject"])]
        assert data == record["raw"].encode("ascii")  # as sent, Date stamped
        assert record["result"]["message"] == f"written to {path}"
        assert b"hidden-bcc" not in data  # Bcc: envelope only
    subjects = [str(message_from_bytes((folder / n).read_bytes(), policy=policy.default)
                    ["Subject"]) for n in files]
    assert sorted(subjects) == ["one", "two"]


async def test_path_setting_and_unwritable_folder(tmp_path: Path) -> None:
    """Issue 13 part 5: [transport.file] path is relative to the workspace (or absolute);
    a folder that cannot be written keeps the message queued, uncharged."""
    manager = file_manager(tmp_path / "ws", path="dev/mail")
    await manager.create_work(to="a@example.com", subject="s", body="b")
    assert (await manager.process_workload()).passed == 1
    assert len(list((tmp_path / "ws" / "dev" / "mail").glob("*.eml"))) == 1

    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    manager = file_manager(tmp_path / "ws2", path=str(blocker / "sub"))
    await manager.create_work(to="a@example.com", subject="s", body="b")
    await manager.process_workload()
    (queued,) = (tmp_path / "ws2" / "queued").glob("*.json")
    record = decode_record(queued.read_bytes())
    assert record["attempts"] == 0 and record["last_error"]["destination"] is True


async def test_transport_writes_bytes_verbatim(tmp_path: Path) -> None:
    """Issue 13 part 5: FileTransport.send writes exactly the bytes it is given."""
    transport = FileTransport(tmp_path / "out")
    raw = b"Subject: x\r\n\r\nline\r\n.\r\n"
    result = await transport.send("a@example.com", ["b@example.com"], raw)
    (path,) = (tmp_path / "out").iterdir()
    assert path.read_bytes() == raw and result.code == 250
