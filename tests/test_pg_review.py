"""Issue 12 review: defects found in the PostgreSQL store's delivery paths, each shown
against a real PostgreSQL server and a real SMTP sink (no timing assertions: the tests
wait on events and bound each wait)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from ess_async import Manager
from ess_async.errors import StoreUnavailable

from .conftest import SMTPServer, make_config
from .pgserver import PgServer


def _manager(tmp_path: Path, smtp_server: SMTPServer, url: str, **sections: object
             ) -> Manager:
    return Manager(tmp_path / "ws", config=make_config(smtp_server.port, **sections),
                   store=url)


@pytest.fixture
async def manager(tmp_path: Path, smtp_server: SMTPServer, pg_url: str
                  ) -> AsyncIterator[Manager]:
    m = _manager(tmp_path, smtp_server, pg_url)
    await m.pg_store.migrate()
    yield m
    await m.pg_store.close()


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_an_empty_async_with_block_stops(manager: Manager) -> None:
    # The deliverer task has not reached its run when the block ends: stop() must still
    # stop it (it waited forever for a run nobody had told to stop).
    async with asyncio.timeout(15):
        async with manager:
            pass
    assert manager._pg_run is None


async def test_stop_waits_for_a_delegate_workload_in_another_task(
        manager: Manager, smtp_server: SMTPServer) -> None:
    handler = smtp_server.handler
    handler.hold = {"RCPT"}
    msg_id = await manager.create_work(to="a@example.com", subject="held", body="x")
    task = asyncio.create_task(manager.delegate_workload(handle_signals=False))
    await _until(handler.held.is_set)
    handler.release.set()
    await manager.stop()
    assert task.done()  # stop() returned before the run had ended
    await task
    assert (await manager.pg_store.find(msg_id))[0] == "passed"


async def test_a_send_cut_off_at_the_grace_deadline_gives_its_claim_back(
        tmp_path: Path, smtp_server: SMTPServer, pg_url: str) -> None:
    m = _manager(tmp_path, smtp_server, pg_url, server={"grace": 0.2})
    await m.pg_store.migrate()
    handler = smtp_server.handler
    handler.hold = {"RCPT"}  # before the data: nothing was sent
    try:
        msg_id = await m.create_work(to="a@example.com", subject="cut", body="x")
        async with asyncio.timeout(15):
            async with m:
                await _until(handler.held.is_set)
        state, record = await m.pg_store.find(msg_id)
        assert state == "queued"  # given back at once, not left active until its lease ends
        assert record is not None and record.get("attempts", 0) == 0
    finally:
        handler.release.set()
        await m.pg_store.close()


async def test_process_workload_returns_while_the_relay_is_down(
        tmp_path: Path, pg_url: str) -> None:
    down = SMTPServer()  # never started: connections are refused
    m = _manager(tmp_path, down, pg_url)
    await m.pg_store.migrate()
    try:
        ids = [await m.create_work(to="a@example.com", subject=f"m{i}", body="x")
               for i in range(3)]
        async with asyncio.timeout(15):
            summary = await m.process_workload()
        assert summary.total == 0
        counts = await m.counts()
        assert counts["queued"] == 3 and counts["active"] == 0
        for msg_id in ids:
            _, record = await m.pg_store.find(msg_id)
            assert record is not None and record.get("attempts", 0) == 0
    finally:
        await m.pg_store.close()


async def _lease(m: Manager, msg_id: str) -> tuple[object, float]:
    store = m.pg_store
    row = await store.run(lambda c: c.fetchrow(
        f"SELECT lease_token, lease_until FROM {store.quoted_schema}.messages "
        "WHERE id = $1", msg_id))
    return row["lease_token"], float(row["lease_until"] or 0)


async def test_the_heartbeat_survives_a_failed_renewal(
        tmp_path: Path, smtp_server: SMTPServer, pg_url: str) -> None:
    import asyncpg

    m = _manager(tmp_path, smtp_server, pg_url, store={"lease": 3})  # renewed every 1 s
    await m.pg_store.migrate()
    handler = smtp_server.handler
    handler.hold = {"DATA"}  # the data is sent; the reply waits
    schema = m.pg_store.quoted_schema
    locker = await asyncpg.connect(pg_url)
    monitor = await asyncpg.connect(pg_url)
    locker_pid = await locker.fetchval("SELECT pg_backend_pid()")
    try:
        msg_id = await m.create_work(to="a@example.com", subject="renewed", body="x")
        async with asyncio.timeout(20):
            async with m:
                await _until(handler.held.is_set)
                token, _ = await _lease(m, msg_id)
                # The next renewal waits on the row's lock and is cancelled (an operator,
                # a statement timeout; a deadlock ends one the same way): the heartbeat
                # must go on renewing, not die and let the lease run out mid-send.
                tx = locker.transaction()
                await tx.start()
                try:
                    await locker.execute(f"SELECT 1 FROM {schema}.messages WHERE id = $1 "
                                         "FOR UPDATE", msg_id)
                    while not await monitor.fetchval(
                            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                            "WHERE $1 = ANY(pg_blocking_pids(pid)) "
                            "AND query LIKE '%lease_token = ANY%'", locker_pid):
                        await asyncio.sleep(0.05)
                finally:
                    await tx.rollback()
                _, before = await _lease(m, msg_id)
                while True:
                    now_token, until = await _lease(m, msg_id)
                    if now_token != token or until > before:
                        break
                    await asyncio.sleep(0.05)
                assert now_token == token  # renewed, not expired, reaped and claimed again
                handler.release.set()
                assert (await m.wait(msg_id, timeout=10)).passed
        assert len(handler.messages) == 1
    finally:
        handler.release.set()
        await locker.close()
        await monitor.close()
        await m.pg_store.close()


async def test_a_graceful_stop_starts_no_new_send(
        tmp_path: Path, smtp_server: SMTPServer, pg_url: str) -> None:
    m = Manager(tmp_path / "ws", config=make_config(smtp_server.port), store=pg_url, spawn=1)
    await m.pg_store.migrate()
    handler = smtp_server.handler
    handler.hold = {"DATA"}
    try:
        first = await m.create_work(to="a@example.com", subject="first", body="x")
        second = await m.create_work(to="a@example.com", subject="second", body="x")
        async with asyncio.timeout(15):
            async with m:
                await _until(handler.held.is_set)  # first in flight, second claimed too
                run = m._pg_run
                assert run is not None
                stopping = asyncio.create_task(m.stop())
                await _until(run.stop_event.is_set)
                handler.release.set()  # the send in flight finishes...
                await stopping
        assert (await m.pg_store.find(first))[0] == "passed"
        # ...and nothing new starts once the stop began: the second waits, untouched.
        state, record = await m.pg_store.find(second)
        assert state == "queued" and record is not None and record.get("attempts", 0) == 0
        assert handler.subjects() == ["first"]
    finally:
        handler.release.set()
        await m.pg_store.close()


@pytest.fixture
def own_pg(pg_server: object) -> Iterator[PgServer]:
    """A private cluster this test may stop and start again (on the same port)."""
    server = PgServer().start()
    yield server
    server.stop()


def _pg_ctl(server: PgServer, action: str) -> None:
    assert server.dir is not None
    if action == "stop":
        server._run("pg_ctl", "-D", str(server.dir / "data"), "-m", "fast", "-w", "stop")
    else:
        assert server._start_on(server.port)


async def test_an_acceptance_made_while_the_database_is_down_is_recorded_when_it_returns(
        tmp_path: Path, smtp_server: SMTPServer, own_pg: PgServer) -> None:
    url = own_pg.create_database("outage")
    m = _manager(tmp_path, smtp_server, url)
    await m.pg_store.migrate()
    handler = smtp_server.handler
    handler.hold = {"DATA"}
    try:
        msg_id = await m.create_work(to="a@example.com", subject="outage", body="x")
        async with asyncio.timeout(40):
            async with m:
                await _until(handler.held.is_set)
                run = m._pg_run
                assert run is not None
                await asyncio.to_thread(_pg_ctl, own_pg, "stop")
                with pytest.raises(StoreUnavailable):
                    await m.create_work(to="b@example.com", subject="refused", body="x")
                handler.release.set()  # accepted while its record cannot be written
                await _until(lambda: msg_id in run.delivery.unsettled)
                await asyncio.to_thread(_pg_ctl, own_pg, "start")
                assert (await m.wait(msg_id, timeout=20)).passed
        assert handler.subjects() == ["outage"]
        counts = await m.counts()
        assert counts["passed"] == 1 and counts["active"] == 0
    finally:
        handler.release.set()
        await m.pg_store.close()


async def test_a_send_cut_off_after_its_data_is_outcome_unknown_not_requeued(
        tmp_path: Path, smtp_server: SMTPServer, pg_url: str) -> None:
    m = _manager(tmp_path, smtp_server, pg_url, server={"grace": 0.2})
    await m.pg_store.migrate()
    handler = smtp_server.handler
    handler.hold = {"DATA"}  # the data is sent; its reply never comes before the grace
    try:
        msg_id = await m.create_work(to="a@example.com", subject="unknown", body="x")
        async with asyncio.timeout(15):
            async with m:
                await _until(handler.held.is_set)
        state, record = await m.pg_store.find(msg_id)
        assert state == "deferred" and record is not None
        assert record["last_error"]["outcome_unknown"] is True and record["attempts"] == 1
        assert record["next_attempt_at"] > record["last_attempt_at"]  # not at once
    finally:
        handler.release.set()
        await m.pg_store.close()


def test_a_password_in_the_query_string_is_masked_too() -> None:
    from ess_async.store.postgres import PostgresStore, masked_url

    url = "postgresql://ess@db:5432/mail?sslmode=require&password=s3cret"
    assert "s3cret" not in masked_url(url)
    assert "sslmode=require" in masked_url(url)
    assert "s3cret" not in repr(PostgresStore(url))


async def test_process_workload_delivers_a_claim_whose_lease_expired(
        manager: Manager, smtp_server: SMTPServer) -> None:
    # A deliverer claimed it and died before sending (its lease ran out): a process
    # pass recovers it first, as the file store settles active/ before delivering.
    store = manager.pg_store
    msg_id = await manager.create_work(to="a@example.com", subject="orphan", body="x")
    assert len(await store.fetch("claim", store.clock(), 10, 30.0, "crashed")) == 1
    await store.run(lambda c: c.execute(
        f"UPDATE {store.quoted_schema}.messages SET lease_until = 0 WHERE id = $1", msg_id))
    await asyncio.gather(*(store.counts() for _ in range(5)))  # several pooled connections
    summary = await manager.process_workload()
    assert summary.passed == 1
    assert (await store.find(msg_id))[0] == "passed"
    assert smtp_server.handler.subjects() == ["orphan"]
