"""Delivery semantics: per-recipient results, push-back, connection reuse, the delivery log,
and a reply lost after the data was sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ess_async import Manager, SendResult, TemporaryDeliveryError, Transport
from ess_async.spool import decode_record
from ess_async.throttle import Throttle

from .conftest import FakeClock, SMTPServer, make_config


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


async def test_4xx_recipient_is_retried_alone(tmp_path: Path, smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    handler = smtp_server.handler
    handler.rcpt_replies["busy@example.com"] = ["450 4.2.1 mailbox busy"]
    handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock)
    await manager.create_work(to=["ok@example.com", "busy@example.com", "gone@example.com"],
                              subject="partial")
    summary = await manager.process_workload()
    assert summary.deferred == 1
    (record,) = records(tmp_path / "ws", "deferred")
    assert record["recipients"] == ["busy@example.com"]
    assert record["delivered_to"] == ["ok@example.com"]
    assert record["refused"] == {"gone@example.com": [550, "5.1.1 no such user"]}
    assert [m.rcpt_tos for m in handler.messages] == [["ok@example.com"]]

    clock.advance(10)
    assert (await manager.process_workload()).passed == 1
    # The second delivery went to the deferred recipient alone.
    assert [m.rcpt_tos for m in handler.messages] == [["ok@example.com"],
                                                      ["busy@example.com"]]
    (record,) = records(tmp_path / "ws", "passed")
    assert record["delivered_to"] == ["ok@example.com", "busy@example.com"]
    assert record["result"]["refused"] == {"gone@example.com": [550, "5.1.1 no such user"]}
    assert record["attempts"] == 2


async def test_mixed_refusal_of_every_recipient(tmp_path: Path, smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    handler = smtp_server.handler
    handler.rcpt_replies["busy@example.com"] = ["452 4.2.2 over quota"]
    handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock)
    await manager.create_work(to=["busy@example.com", "gone@example.com"], subject="x")
    assert (await manager.process_workload()).deferred == 1
    (record,) = records(tmp_path / "ws", "deferred")
    assert record["recipients"] == ["busy@example.com"]
    assert record["refused"] == {"gone@example.com": [550, "5.1.1 no such user"]}
    clock.advance(10)
    assert (await manager.process_workload()).passed == 1
    assert handler.messages[0].rcpt_tos == ["busy@example.com"]


async def test_reply_lost_after_data_is_outcome_unknown(tmp_path: Path,
                                                        smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    smtp_server.handler.data_replies.append("DROP")
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock)
    await manager.create_work(to="a@example.com", subject="unknown")
    assert (await manager.process_workload()).deferred == 1
    (record,) = records(tmp_path / "ws", "deferred")
    assert record["last_error"]["outcome_unknown"] is True
    assert "during DATA" in record["last_error"]["message"]
    assert record["next_attempt_at"] >= clock.now + 1  # not at once
    assert (await manager.process_workload()).total == 0
    clock.advance(10)
    assert (await manager.process_workload()).passed == 1
    assert len(smtp_server.handler.messages) == 2  # the one duplicate it could not avoid


async def test_push_back_pauses_and_recovers(tmp_path: Path, smtp_server: SMTPServer) -> None:
    smtp_server.handler.data_replies.append("421 4.7.0 too many connections, slow down")
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", spawn=4, config=config) as manager:
        for i in range(30):
            await manager.create_work(to="a@example.com", subject=f"m{i}")
        await asyncio.to_thread(smtp_server.handler.wait_for, 30, 30)
        run = manager._run
        assert run is not None
        throttle = run.dispatcher.throttle
    assert throttle.max_concurrency == 4
    assert throttle.limit >= 2  # halved to 2, then earning slots back on successes
    assert sorted(smtp_server.handler.subjects()) == sorted(f"m{i}" for i in range(30))


async def test_throttle_halves_pauses_and_recovers() -> None:
    clock = FakeClock(0.0)
    throttle = Throttle(8, recover_after=3, min_pause=5, clock=clock)
    throttle.push_back()
    assert (throttle.limit, throttle.paused, throttle.paused_until) == (4, True, 5)
    clock.advance(2)  # past the burst window: a new event
    throttle.push_back()
    assert (throttle.limit, throttle.paused_until) == (2, 12)  # pause doubled
    clock.advance(10)
    assert not throttle.paused
    for _ in range(3):
        throttle.success()
    assert throttle.limit == 3
    for _ in range(30):
        throttle.success()
    assert throttle.limit == 8
    for _ in range(10):
        clock.advance(2)
        throttle.push_back()
    assert throttle.limit == 1


async def test_simultaneous_push_backs_are_one_event() -> None:
    """Issue 9 item 5: six 421s within milliseconds (one burst) halve concurrency once and
    pause once, instead of 8 -> 4 -> 2 -> 1 and an escalated 30 s pause."""
    clock = FakeClock(0.0)
    throttle = Throttle(8, min_pause=1, clock=clock)
    for _ in range(6):
        clock.advance(0.001)
        throttle.push_back()
    assert throttle.limit == 4
    assert throttle.events == 1
    assert throttle.paused_until == 1.001


async def test_a_probe_ends_the_pause_early() -> None:
    """Issue 9 item 5: while paused, one sender at a time probes the relay; a probe that
    succeeds lifts the pause at once instead of sleeping the whole escalated pause."""
    throttle = Throttle(4, min_pause=0.05, max_pause=30, max_probe_interval=0.05)
    for _ in range(6):  # escalate the pause to the 30 s cap, one event at a time
        throttle._last_event = -float("inf")
        throttle.push_back()
    assert throttle.paused_until - throttle.clock() > 1
    entered: list[int] = []

    async def sender(n: int) -> None:
        async with throttle:
            entered.append(n)
            if len(entered) == 1:
                assert throttle.active == 1  # the probe goes alone
                await asyncio.sleep(0.02)
                throttle.success()

    await asyncio.wait_for(asyncio.gather(*[sender(n) for n in range(6)]), 10)
    assert len(entered) == 6
    assert not throttle.paused


async def test_throttle_caps_concurrency() -> None:
    throttle = Throttle(2)
    peak = 0

    async def job() -> None:
        nonlocal peak
        async with throttle:
            peak = max(peak, throttle.active)
            await asyncio.sleep(0.01)

    await asyncio.gather(*[job() for _ in range(10)])
    assert peak == 2
    assert throttle.active == 0


async def test_max_messages_per_connection(tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port,
                         transport={"smtp": {"port": smtp_server.port,
                                             "max_messages_per_connection": 2}})
    manager = Manager(tmp_path / "ws", spawn=1, config=config)
    for i in range(6):
        await manager.create_work(to="a@example.com", subject=f"m{i}")
    assert (await manager.process_workload()).passed == 6
    assert len(set(smtp_server.handler.peers)) == 3


async def test_delivery_log(tmp_path: Path, smtp_server: SMTPServer) -> None:
    smtp_server.handler.data_replies.extend(["250 OK", "550 5.7.1 spam"])
    config = make_config(smtp_server.port, server={"delivery_log": True})
    manager = Manager(tmp_path / "ws", spawn=1, config=config)
    await manager.create_work(to="a@example.com", subject="secret subject", body="SECRET BODY",
                              tags=["t1"])
    await manager.create_work(to="b@example.com", subject="x", body="SECRET BODY")
    await manager.process_workload()
    log = tmp_path / "ws" / "delivery.log"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["state"] for e in events] == ["passed", "failed"]
    assert events[0]["tags"] == ["t1"] and events[0]["recipients"] == 1
    assert events[1]["code"] == 550
    assert "SECRET BODY" not in log.read_text()
    assert log.stat().st_mode & 0o777 == 0o600


async def test_restart_keeps_the_retry_schedule(tmp_path: Path,
                                                smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    config = make_config(smtp_server.port, retry={"min_backoff": 600, "max_backoff": 3600})
    smtp_server.handler.data_replies.extend(["451 later", "451 later again"])
    first = Manager(tmp_path / "ws", config=config, clock=clock)
    await first.create_work(to="a@example.com", subject="patient")
    assert (await first.process_workload()).deferred == 1
    (record,) = records(tmp_path / "ws", "deferred")
    due = record["next_attempt_at"]
    assert clock.now + 600 <= due <= clock.now + 750  # min_backoff plus jitter

    # A new process (a restart) knows the schedule from the file alone.
    clock.advance(599)
    second = Manager(tmp_path / "ws", config=config, clock=clock)
    assert (await second.process_workload()).total == 0
    clock.now = due
    assert (await second.process_workload()).deferred == 1  # the second 451
    (record,) = records(tmp_path / "ws", "deferred")
    assert record["attempts"] == 2
    assert record["next_attempt_at"] >= due + 1200  # doubled: 2 x min_backoff
    clock.now = record["next_attempt_at"]
    assert (await Manager(tmp_path / "ws", config=config, clock=clock)
            .process_workload()).passed == 1


class CountingTransport(Transport):
    """A test transport: answers from a script and counts open connections."""

    def __init__(self, script: list[str], stats: dict[str, int]) -> None:
        self.script = script
        self.stats = stats
        self.connected = False

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        if not self.connected:
            self.connected = True
            self.stats["open"] += 1
            self.stats["peak"] = max(self.stats["peak"], self.stats["open"])
        await asyncio.sleep(0.005)
        if self.script and self.script.pop(0) == "421":
            raise TemporaryDeliveryError("too many connections", code=421, pushback=True)
        return SendResult(250, "OK")

    async def close(self) -> None:
        if self.connected:
            self.connected = False
            self.stats["open"] -= 1
            self.stats["closes"] += 1


async def test_push_back_closes_waiting_connections(tmp_path: Path) -> None:
    stats = {"open": 0, "peak": 0, "closes": 0}
    script = ["250"] * 8 + ["421"] + ["250"] * 100
    config = make_config(25, server={"spawn": 8})
    manager = Manager(tmp_path / "ws", spawn=8, config=config,
                      transport_factory=lambda: CountingTransport(script, stats))
    paths = [await manager.create_work(to="a@example.com", subject=f"m{i}")
             for i in range(60)]  # a backlog: eight connections are busy at once
    async with manager:
        for path in paths:
            await manager.wait(path, timeout=30)
        closed_while_serving = stats["closes"]
        assert manager._run is not None
        open_after = stats["open"]
        limit = manager._run.dispatcher.throttle.limit
    assert stats["peak"] == 8
    # Concurrency was halved to 4: connections over the limit were closed instead of
    # idling in the pool (issue 9 item 4: idle connections hold the relay's slots).
    assert closed_while_serving >= 4
    assert open_after <= limit
    assert stats["open"] == 0
