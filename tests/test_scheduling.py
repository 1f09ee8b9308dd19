"""Priority, scheduled sending and idempotency keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageError

from .conftest import FakeClock, SMTPServer, make_config


async def test_higher_priority_is_claimed_first(tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port)
    client = Client(tmp_path / "ws", config=config)
    for i in range(3):
        client.create_work(to="a@example.com", subject=f"low{i}", priority="low")
        client.create_work(to="a@example.com", subject=f"normal{i}")
        client.create_work(to="a@example.com", subject=f"high{i}", priority="high")
    manager = Manager(tmp_path / "ws", spawn=1, config=config)
    assert (await manager.process_workload()).passed == 9
    assert smtp_server.handler.subjects() == [
        "high0", "high1", "high2", "normal0", "normal1", "normal2", "low0", "low1", "low2"]


async def test_bad_priority_and_send_at(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    with pytest.raises(MessageError) as info:
        await manager.create_work(to="a@example.com", priority="urgent")
    assert info.value.field == "priority"
    with pytest.raises(MessageError) as info:
        await manager.create_work(to="a@example.com", send_at="tomorrow")
    assert info.value.field == "send_at"
    assert not (tmp_path / "ws" / "queued").exists()


async def test_send_at_is_respected(tmp_path: Path, smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock)
    later = datetime.fromtimestamp(clock.now + 3600, UTC)
    path = await manager.create_work(to="a@example.com", subject="later", send_at=later)
    await manager.create_work(to="a@example.com", subject="now")
    assert path.parent.name == "scheduled"
    assert (await manager.process_workload()).passed == 1
    assert smtp_server.handler.subjects() == ["now"]
    clock.advance(3599)
    assert (await manager.process_workload()).total == 0
    clock.advance(1)
    assert (await manager.process_workload()).passed == 1
    assert smtp_server.handler.subjects() == ["now", "later"]


async def test_send_at_in_the_past_is_queued(tmp_path: Path) -> None:
    client = Client(tmp_path / "ws", config=make_config(25))
    path = client.create_work(to="a@example.com", send_at=datetime(2000, 1, 1, tzinfo=UTC))
    assert path.parent.name == "queued"


async def test_scheduled_message_sent_by_timer_while_serving(tmp_path: Path,
                                                             smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", config=config) as manager:
        soon = datetime.now(UTC).timestamp() + 0.5
        await manager.create_work(to="a@example.com", subject="in-process", send_at=soon)
        # And one scheduled by another process, found by the watcher on scheduled/.
        Client(tmp_path / "ws", config=config).create_work(
            to="a@example.com", subject="other-process", send_at=soon)
        await asyncio.to_thread(smtp_server.handler.wait_for, 2)
    assert sorted(smtp_server.handler.subjects()) == ["in-process", "other-process"]


async def test_idempotency_key(tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port)
    manager = Manager(tmp_path / "ws", config=config)
    first = await manager.create_work(to="a@example.com", subject="once",
                                      idempotency_key="order-42")
    again = await manager.create_work(to="a@example.com", subject="twice",
                                      idempotency_key="order-42")
    assert again == first
    # Another process, same key: same message.
    script = (
        "import sys; from ess_async import Client; "
        "print(Client(sys.argv[1]).create_work(to='a@example.com', subject='x', "
        "from_='s@example.com', idempotency_key='order-42'))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ws")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(first)
    other = await manager.create_work(to="a@example.com", subject="other",
                                      idempotency_key="order-43")
    assert other != first
    assert (await manager.process_workload()).passed == 2
    assert sorted(smtp_server.handler.subjects()) == ["once", "other"]
    # After delivery the message is still in the spool (passed/): still the same answer.
    after = await manager.create_work(to="a@example.com", subject="again",
                                      idempotency_key="order-42")
    assert after.stem == first.stem and after.parent.parent.name == "passed"
    assert b"order-42" not in b"".join(p.read_bytes() for p in
                                       (tmp_path / "ws").rglob("*.json"))


async def test_idempotency_under_concurrency(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    paths = await asyncio.gather(*[
        manager.create_work(to="a@example.com", idempotency_key="same") for _ in range(20)])
    assert len(set(paths)) == 1
    assert len(list((tmp_path / "ws" / "queued").iterdir())) == 1
