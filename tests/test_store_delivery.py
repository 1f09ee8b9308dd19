"""Issue 12 part 1: one delivery behaviour suite, run through ``Manager`` against both
stores (the spool folders and PostgreSQL) and a real SMTP server: outcomes, per-recipient
results, retries on an injected clock, priority, ``send_at``, idempotency, ``wait()``,
and recovery of a claim left behind by a crash."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from ess_async import Manager

from .conftest import FakeClock, SMTPServer, make_config


@pytest.fixture(params=["file", "postgres"])
async def make(request: pytest.FixtureRequest, tmp_path: Path, smtp_server: SMTPServer
               ) -> AsyncIterator[object]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    made: list[Manager] = []

    async def factory(**kwargs: object) -> Manager:
        manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), store=url,
                          **kwargs)  # type: ignore[arg-type]
        if url:
            await manager.pg_store.migrate()
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        if manager.store_url:
            await manager.pg_store.close()


async def test_outcomes_and_per_recipient_results(make, smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    manager = await make(clock=clock)
    handler = smtp_server.handler
    handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    handler.rcpt_replies["busy@example.com"] = ["452 4.2.2 mailbox full"]
    mixed = await manager.create_work(to=["ok@example.com", "gone@example.com",
                                          "busy@example.com"], subject="mixed", body="x")
    refused = await manager.create_work(to="gone@example.com", subject="refused", body="x")
    summary = await manager.process_workload()
    assert (summary.deferred, summary.failed) == (1, 1)
    state, record = await manager.store.find(mixed)
    assert state == "deferred" and record is not None
    assert record["recipients"] == ["busy@example.com"]  # only the one to retry
    assert record["delivered_to"] == ["ok@example.com"]
    assert record["refused"]["gone@example.com"][0] == 550
    assert (await manager.wait(refused, timeout=5)).state == "failed"
    clock.advance(3600)
    assert (await manager.process_workload()).passed == 1
    outcome = await manager.wait(mixed, timeout=5)
    assert outcome.passed and outcome.attempts == 2
    assert sorted(outcome.delivered_to) == ["busy@example.com", "ok@example.com"]
    sent = [sorted(m.rcpt_tos) for m in handler.messages]
    assert sent == [["ok@example.com"], ["busy@example.com"]]  # nobody got it twice


async def test_priority_send_at_and_idempotency(make, smtp_server: SMTPServer) -> None:
    clock = FakeClock()
    manager = await make(clock=clock, spawn=1)
    later = await manager.create_work(to="a@example.com", subject="later", body="x",
                                      send_at=datetime.fromtimestamp(clock.now + 600))
    await manager.create_work(to="a@example.com", subject="low", body="x", priority="low")
    await manager.create_work(to="a@example.com", subject="high", body="x", priority="high")
    first = await manager.create_work(to="a@example.com", subject="key", body="x",
                                      idempotency_key="order-1")
    assert await manager.create_work(to="a@example.com", subject="key", body="x",
                                     idempotency_key="order-1") == first
    counts = await manager.counts()
    assert (counts["queued"], counts["scheduled"]) == (3, 1)
    assert (await manager.process_workload()).passed == 3
    assert smtp_server.handler.subjects() == ["high", "key", "low"]
    assert (await manager.store.find(later))[0] == "scheduled"
    clock.advance(601)
    assert (await manager.process_workload()).passed == 1
    assert (await manager.wait(later, timeout=5)).passed


async def _leave_accepted_claim(manager: Manager) -> str:
    """What a deliverer killed right after recording the server's 250 leaves behind."""
    ref = await manager.create_work(to="a@example.com", subject="crashed", body="x")
    entry = {"op": "accepted", "at": manager.clock(), "code": 250, "reply": "OK",
             "refused": {}, "attempt": 1}
    if manager.store_url:
        store = manager.pg_store
        [row] = await store.fetch("claim", manager.clock(), 1, 30.0, "killed")
        await store.fetch("accepted", [row["id"]], [row["lease_token"]],
                          [orjson.dumps({**entry, "id": row["id"]}).decode()])
        await store.run(lambda c: c.execute(
            f"UPDATE {store.quoted_schema}.messages SET lease_until = 0 WHERE id = $1",
            row["id"]))
        return str(row["id"])
    path = Path(ref)
    (path.parent.parent / "active").mkdir(exist_ok=True)
    path.rename(path.parent.parent / "active" / path.name)
    with open(manager.workspace / "journal.log", "ab") as journal:
        journal.write(orjson.dumps({**entry, "id": path.stem}) + b"\n")
    return path.stem


async def test_a_crashed_claim_is_recovered_never_resent(make, smtp_server: SMTPServer
                                                         ) -> None:
    manager = await make()
    accepted = await _leave_accepted_claim(manager)
    other = await manager.create_work(to="b@example.com", subject="other", body="x")
    summary = await manager.process_workload()
    await manager.cleanup()  # the PostgreSQL store's leases are reaped continuously too
    assert (await manager.wait(accepted, timeout=5)).passed
    assert (await manager.wait(other, timeout=5)).passed
    assert smtp_server.handler.subjects() == ["other"]  # the accepted one is not resent
    assert summary.passed >= 1
    counts = await manager.counts()
    assert counts["active"] == 0 and counts["passed"] == 2


async def test_retention_is_purge_in_both_stores(make, smtp_server: SMTPServer) -> None:
    """``[server] keep_*`` and ``purge`` are one mechanism: keep the newest N, or what
    finished within the age, whatever the store."""
    clock = FakeClock()
    manager = await make(clock=clock)
    for i in range(5):
        await manager.create_work(to="a@example.com", subject=f"m{i}", body="x")
    assert (await manager.process_workload()).passed == 5
    assert await manager.store.purge("passed", keep=3) == 2
    assert await manager.store.purge("passed", 3600, keep=3) == 0
    kept = {m.subject for m in await manager.store.list("passed")}
    assert len(kept) == 3
    clock.advance(7200)  # all finished over an hour ago: age wins, keep is only a cap
    assert await manager.store.purge("passed", 3600, keep=1) == 3
    with pytest.raises(ValueError, match="older_than, keep"):
        await manager.store.purge("passed")
    with pytest.raises(ValueError, match="keep"):
        await manager.store.purge("corrupt", keep=2)
    assert (await manager.counts())["passed"] == 0
