"""Batched claims: concurrent senders' renames and reads share one thread job; the
rename alone decides who has a message, and a claim whose sender stops is undone."""

from __future__ import annotations

import asyncio
import os
import threading
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from ess_async import Client, Manager
from ess_async import spool as spool_mod
from ess_async.delivery import WorkItem
from ess_async.errors import TemporaryDeliveryError
from ess_async.journal import Journal, replay
from ess_async.retry import RetryPolicy
from ess_async.sender import Dispatcher
from ess_async.spool import Spool
from ess_async.transports.base import SendResult, Transport
from ess_async.transports.memory import MemoryTransport

from .conftest import make_config


def _setup(tmp_path: Path, count: int) -> tuple[Dispatcher, list[str]]:
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(2525))
    ids = [client.create_work(to="a@example.com", subject=f"m{i}").stem for i in range(count)]
    dispatcher = Dispatcher(Spool(ws), Journal(ws / "journal.log"), RetryPolicy())
    return dispatcher, ids


async def test_concurrent_claims_share_a_thread_job_and_a_journal_write(
        tmp_path: Path) -> None:
    dispatcher, ids = _setup(tmp_path, 5)
    batches: list[int] = []
    claim_many = dispatcher.spool.claim_many

    def counting(claims: list[tuple[str, tuple[str, ...]]]) -> list[object]:
        batches.append(len(claims))
        return claim_many(claims)  # type: ignore[return-value]

    dispatcher.spool.claim_many = counting  # type: ignore[method-assign]
    outbox = MemoryTransport([])
    states = await asyncio.gather(*[dispatcher.deliver(WorkItem(1, i), outbox) for i in ids])
    assert states == ["passed"] * 5
    assert batches == [5]
    subjects = sorted(BytesParser(policy=policy.default).parsebytes(m.raw)["subject"]
                      for m in outbox.outbox)
    assert subjects == [f"m{i}" for i in range(5)]
    assert os.listdir(dispatcher.spool.dir("active")) == []
    assert dispatcher.claimed == {} and dispatcher.journal.live == {}
    dispatcher.journal.close()


async def test_the_same_id_offered_from_two_folders_is_sent_once(tmp_path: Path) -> None:
    """An id staged twice in one batch (offered from queued/ and from deferred/): the
    first rename that finds it claims it, the other finds nothing."""
    dispatcher, (msg_id,) = _setup(tmp_path, 1)
    assert dispatcher.spool.rename(msg_id, "queued", "deferred")
    outbox = MemoryTransport([])
    states = await asyncio.gather(dispatcher.deliver(WorkItem(1, msg_id, "queued"), outbox),
                                  dispatcher.deliver(WorkItem(1, msg_id, "deferred"), outbox))
    assert sorted(states, key=str) == [None, "passed"]
    assert len(outbox.outbox) == 1
    assert dispatcher.claimed == {}
    dispatcher.journal.close()


async def test_a_claim_whose_sender_stops_is_undone(tmp_path: Path) -> None:
    """The sender is cancelled while its claim is in the thread: once the rename lands,
    the message goes back to queued/ (not left in active/, claimed by nobody)."""
    dispatcher, (msg_id,) = _setup(tmp_path, 1)
    entered, release = threading.Event(), threading.Event()
    claim_many = dispatcher.spool.claim_many

    def slow(claims: list[tuple[str, tuple[str, ...]]]) -> list[object]:
        result = claim_many(claims)
        entered.set()
        release.wait(10)
        return result  # type: ignore[return-value]

    dispatcher.spool.claim_many = slow  # type: ignore[method-assign]
    sender = asyncio.ensure_future(dispatcher.deliver(WorkItem(1, msg_id), MemoryTransport([])))
    await asyncio.to_thread(entered.wait, 10)
    assert os.listdir(dispatcher.spool.dir("active")) == [f"{msg_id}.json"]
    sender.cancel()
    release.set()
    await asyncio.gather(sender, return_exceptions=True)
    await dispatcher.drain()
    assert sender.cancelled()
    assert os.listdir(dispatcher.spool.dir("active")) == []
    assert os.listdir(dispatcher.spool.dir("queued")) == [f"{msg_id}.json"]
    assert dispatcher.claimed == {} and dispatcher.journal.live == {}
    dispatcher.journal.close()
    assert replay(dispatcher.journal.path) == {}  # no claim journaled for it


# -- found in review: a claim in flight must stay exclusive ---------------------------


class Deferring(Transport):
    async def send(self, mail_from, recipients, raw, *, smtputf8=False):
        raise TemporaryDeliveryError("try later", code=451, phase="RCPT")


class RelayDown(Transport):
    async def send(self, mail_from, recipients, raw, *, smtputf8=False):
        raise TemporaryDeliveryError("connection refused", phase="CONNECT", destination=True)


