"""Issue 14 part 6: expiry (expires_at / expires_in), checked at claim, retries included,
against a real aiosmtpd server with an injected clock (no sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageError
from ess_async.spool import decode_record

from .conftest import FakeClock, SMTPServer, make_config


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


async def test_expired_message_is_never_sent(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 6: a message claimed after its expires_in goes to failed/ with
    reason "expired" and is never sent; one still in time is sent."""
    clock = FakeClock()
    ws = tmp_path / "ws"
    manager = Manager(ws, config=make_config(smtp_server.port), clock=clock)
    stale = await manager.create_work(to="a@example.com", subject="code 123456",
                                      expires_in=60)
    fresh = await manager.create_work(to="a@example.com", subject="later", expires_in=600)
    assert decode_record(stale.read_bytes())["expires_at"] == clock.now + 60
    clock.advance(61)
    summary = await manager.process_workload()
    assert (summary.passed, summary.failed) == (1, 1)
    assert smtp_server.handler.subjects() == ["later"]
    (record,) = records(ws, "failed")
    assert record["id"] == stale.stem
    assert record["result"]["reason"] == "expired"
    assert record["attempts"] == 0
    assert (await manager.wait(fresh, timeout=5)).state == "passed"


async def test_expiry_is_checked_for_retries(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 6: a deferred message whose expiry passes before its retry is not
    retried: its retry is timed for the expiry (not later), and at that claim it fails
    as expired; the server got nothing more."""
    clock = FakeClock()
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port, retry={"min_backoff": 120, "max_backoff": 600})
    manager = Manager(ws, config=config, clock=clock, rand=lambda: 0.0)
    smtp_server.handler.rcpt_replies["a@example.com"] = ["451 4.3.0 try later"]
    await manager.create_work(to="a@example.com", subject="reset link",
                              expires_at=datetime.fromtimestamp(clock.now + 90, UTC))
    assert (await manager.process_workload()).deferred == 1
    (deferred,) = records(ws, "deferred")
    assert deferred["next_attempt_at"] == clock.now + 90  # clamped from now + 120
    clock.advance(90)
    summary = await manager.process_workload()
    assert (summary.failed, summary.passed) == (1, 0)
    (record,) = records(ws, "failed")
    assert record["result"]["reason"] == "expired"
    assert record["attempts"] == 1
    assert record["result"]["last_error"]["code"] == 451
    assert smtp_server.handler.messages == []


async def test_scheduled_then_expired(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 6: send_at and expires_at together: sent between the two; after
    the expiry it fails without being sent."""
    clock = FakeClock()
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock)
    await manager.create_work(to="a@example.com", subject="window",
                              send_at=clock.now + 10, expires_in=20)
    assert (await manager.process_workload()).total == 0
    clock.advance(25)
    assert (await manager.process_workload()).failed == 1
    assert smtp_server.handler.messages == []


def test_expiry_validation(tmp_path: Path) -> None:
    """Issue 14 part 6: bad expiries are MessageErrors naming the field, and nothing is
    queued."""
    client = Client(tmp_path / "ws", config=make_config(25))
    now = datetime.now(UTC)
    cases = [
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": -5}, "expires_in"),
        ({"expires_in": "soon"}, "expires_in"),
        ({"expires_in": float("inf")}, "expires_in"),
        ({"expires_at": now - timedelta(seconds=1)}, "expires_at"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": now + timedelta(hours=1), "expires_in": 5}, "expires_in"),
        ({"expires_in": 60, "send_at": now + timedelta(hours=1)}, "expires_in"),
    ]
    for kwargs, field in cases:
        with pytest.raises(MessageError) as caught:
            client.create_work(to="a@example.com", subject="x", **kwargs)
        assert caught.value.field == field, kwargs
    assert not list((tmp_path / "ws").rglob("*.json"))
    path = client.create_work(to="a@example.com", subject="x",
                              expires_at=now + timedelta(hours=1))
    assert decode_record(path.read_bytes())["expires_at"] == pytest.approx(
        (now + timedelta(hours=1)).timestamp())
