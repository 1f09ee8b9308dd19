"""Issue 12 part 3: delivering from the PostgreSQL store against a real server and a real
SMTP sink: outcomes, retries, leases fenced by their token, expired leases recovered."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ess_async import Manager
from ess_async.config import RetryConfig
from ess_async.errors import MessageError, StoreError, StoreUnavailable
from ess_async.pool import TransportPool
from ess_async.retry import RetryPolicy
from ess_async.store.pgdeliver import PgDelivery
from ess_async.store.pgrun import PgRun
from ess_async.store.postgres import PostgresStore, masked_url

from .conftest import FakeClock, SMTPServer, make_config


def _manager(tmp_path, smtp_server: SMTPServer, url: str, **kwargs) -> Manager:
    return Manager(tmp_path / "ws", config=make_config(smtp_server.port), store=url, **kwargs)


@pytest.fixture
async def manager(tmp_path, smtp_server, pg_url):
    m = _manager(tmp_path, smtp_server, pg_url)
    await m.pg_store.migrate()
    yield m
    await m.pg_store.close()


async def test_enqueue_returns_an_id_and_delivery_passes_each_once(manager, smtp_server):
    ids = [await manager.create_work(to=f"u{i}@example.com", subject=f"s{i}", body="hi")
           for i in range(30)]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 30
    assert (await manager.counts())["queued"] == 30
    summary = await manager.process_workload()
    assert summary.passed == 30
    assert sorted(smtp_server.handler.subjects()) == sorted(f"s{i}" for i in range(30))
    counts = await manager.counts()
    assert counts["passed"] == 30 and counts["active"] == 0 and counts["queued"] == 0
    outcome = await manager.wait(ids[7], timeout=5)
    assert outcome.passed and outcome.code == 250 and outcome.delivered_to == ["u7@example.com"]


async def test_priority_is_claimed_first(manager, smtp_server):
    for i in range(3):
        await manager.create_work(to="a@example.com", subject=f"low{i}", body="x",
                                  priority="low")
    await manager.create_work(to="a@example.com", subject="high", body="x", priority="high")
    manager.spawn = 1
    await manager.process_workload()
    assert smtp_server.handler.subjects()[0] == "high"


async def test_deferred_then_retried_when_due(tmp_path, smtp_server, pg_url):
    clock = FakeClock()
    m = _manager(tmp_path, smtp_server, pg_url, clock=clock)
    await m.pg_store.migrate()
    try:
        smtp_server.handler.data_replies.append("451 4.3.0 try later")
        msg_id = await m.create_work(to="a@example.com", subject="later", body="x")
        summary = await m.process_workload()
        assert summary.deferred == 1
        state, record = await m.pg_store.find(msg_id)
        assert state == "deferred" and record is not None
        assert record["last_error"]["code"] == 451 and record["attempts"] == 1
        assert (await m.process_workload()).total == 0  # not due yet
        clock.advance(3600)
        assert (await m.process_workload()).passed == 1
        assert (await m.wait(msg_id, timeout=5)).attempts == 2
    finally:
        await m.pg_store.close()


async def test_refused_recipient_is_failed_and_recorded(manager, smtp_server):
    smtp_server.handler.rcpt_replies["bad@example.com"] = "550 5.1.1 no such user"
    msg_id = await manager.create_work(to="bad@example.com", subject="x", body="x")
    await manager.process_workload()
    outcome = await manager.wait(msg_id, timeout=5)
    assert outcome.state == "failed"
    assert outcome.refused["bad@example.com"][0] == 550


async def test_idempotency_key_returns_the_first_id(manager):
    first = await manager.create_work(to="a@example.com", body="x", idempotency_key="k1")
    again = await manager.create_work(to="a@example.com", body="y", idempotency_key="k1")
    both = await asyncio.gather(
        manager.create_work(to="a@example.com", body="z", idempotency_key="k2"),
        manager.create_work(to="a@example.com", body="z", idempotency_key="k2"))
    assert first == again and both[0] == both[1]
    assert (await manager.counts())["queued"] == 2


async def test_bad_input_writes_nothing(manager):
    with pytest.raises(MessageError, match="to"):
        await manager.create_work(to="not an address", body="x")
    assert sum((await manager.counts()).values()) == 0


async def test_a_database_without_the_schema_names_db_migrate(tmp_path, smtp_server, pg_url):
    m = _manager(tmp_path, smtp_server, pg_url)
    with pytest.raises(StoreError, match="db migrate"):
        await m.create_work(to="a@example.com", body="x")
    await m.pg_store.close()


async def test_an_unreachable_database_is_store_unavailable(tmp_path, smtp_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    m = _manager(tmp_path, smtp_server, f"postgresql://ess@127.0.0.1:{port}/mail")
    with pytest.raises(StoreUnavailable) as caught:
        await m.create_work(to="a@example.com", body="x")
    assert isinstance(caught.value, ConnectionError)


def test_the_password_never_shows():
    assert masked_url("postgresql://ess:s3cret@db:5432/mail") == \
        "postgresql://ess:***@db:5432/mail"
    assert "s3cret" not in repr(PostgresStore("postgresql://ess:s3cret@db/mail"))


# -- leases -----------------------------------------------------------------------------


def _run(store: PostgresStore, clock=None, lease: float = 30.0) -> PgRun:
    policy = RetryPolicy.from_config(RetryConfig())
    delivery = PgDelivery(store, policy)
    pool = TransportPool(lambda: None, idle_timeout=1.0)  # type: ignore[arg-type,return-value]
    return PgRun(store, delivery, pool, spawn=1, lease=lease, grace=1.0,
                 clock=clock or store.clock)


async def _expire(store: PostgresStore, msg_id: str) -> None:
    await store.run(lambda c: c.execute(
        f"UPDATE {store.quoted_schema}.messages SET lease_until = 0 WHERE id = $1", msg_id))


async def test_a_lost_lease_never_overwrites_the_newer_attempt(manager, smtp_server):
    store = manager.pg_store
    msg_id = await manager.create_work(to="a@example.com", subject="fenced", body="x")
    stalled = _run(store)
    [row] = await store.fetch("claim", store.clock(), 10, 30.0, "stalled")
    await _expire(store, msg_id)
    # Another deliverer reaps the expired lease (nothing accepted: back to the queue)
    # and delivers the message.
    assert (await _run(store).reap())["requeued"] == 1
    assert (await manager.process_workload()).passed == 1
    # The stalled deliverer wakes: every write of its claim is fenced off.
    stalled.delivery.tokens[msg_id] = row["lease_token"]
    await stalled.delivery._persist_accepted({"id": msg_id, "op": "accepted"})
    _, record = await store.find(msg_id)
    assert record is not None
    await stalled.delivery._settle("failed", {**record, "raw": None, "state": "failed"})
    assert stalled.delivery.lost == 2
    state, after = await store.find(msg_id)
    assert state == "passed" and after["delivered_to"] == ["a@example.com"]
    assert len(smtp_server.handler.messages) == 1


async def test_an_expired_accepted_claim_finishes_as_passed_never_resent(manager,
                                                                         smtp_server):
    store = manager.pg_store
    msg_id = await manager.create_work(to="a@example.com", subject="once", body="x")
    [row] = await store.fetch("claim", store.clock(), 10, 30.0, "crashed")
    # The crashed deliverer had recorded the server's acceptance, then died.
    entry = {"op": "accepted", "id": msg_id, "at": store.clock(), "code": 250,
             "reply": "OK", "refused": {}, "attempt": 1}
    import orjson
    assert await store.fetch("accepted", [msg_id], [row["lease_token"]],
                             [orjson.dumps(entry).decode()])
    await _expire(store, msg_id)
    assert await manager.cleanup() == {"requeued": 0, "passed": 1}
    outcome = await manager.wait(msg_id, timeout=5)
    assert outcome.passed and outcome.attempts == 1
    assert (await manager.process_workload()).total == 0
    assert smtp_server.handler.messages == []  # never sent again


async def test_a_live_lease_is_not_reaped(manager):
    store = manager.pg_store
    await manager.create_work(to="a@example.com", body="x")
    await store.fetch("claim", store.clock(), 10, 30.0, "alive")
    assert await _run(store).reap() == {"requeued": 0, "passed": 0}
    assert (await manager.counts())["active"] == 1


async def test_serve_in_the_app_and_stop_gives_claims_back(manager, smtp_server):
    async with manager:
        msg_id = await manager.create_work(to="a@example.com", subject="served", body="x")
        assert (await manager.wait(msg_id, timeout=10)).passed
    counts = await manager.counts()
    assert counts["active"] == 0 and counts["passed"] == 1


async def test_manager_store_is_either_kind(tmp_path, manager, smtp_server):
    from ess_async import FileStore, PostgresStore

    assert isinstance(manager.store, PostgresStore)
    file_manager = Manager(tmp_path / "files", config=make_config(smtp_server.port))
    assert isinstance(file_manager.store, FileStore)
    for m in (manager, file_manager):
        ref = await m.create_work(to="a@example.com", subject="either", body="x")
        await m.store.hold(ref)
        state, record = await m.store.find(ref)
        assert state == "held" and record is not None and record["subject"] == "either"
        await m.store.release(ref)
        assert (await m.counts())["queued"] == 1


async def test_retention_runs_on_the_postgres_deliverer(tmp_path, smtp_server, pg_url):
    """[server] keep_passed applies to the PostgreSQL store as to the file store."""
    config = make_config(smtp_server.port, server={"keep_passed": 2})
    m = Manager(tmp_path / "ws", config=config, store=pg_url)
    await m.pg_store.migrate()
    try:
        for i in range(4):
            await m.create_work(to="a@example.com", subject=f"k{i}", body="x")
        assert (await m.process_workload()).passed == 4
        await m.process_workload()  # retention runs when a delivery run starts
        assert (await m.counts())["passed"] == 2
    finally:
        await m.pg_store.close()


async def test_an_unknown_database_is_a_configuration_error(tmp_path, smtp_server, pg_url):
    wrong = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    m = _manager(tmp_path, smtp_server, wrong)
    with pytest.raises(StoreError, match="no_such_database") as caught:
        await m.create_work(to="a@example.com", body="x")
    assert not isinstance(caught.value, StoreUnavailable)


def test_the_sync_client_enqueues_and_closes(tmp_path, smtp_server, pg_url):
    import asyncio as aio
    import threading

    from ess_async import Client

    async def migrate() -> None:
        store = PostgresStore(pg_url)
        try:
            await store.migrate()
        finally:
            await store.close()

    aio.run(migrate())
    before = threading.active_count()
    with Client(tmp_path / "ws", config=make_config(smtp_server.port), store=pg_url) as c:
        ids = [c.create_work(to=f"u{i}@example.com", body="x") for i in range(5)]
        again = c.create_work(to="a@example.com", body="x", idempotency_key="k")
        assert c.create_work(to="a@example.com", body="y", idempotency_key="k") == again
    assert all(isinstance(i, str) for i in ids)
    assert threading.active_count() == before  # its thread has ended

    async def counts() -> dict[str, int]:
        store = PostgresStore(pg_url)
        try:
            return await store.counts()
        finally:
            await store.close()

    assert aio.run(counts())["queued"] == 6


async def test_new_work_is_claimed_while_a_slow_send_holds_a_sender(manager, smtp_server):
    """Review: after a claim that found less than it wanted, the claimer waited for a
    free sender only, so a message enqueued meanwhile waited for the slow send to end
    (here: forever) although other senders were idle. NOTIFY now wakes it too."""
    handler = smtp_server.handler
    handler.hold = {"DATA"}
    async with manager:
        slow = await manager.create_work(to="a@example.com", subject="slow", body="x")
        assert await asyncio.to_thread(handler.held.wait, 30)
        quick = await manager.create_work(to="b@example.com", subject="quick", body="x")
        for _ in range(1000):  # up to ~10 s: claimed long before on any machine
            if (await manager.store.find(quick))[0] == "active":
                break
            await asyncio.sleep(0.01)
        state = (await manager.store.find(quick))[0]
        handler.release.set()
        assert state == "active"  # claimed (and in its DATA) while "slow" still waits
        assert (await manager.wait(slow, timeout=10)).passed
        assert (await manager.wait(quick, timeout=10)).passed


async def test_max_connections_per_domain_on_the_postgres_deliverer(tmp_path, smtp_server,
                                                                     pg_url):
    """[limits."one.example"] max_connections = 2 holds for a PostgreSQL deliverer too:
    a message over the budget is given back until the domain is ready, while another
    domain uses every sender."""
    from .test_domain_limits import track_peak_in_flight

    handler = smtp_server.handler
    handler.delays["DATA"] = 0.05
    peak = track_peak_in_flight(handler)
    config = make_config(smtp_server.port, server={"spawn": 6},
                         limits={"one.example": {"max_connections": 2}})
    m = Manager(tmp_path / "ws", config=config, store=pg_url)
    await m.pg_store.migrate()
    try:
        async with m:
            ids = []
            for i in range(12):
                ids.append(await m.create_work(to=f"o{i}@one.example", subject=f"o{i}"))
                ids.append(await m.create_work(to=f"t{i}@two.example", subject=f"t{i}"))
            outcomes = [await m.wait(i, timeout=30) for i in ids]
        assert all(o.passed and o.attempts == 1 for o in outcomes)
        assert peak["one.example"] == 2
        assert peak["two.example"] >= 3
        assert len(handler.messages) == 24
    finally:
        await m.pg_store.close()


async def test_delivery_log_on_the_postgres_deliverer(tmp_path, smtp_server, pg_url):
    import json

    config = make_config(smtp_server.port, server={"delivery_log": True})
    m = Manager(tmp_path / "ws", config=config, store=pg_url)
    await m.pg_store.migrate()
    try:
        msg_id = await m.create_work(to="a@example.com", subject="logged", body="secret")
        assert (await m.process_workload()).passed == 1
    finally:
        await m.pg_store.close()
    log = (tmp_path / "ws" / "delivery.log").read_text()
    [event] = [json.loads(line) for line in log.splitlines()]
    assert event["id"] == msg_id and event["state"] == "passed" and event["code"] == 250
    assert "secret" not in log  # never the body
    assert (tmp_path / "ws" / "delivery.log").stat().st_mode & 0o777 == 0o600
