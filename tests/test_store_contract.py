"""Issue 12: the Store contract, one behaviour suite run against both stores (the file
spool of one workspace and PostgreSQL): enqueueing, idempotency, reading, listing, the
queue operations and their errors, purge and retry_all, waiting. Then what only the
PostgreSQL store has: its schema check, migrate, an unreachable database."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ess_async.enqueue import Prepared, prepare
from ess_async.errors import MessageNotFound, StoreError, StoreUnavailable
from ess_async.ops import MessageBusy, MessageStateError
from ess_async.outcome import message_id
from ess_async.spool import FINAL_STATES, STATES
from ess_async.store.base import MessageRef, Store
from ess_async.store.file import FileStore
from ess_async.store.postgres import PostgresStore

from .conftest import FakeClock

DAY = 86400.0
DEFAULTS = {"from_": "sender@example.com"}


# -- the two stores --------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["file", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path,
                clock: FakeClock) -> AsyncIterator[Store]:
    if request.param == "file":
        file_store = FileStore(tmp_path / "ws", clock=clock)
        await file_store.open()
        yield file_store
        await file_store.close()
        return
    url: str = request.getfixturevalue("pg_url")
    pg_store = PostgresStore(url, clock=clock)
    try:
        await pg_store.migrate()
        await pg_store.open()
        yield pg_store
    finally:
        await pg_store.close()


def again(store: Store) -> Store:
    """A second store object on the same messages (another process would see these)."""
    if isinstance(store, FileStore):
        return FileStore(store.workspace, clock=store.clock)
    assert isinstance(store, PostgresStore)
    return PostgresStore(store.url, clock=store.clock)


# -- helpers ---------------------------------------------------------------------------


def prepared(clock: FakeClock, n: int = 0, **options: Any) -> Prepared:
    attrs = {"to": [f"u{n}@example.com", f"v{n}@example.com"], "subject": f"s{n}",
             "body": f"hello {n}\n"}
    return prepare(attrs, DEFAULTS, now=clock(), **options)


async def enqueue(store: Store, clock: FakeClock, n: int = 0, **options: Any) -> MessageRef:
    return await store.enqueue(prepared(clock, n, **options))


async def state_of(store: Store, ref: MessageRef) -> str:
    state, _ = await store.find(ref)
    return state


async def record_of(store: Store, ref: MessageRef) -> dict[str, Any]:
    _, record = await store.find(ref)
    assert record is not None
    return record


async def put(store: Store, ref: MessageRef, state: str, **changes: Any) -> None:
    """Put a message in ``state`` as delivery would (``changes`` to its record). Final
    states get a ``finished_at`` (now) unless given; ``corrupt`` takes ``reason``."""
    msg_id = message_id(ref)
    if state in FINAL_STATES:
        changes.setdefault("finished_at", store.clock())
    if isinstance(store, FileStore):
        _put_file(store, msg_id, state, changes)
    else:
        assert isinstance(store, PostgresStore)
        await _put_pg(store, msg_id, state, changes)


def _put_file(store: FileStore, msg_id: str, state: str, changes: dict[str, Any]) -> None:
    spool = store.spool
    found = spool.find(msg_id)
    assert found is not None
    _, path = found
    if state == "corrupt":
        target = spool.dir("corrupt") / f"{msg_id}.json"
        os.rename(path, target)
        note = {"file": target.name, "reason": changes.get("reason", "test"),
                "at": changes["finished_at"]}
        target.with_name(f"{target.name}.reason").write_text(json.dumps(note))
        return
    record = spool.read(path)
    record.update(changes, state=state)
    written = spool.write(state, record)
    if written != path:
        path.unlink()


async def _put_pg(store: PostgresStore, msg_id: str, state: str,
                  changes: dict[str, Any]) -> None:
    _, record = await store.find(msg_id)
    assert record is not None
    if state == "corrupt":  # as store.pgdeliver settles an unreadable record
        record = {"id": msg_id, "state": state, "finished_at": changes["finished_at"],
                  "last_error": {"message": changes.get("reason", "test")}}
    else:
        record.update(changes, state=state)
    q = store.quoted_schema
    due = record.get("next_attempt_at") or store.clock()
    finished = record.get("finished_at") if state in FINAL_STATES else None
    async with store.transaction() as conn:
        await conn.execute(
            f"UPDATE {q}.messages SET state = $2, due = $3::float8, attempts = $4,"
            " finished_at = $5::float8,"
            " lease_token = CASE WHEN $2 = 'active' THEN gen_random_uuid() END,"
            " lease_until = CASE WHEN $2 = 'active' THEN $3::float8 + 3600 END"
            " WHERE id = $1", msg_id, state, due, int(record.get("attempts", 0)), finished)
        await conn.execute(f"UPDATE {q}.bodies SET record = $2::jsonb WHERE id = $1",
                           msg_id, orjson.dumps(record).decode())


async def check_in_step(store: Store) -> None:
    """Every message's record agrees with where it is: its ``state`` key (and, in
    PostgreSQL, the hot columns: when it is due, when it finished). A claim does not
    touch the record (an active message's still says where it was claimed from)."""
    now = store.clock()
    if isinstance(store, FileStore):
        for state in STATES:
            if state in ("corrupt", "active"):
                continue
            for info in store.ops.list(state):
                found = store.spool.find(info.id)
                assert found is not None and found[0] == state
                assert store.spool.read(found[1])["state"] == state, info.id
        return
    assert isinstance(store, PostgresStore)
    q = store.quoted_schema
    rows = await store.run(lambda conn: conn.fetch(
        f"SELECT m.id, m.state, m.due, m.finished_at, b.record::text AS record"
        f" FROM {q}.messages m JOIN {q}.bodies b USING (id)"))
    for row in rows:
        record = orjson.loads(row["record"])
        if row["state"] == "active":
            continue
        assert record["state"] == row["state"], row["id"]
        if row["state"] == "queued":
            assert row["due"] <= now, row["id"]
        elif row["state"] in ("scheduled", "deferred"):
            assert row["due"] == record["next_attempt_at"], row["id"]
        if row["state"] in FINAL_STATES:
            assert row["finished_at"] == record["finished_at"], row["id"]
        else:
            assert row["finished_at"] is None and "finished_at" not in record, row["id"]


async def claimable(store: Store) -> list[str]:
    """The ids a deliverer could claim now (the file store: what is in queued/)."""
    if isinstance(store, FileStore):
        return store.spool.ids("queued")
    assert isinstance(store, PostgresStore)
    q = store.quoted_schema
    rows = await store.run(lambda conn: conn.fetch(
        f"SELECT id FROM {q}.messages WHERE state IN ('queued', 'scheduled', 'deferred')"
        f" AND due <= $1 ORDER BY id", store.clock()))
    return [r["id"] for r in rows]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- enqueueing --------------------------------------------------------------------------


async def test_enqueue_returns_a_reference_every_api_takes(store: Store,
                                                           clock: FakeClock) -> None:
    one = prepared(clock, 1)
    ref = await store.enqueue(one)
    msg_id = one.record["id"]
    if store.kind == "file":
        assert isinstance(ref, Path) and ref.stem == msg_id and ref.parent.name == "queued"
    else:
        assert store.kind == "postgres" and ref == msg_id
    for given in (ref, msg_id, str(ref)):
        state, record = await store.find(given)
        assert state == "queued" and record is not None
        assert record["id"] == msg_id and record["state"] == "queued"
        assert record["recipients"] == ["u1@example.com", "v1@example.com"]
        assert (await store.show(given))["id"] == msg_id
    held = await store.hold(ref)
    assert message_id(held) == msg_id and await state_of(store, held) == "held"
    released = await store.release(held)
    assert message_id(released) == msg_id and await state_of(store, released) == "queued"
    assert await store.delete(released) == "queued"
    with pytest.raises(MessageNotFound):
        await store.find(ref)


async def test_enqueue_is_durable_and_counted(store: Store, clock: FakeClock) -> None:
    counts = await store.counts()
    assert set(counts) == set(STATES) and not any(counts.values())
    refs = await asyncio.gather(*(enqueue(store, clock, n) for n in range(20)))
    assert len({message_id(r) for r in refs}) == 20
    other = again(store)
    try:
        counts = await other.counts()  # committed: another store object sees them all
        assert set(counts) == set(STATES)
        assert counts["queued"] == 20 and sum(counts.values()) == 20
        assert (await other.find(refs[3]))[0] == "queued"
    finally:
        await other.close()


async def test_idempotency_key(store: Store, clock: FakeClock) -> None:
    first = await enqueue(store, clock, 1, idempotency_key="order-1")
    second = await enqueue(store, clock, 2, idempotency_key="order-1")
    assert message_id(second) == message_id(first)
    together = await asyncio.gather(
        *(enqueue(store, clock, n, idempotency_key="order-2") for n in range(5)))
    assert len({message_id(r) for r in together}) == 1
    assert (await store.counts())["queued"] == 2
    assert (await record_of(store, first))["subject"] == "s1"  # the first one's
    other = again(store)  # another process enqueueing with the same key
    try:
        both = await asyncio.gather(
            *(s.enqueue(prepared(clock, n, idempotency_key="order-3"))
              for n, s in enumerate([store, other] * 3)))
    finally:
        await other.close()
    assert len({message_id(r) for r in both}) == 1
    assert (await store.counts())["queued"] == 3
    assert await store.delete(both[0]) == "queued"
    # Deleting the message frees its key.
    assert await store.delete(first) == "queued"
    third = await enqueue(store, clock, 3, idempotency_key="order-1")
    assert message_id(third) != message_id(first)
    assert (await record_of(store, third))["subject"] == "s3"
    assert (await store.counts())["queued"] == 2


async def test_priority_and_send_at(store: Store, clock: FakeClock) -> None:
    later = await enqueue(store, clock, 1, send_at=clock() + 3600)
    past = await enqueue(store, clock, 2, send_at=clock() - 60)
    high = await enqueue(store, clock, 3, priority="high")
    assert await state_of(store, later) == "scheduled"
    assert (await record_of(store, later))["next_attempt_at"] == clock() + 3600
    assert await state_of(store, past) == "queued"
    assert (await record_of(store, high))["priority"] == "high"
    counts = await store.counts()
    assert counts["scheduled"] == 1 and counts["queued"] == 2
    infos = {i.id: i for i in await store.list()}
    assert infos[message_id(high)].priority == "high"
    assert infos[message_id(later)].next_attempt_at == clock() + 3600
    assert sorted(await claimable(store)) == sorted([message_id(past), message_id(high)])
    await check_in_step(store)


# -- reading -----------------------------------------------------------------------------


async def test_find_and_show(store: Store, clock: FakeClock) -> None:
    one = prepared(clock, 1)
    ref = await store.enqueue(one)
    shown = await store.show(ref)
    assert shown["state"] == "queued" and shown["id"] == one.record["id"]
    assert "raw" not in shown
    assert shown["raw_size"] == len(one.record["raw"].encode("utf-8"))
    assert shown["subject"] == "s1" and shown["mail_from"] == "sender@example.com"
    full = await store.show(ref, raw=True)
    assert full["raw"] == one.record["raw"] and "raw_size" not in full
    state, record = await store.find(ref)
    assert state == "queued" and record is not None and record["attempts"] == 0
    utf8 = prepare({"to": "jörg@exämple.com", "subject": "grüße", "body": "schön\n"},
                   DEFAULTS, now=clock())
    assert utf8.record["smtputf8"]
    shown = await store.show(await store.enqueue(utf8))
    assert shown["raw_size"] == len(utf8.record["raw"].encode("utf-8"))  # bytes
    assert shown["recipients"] == utf8.record["recipients"] and shown["subject"] == "grüße"
    unknown = "00000000000000000001-n00000000"
    with pytest.raises(MessageNotFound):
        await store.find(unknown)
    with pytest.raises(MessageNotFound):
        await store.show(unknown)
    with pytest.raises(ValueError, match="not a message id"):
        await store.find("../../etc/passwd")
    # A quarantined message: no record, its reason.
    await put(store, ref, "corrupt", reason="unreadable record: test")
    assert await store.find(ref) == ("corrupt", None)
    shown = await store.show(ref)
    assert shown["state"] == "corrupt" and shown["id"] == one.record["id"]
    assert shown["reason"] == "unreadable record: test"
    assert shown["quarantined_at"] == clock()


async def test_list(store: Store, clock: FakeClock) -> None:
    refs = [await enqueue(store, clock, n, priority=("low", "normal", "high")[n % 3])
            for n in range(6)]
    ids = [message_id(r) for r in refs]
    clock.advance(10)
    infos = await store.list()
    assert [i.id for i in infos] == ids  # oldest first, whatever the priority
    first = infos[0]
    assert first.state == "queued" and first.age == 10 and first.attempts == 0
    assert first.recipients == ["u0@example.com", "v0@example.com"]
    assert first.subject == "s0" and first.priority == "low" and first.last_error is None
    assert [i.id for i in await store.list(limit=2)] == ids[:2]
    assert await store.list(limit=0) == []
    await store.hold(refs[4])
    await put(store, refs[1], "deferred", attempts=1, next_attempt_at=clock() + 60,
              last_error={"code": 451, "message": "4.3.0 try later"})
    assert [i.id for i in await store.list("held")] == [ids[4]]
    assert [i.id for i in await store.list(["deferred", "held"])] == [ids[1], ids[4]]
    assert [i.id for i in await store.list(("queued",), limit=2)] == [ids[0], ids[2]]
    deferred = (await store.list("deferred"))[0]
    assert deferred.attempts == 1 and deferred.next_attempt_at == clock() + 60
    assert deferred.last_error == "451 4.3.0 try later"
    await put(store, refs[5], "corrupt", reason="not a record")
    corrupt = (await store.list("corrupt"))[0]
    assert corrupt.id == ids[5] and corrupt.state == "corrupt"
    assert corrupt.last_error == "not a record" and corrupt.priority == "high"
    assert await store.list("passed") == []
    with pytest.raises(ValueError, match="unknown state"):
        await store.list("sent")
    with pytest.raises(ValueError, match="limit"):
        await store.list(limit=-1)


# -- the queue operations ----------------------------------------------------------------


async def test_hold_and_release(store: Store, clock: FakeClock) -> None:
    queued = await enqueue(store, clock, 1)
    scheduled = await enqueue(store, clock, 2, send_at=clock() + 3600)
    deferred = await enqueue(store, clock, 3)
    await put(store, deferred, "deferred", attempts=1, next_attempt_at=clock() + 600)
    clock.advance(5)
    for ref, src in ((queued, "queued"), (scheduled, "scheduled"), (deferred, "deferred")):
        held = await store.hold(ref)
        record = await record_of(store, held)
        assert record["state"] == "held"
        assert record["held_from"] == src and record["held_at"] == clock()
    assert (await store.counts())["held"] == 3
    assert await claimable(store) == []
    await check_in_step(store)
    # Released: scheduled while its send_at is ahead, else queued (sent now).
    assert await state_of(store, await store.release(scheduled)) == "scheduled"
    record = await record_of(store, scheduled)
    assert record["next_attempt_at"] == record["send_at"]
    assert "held_from" not in record and "held_at" not in record
    for ref in (queued, deferred):  # a deferred one is sent now, too
        assert await state_of(store, await store.release(ref)) == "queued"
        record = await record_of(store, ref)
        assert record["next_attempt_at"] is None
        assert "held_from" not in record and "held_at" not in record
        assert record["attempts"] == (1 if ref == deferred else 0)
    assert sorted(await claimable(store)) == sorted([message_id(queued), message_id(deferred)])
    # Its send_at passed while it was held: queued.
    await store.hold(scheduled)
    clock.advance(3600)
    assert await state_of(store, await store.release(scheduled)) == "queued"
    assert message_id(scheduled) in await claimable(store)
    await check_in_step(store)


async def test_retry(store: Store, clock: FakeClock) -> None:
    deferred = await enqueue(store, clock, 1)
    failed = await enqueue(store, clock, 2)
    error = {"code": 451, "message": "4.3.0 try later"}
    await put(store, deferred, "deferred", attempts=2, next_attempt_at=clock() + 600,
              last_error=error)
    await put(store, failed, "failed", attempts=1, last_error=error,
              result={"code": 550, "message": "5.1.1 no such user", "refused": {}},
              refused={"u2@example.com": [550, "5.1.1 no such user"],
                       "gone@example.com": [550, "5.1.1 gone"]})
    assert await claimable(store) == []
    clock.advance(1)
    assert message_id(await store.retry(deferred)) == message_id(deferred)
    record = await record_of(store, deferred)
    assert record["state"] == "queued" and record["next_attempt_at"] is None
    assert record["attempts"] == 2 and record["last_error"] == error
    assert message_id(await store.retry(failed)) == message_id(failed)
    record = await record_of(store, failed)
    assert record["state"] == "queued" and record["attempts"] == 1
    assert "result" not in record and "finished_at" not in record
    # The recipients it is sent to again are no longer refused.
    assert record["refused"] == {"gone@example.com": [550, "5.1.1 gone"]}
    assert sorted(await claimable(store)) == sorted([message_id(deferred), message_id(failed)])
    assert (await store.counts())["queued"] == 2
    await check_in_step(store)


async def test_retry_all(store: Store, clock: FakeClock) -> None:
    refs = [await enqueue(store, clock, n) for n in range(5)]
    await put(store, refs[0], "deferred", attempts=1, next_attempt_at=clock() + 60)
    await put(store, refs[1], "deferred", attempts=1, next_attempt_at=clock() + 60)
    await put(store, refs[2], "failed", attempts=1)
    await put(store, refs[3], "passed", attempts=1)
    assert await store.retry_all("failed") == 1
    assert await state_of(store, refs[2]) == "queued"
    assert await store.retry_all() == 2
    counts = await store.counts()
    assert counts["queued"] == 4 and counts["passed"] == 1 and counts["deferred"] == 0
    assert await store.retry_all(["deferred", "failed"]) == 0
    with pytest.raises(ValueError, match="unknown state"):
        await store.retry_all("queued")
    await check_in_step(store)


async def test_delete(store: Store, clock: FakeClock) -> None:
    states = ("queued", "scheduled", "deferred", "held", "passed", "failed", "corrupt")
    refs = {}
    for n, state in enumerate(states):
        ref = await enqueue(store, clock, n)
        if state == "scheduled":
            await put(store, ref, state, next_attempt_at=clock() + 60)
        elif state == "held":
            await store.hold(ref)
        elif state != "queued":
            await put(store, ref, state)
        refs[state] = ref
    assert sum((await store.counts()).values()) == len(states)
    for state, ref in refs.items():
        assert await store.delete(ref) == state
        with pytest.raises(MessageNotFound):
            await store.find(ref)
        with pytest.raises(MessageNotFound):
            await store.delete(ref)
    assert not any((await store.counts()).values())
    with pytest.raises(MessageNotFound):
        await store.delete("00000000000000000001-n00000000")


async def test_operation_errors(store: Store, clock: FakeClock) -> None:
    queued = await enqueue(store, clock, 1)
    active = await enqueue(store, clock, 2)
    passed = await enqueue(store, clock, 3)
    corrupt = await enqueue(store, clock, 4)
    held = await enqueue(store, clock, 5)
    await put(store, active, "active", attempts=0)
    await put(store, passed, "passed", attempts=1)
    await put(store, corrupt, "corrupt")
    await store.hold(held)
    # Being sent: busy, whatever the operation.
    for op in ("hold", "release", "retry", "delete"):
        with pytest.raises(MessageBusy) as busy:
            await getattr(store, op)(active)
        assert busy.value.state == "active" and busy.value.op == op
    # Not in a state the operation applies to.
    cases = [("hold", passed, "passed"), ("hold", held, "held"), ("hold", corrupt, "corrupt"),
             ("release", queued, "queued"), ("release", passed, "passed"),
             ("retry", queued, "queued"), ("retry", held, "held"),
             ("retry", passed, "passed"), ("retry", corrupt, "corrupt")]
    for op, ref, state in cases:
        with pytest.raises(MessageStateError) as wrong:
            await getattr(store, op)(ref)
        assert wrong.value.state == state and wrong.value.op == op
        assert wrong.value.id == message_id(ref)
    unknown = "00000000000000000001-n00000000"
    for op in ("hold", "release", "retry", "delete", "show", "find"):
        with pytest.raises(MessageNotFound):
            await getattr(store, op)(unknown)
    # Nothing moved.
    assert [await state_of(store, r) for r in (queued, active, passed, corrupt, held)] == [
        "queued", "active", "passed", "corrupt", "held"]
    await check_in_step(store)


async def test_purge(store: Store, clock: FakeClock) -> None:
    now = clock()
    ages = {"passed": (3 * DAY, 2 * DAY, 3600.0, 0.0), "failed": (2 * DAY, 60.0),
            "corrupt": (2 * DAY, 60.0)}
    refs: dict[str, list[MessageRef]] = {}
    n = 0
    for state, finished in ages.items():
        for age in finished:
            n += 1
            ref = await enqueue(store, clock, n, idempotency_key=f"key-{n}")
            await put(store, ref, state, attempts=1, finished_at=now - age)
            refs.setdefault(state, []).append(ref)
    kept = await enqueue(store, clock, 99)
    await put(store, kept, "deferred", attempts=1, next_attempt_at=now + 60)
    assert await store.purge("passed", DAY) == 2
    assert await store.purge("passed", DAY) == 0
    assert [await state_of(store, r) for r in refs["passed"][2:]] == ["passed", "passed"]
    for ref in refs["passed"][:2]:
        with pytest.raises(MessageNotFound):
            await store.find(ref)
    assert await store.purge("failed", 3600) == 1
    assert await store.purge("corrupt", 3600) == 1
    clock.advance(120)
    assert await store.purge("failed", 0) == 1
    assert await store.purge("corrupt", 100) == 1
    counts = await store.counts()
    assert counts["passed"] == 2 and counts["failed"] == 0 and counts["corrupt"] == 0
    assert counts["deferred"] == 1
    # A purged message's idempotency key is free again.
    again_ref = await enqueue(store, clock, 100, idempotency_key="key-1")
    assert message_id(again_ref) != message_id(refs["passed"][0])
    same = await enqueue(store, clock, 101, idempotency_key="key-3")  # still passed
    assert message_id(same) == message_id(refs["passed"][2])
    for state, older_than in (("queued", 1.0), ("deferred", 1.0), ("passed", -1.0),
                              ("passed", "1d")):
        with pytest.raises(ValueError):
            await store.purge(state, older_than)  # type: ignore[arg-type]


# -- waiting -----------------------------------------------------------------------------


async def test_wait(store: Store, clock: FakeClock) -> None:
    ref = await enqueue(store, clock, 1)
    with pytest.raises(TimeoutError):
        await store.wait(ref, timeout=0.05)

    async def finish() -> None:
        await asyncio.sleep(0.1)
        await put(store, ref, "passed", attempts=1, delivered_to=["u1@example.com"],
                  result={"code": 250, "message": "2.0.0 OK", "refused": {}})

    task = asyncio.create_task(finish())
    outcome = await store.wait(ref, timeout=10)
    await task
    assert outcome.passed and outcome.id == message_id(ref) and outcome.code == 250
    assert outcome.attempts == 1 and outcome.delivered_to == ["u1@example.com"]
    assert outcome.finished_at == clock()
    bad = await enqueue(store, clock, 2)
    await put(store, bad, "corrupt")
    outcome = await store.wait(bad, timeout=5)
    assert outcome.state == "corrupt" and outcome.id == message_id(bad)
    with pytest.raises(MessageNotFound):
        await store.wait("00000000000000000001-n00000000", timeout=5)


# -- the PostgreSQL store alone ----------------------------------------------------------


async def test_postgres_without_the_schema_says_migrate(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        with pytest.raises(StoreError, match="db migrate") as error:
            await store.open()
        assert not isinstance(error.value, StoreUnavailable)
        with pytest.raises(StoreError, match="db migrate"):
            await store.counts()
        assert await store.migrate() == (0, 1)
        assert await store.migrate() == (1, 1)  # a no-op
        await store.open()
        assert (await store.counts())["queued"] == 0
    finally:
        await store.close()


async def test_postgres_migrate_is_safe_from_two_hosts_at_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(results) == [(0, 1), (1, 1)]
    finally:
        for s in stores:
            await s.close()


async def test_postgres_unreachable(clock: FakeClock) -> None:
    url = f"postgresql://ess@127.0.0.1:{closed_port()}/ess"
    store = PostgresStore(url, password="secret", clock=clock)
    try:
        with pytest.raises(StoreUnavailable, match="cannot connect") as error:
            await store.open()
        assert "secret" not in str(error.value)
        with pytest.raises(StoreUnavailable):
            await store.enqueue(prepared(clock))
        with pytest.raises(StoreUnavailable):
            await store.hold("00000000000000000001-n00000000")
    finally:
        await store.close()


async def test_postgres_retried_message_is_claimed_now(pg_url: str, clock: FakeClock) -> None:
    store = PostgresStore(pg_url, clock=clock)
    try:
        await store.migrate()
        ref = await enqueue(store, clock, 1)
        await put(store, ref, "failed", attempts=1)
        await store.retry(ref)
        rows = await store.fetch("claim", clock(), 10, 30.0, "test")
        assert [r["id"] for r in rows] == [ref]
        with pytest.raises(MessageBusy):
            await store.hold(ref)
    finally:
        await store.close()


async def test_postgres_change_waits_for_a_claim_and_finds_it_active(
        pg_url: str, clock: FakeClock) -> None:
    store = PostgresStore(pg_url, clock=clock)
    try:
        await store.migrate()
        ref = await enqueue(store, clock, 1)
        other = await enqueue(store, clock, 2)
        async with store.transaction() as conn:  # a deliverer claims, not yet committed
            rows = await conn.fetch(store.sql["claim"], clock(), 1, 30.0, "test")
            assert [r["id"] for r in rows] == [ref]
            hold = asyncio.create_task(store.hold(ref))
            delete = asyncio.create_task(store.delete(ref))
            await asyncio.sleep(0.3)
            assert not hold.done() and not delete.done()  # they wait for the claim
            assert await store.hold(other) == other  # not claimed: not blocked
        with pytest.raises(MessageBusy):
            await hold
        with pytest.raises(MessageBusy):
            await delete
        assert await state_of(store, ref) == "active"
        # A held message is never claimed.
        assert await store.fetch("claim", clock() + DAY, 10, 30.0, "test") == []
        await check_in_step(store)
    finally:
        await store.close()


async def test_postgres_operations_race_deliverers(pg_url: str, clock: FakeClock) -> None:
    """Holds, releases and retries while claims and settles run: every change lands
    whole or not at all, and records stay in step with their rows."""
    store = PostgresStore(pg_url, clock=clock, pool_size=20)
    try:
        await store.migrate()
        refs = [str(await enqueue(store, clock, n)) for n in range(60)]
        stop = asyncio.Event()
        done = {"claimed": 0, "changed": 0, "refused": 0}

        async def deliverer() -> None:
            while not stop.is_set():
                async with store.transaction() as conn:
                    rows = await conn.fetch(store.sql["claim"], clock(), 5, 30.0, "test")
                    settles = []
                    done["claimed"] += len(rows)
                    for row in rows:
                        record = orjson.loads(row["record"])
                        record.update(state="deferred", attempts=record["attempts"] + 1,
                                      next_attempt_at=clock())
                        settles.append((row["id"], row["lease_token"], "deferred", clock(),
                                        record["attempts"], None,
                                        orjson.dumps(record).decode(), None))
                    if settles:
                        columns = [list(col) for col in zip(*settles, strict=True)]
                        await conn.fetch(store.sql["settle"], *columns)
                await asyncio.sleep(0)

        async def operator(n: int) -> None:
            for i in range(40):
                ref = refs[(n * 7 + i) % len(refs)]
                op = ("hold", "release", "retry")[i % 3]
                try:
                    await getattr(store, op)(ref)
                except (MessageBusy, MessageStateError):
                    done["refused"] += 1
                else:
                    done["changed"] += 1

        workers = [asyncio.create_task(deliverer()) for _ in range(3)]
        await asyncio.gather(*(operator(n) for n in range(4)))
        stop.set()
        await asyncio.gather(*workers)
        counts = await store.counts()
        assert sum(counts.values()) == 60 and counts["active"] == 0
        assert done["claimed"] and done["changed"] and done["refused"], done
        await check_in_step(store)
    finally:
        await store.close()


async def test_postgres_purge_goes_in_batches(pg_url: str, clock: FakeClock,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ess_async.store import pgops

    monkeypatch.setattr(pgops, "PURGE_BATCH", 3)
    monkeypatch.setattr(pgops, "RETRY_BATCH", 3)
    store = PostgresStore(pg_url, clock=clock)
    try:
        await store.migrate()
        refs = [await enqueue(store, clock, n) for n in range(10)]
        for ref in refs:
            await put(store, ref, "failed", attempts=1)
        assert await store.retry_all() == 10
        for ref in refs:
            await put(store, ref, "passed", attempts=1)
        clock.advance(10)
        assert await store.purge("passed", 5) == 10
        assert not any((await store.counts()).values())
    finally:
        await store.close()
