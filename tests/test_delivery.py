"""Delivery against a real aiosmtpd server: round trips, 5xx, 4xx, server down."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ess_async import Client, Manager, WorkspaceLockedError
from ess_async.spool import decode_record

from .conftest import FakeClock, SMTPServer, free_port, make_config


def final_records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


async def test_round_trip(tmp_path: Path, smtp_server: SMTPServer) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    await manager.create_work(
        to=["Zoë <to@example.com>", "two@example.com"], cc="cc@example.com",
        bcc=["hidden@example.com"], reply_to="reply@example.com",
        subject="Grüße aus Köln ✓", body="Hällo wörld\n", html="<p>Hällo</p>",
        headers={"X-Campaign": "spring"}, tags=["welcome"],
        attachments=[("report.pdf", b"%PDF-1.4 \x00\xff", "application/pdf")],
    )
    summary = await manager.process_workload()
    assert (summary.passed, summary.failed, summary.deferred) == (1, 0, 0)

    (got,) = smtp_server.handler.messages
    assert got.mail_from == "sender@example.com"
    assert sorted(got.rcpt_tos) == sorted(["to@example.com", "two@example.com",
                                           "cc@example.com", "hidden@example.com"])
    msg = got.message
    assert msg["Subject"] == "Grüße aus Köln ✓"
    assert msg["To"] == "Zoë <to@example.com>, two@example.com"
    assert msg["Cc"] == "cc@example.com"
    assert msg["Reply-To"] == "reply@example.com"
    assert msg["X-Campaign"] == "spring"
    assert msg["Bcc"] is None
    assert b"hidden@example.com" not in got.data
    assert msg.get_body(("plain",)).get_content() == "Hällo wörld\n"
    assert msg.get_body(("html",)).get_content() == "<p>Hällo</p>\n"
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == b"%PDF-1.4 \x00\xff"

    (record,) = final_records(tmp_path / "ws", "passed")
    assert record["state"] == "passed"
    assert record["attempts"] == 1
    assert record["result"]["code"] == 250
    assert record["tags"] == ["welcome"]
    assert manager.status()["passed"] == 1


async def test_permanent_failure_records_reply(tmp_path: Path, smtp_server: SMTPServer) -> None:
    smtp_server.handler.data_replies.append("554 5.7.1 Message rejected as spam")
    # One sender, so the scripted reply meets the first message.
    manager = Manager(tmp_path / "ws", spawn=1, config=make_config(smtp_server.port))
    await manager.create_work(to="a@example.com", subject="spam?", body="x")
    await manager.create_work(to="b@example.com", subject="fine", body="x")
    summary = await manager.process_workload()
    assert (summary.passed, summary.failed) == (1, 1)
    (record,) = final_records(tmp_path / "ws", "failed")
    assert record["subject"] == "spam?"
    assert record["result"]["code"] == 554
    assert "rejected as spam" in record["result"]["message"]
    assert record["attempts"] == 1
    assert smtp_server.handler.subjects() == ["fine"]


async def test_all_recipients_refused_permanently(tmp_path: Path,
                                                  smtp_server: SMTPServer) -> None:
    smtp_server.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    await manager.create_work(to="nobody@example.com", subject="x", body="x")
    summary = await manager.process_workload()
    assert summary.failed == 1
    (record,) = final_records(tmp_path / "ws", "failed")
    assert record["result"]["code"] == 550
    assert "No such user" in record["result"]["message"]


async def test_partially_refused_recipients_are_recorded(tmp_path: Path,
                                                         smtp_server: SMTPServer) -> None:
    smtp_server.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    await manager.create_work(to=["nobody@example.com", "ok@example.com"], subject="x")
    assert (await manager.process_workload()).passed == 1
    (record,) = final_records(tmp_path / "ws", "passed")
    assert record["result"]["refused"] == {"nobody@example.com": [550, "5.1.1 No such user"]}
    assert smtp_server.handler.messages[0].rcpt_tos == ["ok@example.com"]


async def test_temporary_failure_defers_then_delivers(tmp_path: Path,
                                                      smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    smtp_server.handler.data_replies.append("451 4.3.0 try again later")
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock)
    path = await manager.create_work(to="a@example.com", subject="later", body="x")

    summary = await manager.process_workload()
    assert (summary.deferred, summary.failed, summary.passed) == (1, 0, 0)
    (record,) = final_records(tmp_path / "ws", "deferred")
    assert record["last_error"]["code"] == 451
    assert record["attempts"] == 1
    assert record["next_attempt_at"] >= clock.now + 1  # min_backoff = 1

    # Not due yet: nothing is sent, nothing is lost, no hot loop.
    assert (await manager.process_workload()).total == 0
    assert smtp_server.handler.messages == []

    clock.advance(10)
    summary = await manager.process_workload()
    assert summary.passed == 1
    assert smtp_server.handler.subjects() == ["later"]
    (record,) = final_records(tmp_path / "ws", "passed")
    assert record["attempts"] == 2
    assert record["id"] + ".json" == path.name


async def test_server_down_then_up(tmp_path: Path) -> None:
    clock = FakeClock()
    server = SMTPServer()  # not started: connections are refused
    manager = Manager(tmp_path / "ws", config=make_config(server.port), clock=clock)
    for i in range(5):
        await manager.create_work(to="a@example.com", subject=f"m{i}", body="x")
    summary = await manager.process_workload()
    # The refused connection pauses the transport: the run ends early instead of
    # hammering a server that is down. A relay that is down is not the messages' fault
    # (issue 9 item 6): they all stay queued and no attempt is charged.
    assert summary.total == 0
    assert manager.status()["queued"] == 5
    assert {r["attempts"] for r in final_records(tmp_path / "ws", "queued")} == {0}

    server.start()
    try:
        clock.advance(10)
        assert (await manager.process_workload()).passed == 5
        assert sorted(server.handler.subjects()) == [f"m{i}" for i in range(5)]
        assert {r["attempts"] for r in final_records(tmp_path / "ws", "passed")} == {1}
    finally:
        server.stop()
    assert manager.status() | {"passed": 0} == {k: 0 for k in manager.status()}


async def test_gives_up_after_max_age(tmp_path: Path, smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    config = make_config(smtp_server.port, retry={"max_age": 60})
    manager = Manager(tmp_path / "ws", config=config, clock=clock)
    await manager.create_work(to="a@example.com", subject="old", body="x")
    smtp_server.handler.data_replies.extend(["451 busy"] * 2)
    assert (await manager.process_workload()).deferred == 1
    clock.advance(120)
    assert (await manager.process_workload()).failed == 1
    (record,) = final_records(tmp_path / "ws", "failed")
    assert record["result"]["reason"] == "gave up"
    assert record["result"]["code"] == 451


async def test_one_connection_per_sender(tmp_path: Path, smtp_server: SMTPServer) -> None:
    manager = Manager(tmp_path / "ws", spawn=2, config=make_config(smtp_server.port))
    client = Client(tmp_path / "ws", config=make_config(smtp_server.port))
    for i in range(40):
        client.create_work(to="a@example.com", subject=f"m{i}")
    assert (await manager.process_workload()).passed == 40
    assert len(set(smtp_server.handler.peers)) <= 2
    assert sorted(smtp_server.handler.subjects()) == sorted(f"m{i}" for i in range(40))


async def test_async_with_delivers_in_background(tmp_path: Path,
                                                 smtp_server: SMTPServer) -> None:
    async with Manager(tmp_path / "ws", config=make_config(smtp_server.port)) as manager:
        for i in range(10):
            await manager.create_work(to="a@example.com", subject=f"m{i}")
        await asyncio.to_thread(smtp_server.handler.wait_for, 10)
    assert manager.status()["passed"] == 10
    assert manager.status()["active"] == 0


async def test_retry_timer_while_serving(tmp_path: Path, smtp_server: SMTPServer) -> None:
    smtp_server.handler.data_replies.append("421 4.7.0 slow down")
    async with Manager(tmp_path / "ws", config=make_config(smtp_server.port)) as manager:
        await manager.create_work(to="a@example.com", subject="retry me")
        await asyncio.to_thread(smtp_server.handler.wait_for, 1, 20)
    assert smtp_server.handler.subjects() == ["retry me"]
    (record,) = final_records(tmp_path / "ws", "passed")
    assert record["attempts"] == 2


async def test_one_deliverer_per_workspace(tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", config=config):
        other = Manager(tmp_path / "ws", config=config)
        with pytest.raises(WorkspaceLockedError, match=str(os.getpid())):
            await other.process_workload()
        with pytest.raises(WorkspaceLockedError):
            await other.cleanup()
        with pytest.raises(WorkspaceLockedError):
            async with other:
                pass
        # Enqueueing never takes the lock.
        await other.create_work(to="a@example.com", subject="while serving")
        Client(tmp_path / "ws", config=config).create_work(to="a@example.com", subject="sync")
        await asyncio.to_thread(smtp_server.handler.wait_for, 2)
    assert (await other.process_workload()).total == 0


async def test_spool_permissions(tmp_path: Path, smtp_server: SMTPServer) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    path = await manager.create_work(to="a@example.com", subject="x")
    assert path.is_absolute() and path.parent == tmp_path / "ws" / "queued"
    assert path.stat().st_mode & 0o777 == 0o600
    await manager.process_workload()
    for folder in (tmp_path / "ws").rglob("*"):
        if folder.is_dir():
            assert folder.stat().st_mode & 0o777 == 0o700, folder
        else:
            assert folder.stat().st_mode & 0o777 == 0o600, folder


async def test_maildir_transport(tmp_path: Path) -> None:
    config = make_config(free_port(), transport={"type": "maildir"})
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="to a folder")
    assert (await manager.process_workload()).passed == 1
    (stored,) = list((tmp_path / "ws" / "maildir" / "new").iterdir())
    assert b"Subject: to a folder" in stored.read_bytes()


async def test_stop_waits_for_a_delegate_running_elsewhere(tmp_path: Path,
                                                           smtp_server: SMTPServer) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    task = asyncio.create_task(manager.delegate_workload(handle_signals=False))
    await manager.create_work(to="a@example.com", subject="x")
    await asyncio.to_thread(smtp_server.handler.wait_for, 1)
    await manager.stop()
    assert task.done()  # stop() returned only once the run had ended and unlocked
    assert (await task).passed == 1
    async with Manager(tmp_path / "ws", config=make_config(smtp_server.port)):
        pass  # the lock is free again