class Blocking(Transport):
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.sent = 0

    async def send(self, mail_from, recipients, raw, *, smtputf8=False):
        self.entered.set()
        await self.release.wait()
        self.sent += 1
        return SendResult(code=250, message="ok")


def _where(dispatcher, msg_id):
    ws = dispatcher.spool.workspace
    return sorted(str(p.relative_to(ws)) for p in ws.rglob(f"{msg_id}.json"))


@pytest.mark.parametrize(("failing", "b_source", "state", "folder"), [
    (Deferring, "deferred", "deferred", "deferred"),  # B offered by a timer
    (RelayDown, "queued", "requeued", "queued"),      # B offered again from queued/
])
async def test_a_held_message_is_not_claimed_again_while_it_settles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: type[Transport],
        b_source: str, state: str, folder: str) -> None:
    """Found in review. Sender A holds X; sender B stages X while A's claim is in the
    thread. A's attempt puts X back (deferred, or queued: relay down); B, if let claim,
    would rename that new file into active/ just before A's commit removes active/X
    (the message lost from disk), and send X at once, ignoring its backoff."""
    dispatcher, (msg_id,) = _setup(tmp_path, 1)
    commit_paused, b_renamed = threading.Event(), threading.Event()
    first_in, first_go = threading.Event(), threading.Event()
    real_claim_many = dispatcher.spool.claim_many
    calls = []

    def claim_many(claims):
        calls.append(claims)
        if len(calls) == 1:
            first_in.set()
            first_go.wait(5)
            return real_claim_many(claims)
        commit_paused.wait(5)  # B's batch is just slower than A's send + commit
        result = real_claim_many(claims)
        b_renamed.set()
        return result

    def crash_point(name):
        if name == "after_next_state":
            commit_paused.set()
            b_renamed.wait(1)  # B's rename, if B was let claim (it must not be)

    dispatcher.spool.claim_many = claim_many
    monkeypatch.setattr(spool_mod, "crash_point", crash_point)
    b_transport = Blocking()
    a = asyncio.ensure_future(dispatcher.deliver(WorkItem(1, msg_id, "queued"), failing()))
    await asyncio.to_thread(first_in.wait, 5)
    b = asyncio.ensure_future(dispatcher.deliver(WorkItem(1, msg_id, b_source), b_transport))
    for _ in range(3):
        await asyncio.sleep(0)
    first_go.set()
    assert await a == state
    assert await asyncio.wait_for(b, 5) is None  # not claimed again
    assert not b_transport.entered.is_set()
    await dispatcher.drain()
    assert _where(dispatcher, msg_id) == [f"{folder}/{msg_id}.json"]
    assert dispatcher.claimed == {} and dispatcher.journal.live == {}
    dispatcher.journal.close()


async def test_resume_requeues_a_claim_in_flight(tmp_path: Path) -> None:
    """Found in review. Manager._resume (after another sender's OSError on X) must not
    take active/X for an abandoned claim while X's rename is in flight (not yet in
    ``claimed``): it went back to queued/ while being sent, and was sent again."""
    ws = tmp_path / "ws"
    msg_id = Client(ws, config=make_config(2525)).create_work(to="a@example.com",
                                                               subject="x").stem
    outbox: list = []
    manager = Manager(ws, config=make_config(2525),
                      transport_factory=lambda: MemoryTransport(outbox))
    run = await manager._open_run()
    try:
        renamed, go = threading.Event(), threading.Event()
        real = run.dispatcher.spool.claim_many

        def claim_many(claims):
            result = real(claims)
            renamed.set()
            go.wait(5)
            return result

        run.dispatcher.spool.claim_many = claim_many
        sender = asyncio.ensure_future(
            run.dispatcher.deliver(WorkItem(1, msg_id), MemoryTransport(outbox)))
        await asyncio.to_thread(renamed.wait, 5)
        manager._resume(run, msg_id)  # in active/, not in claimed: "abandoned"
        go.set()
        assert await sender == "passed"
        run.dispatcher.spool.claim_many = real
        again = await run.dispatcher.deliver(WorkItem(1, msg_id), MemoryTransport(outbox))
    finally:
        await manager._close_run(run)
    assert (again, len(outbox)) == (None, 1)


async def test_cancel_during_watcher_preload_leaks_the_run(tmp_path: Path) -> None:
    """Found in review. _serve awaited watcher.preload before its try/finally: a cancel
    there skipped _close_run (workspace lock, journal fd, manager._run all leaked)."""
    ws = tmp_path / "ws"
    Client(ws, config=make_config(2525)).create_work(to="a@example.com", subject="x")
    manager = Manager(ws, config=make_config(2525),
                      transport_factory=lambda: MemoryTransport([]))
    task = asyncio.create_task(manager.delegate_workload(handle_signals=False))
    while manager._run is None:
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert manager._run is None, "run never closed: lock held, 'already delivering'"
