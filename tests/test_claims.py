"""Batched claims: concurrent senders' renames and reads share one thread job; the
rename alone decides who has a message, and a claim whose sender stops is undone."""

from __future__ import annotations

import asyncio
import os
import threading
from email import policy
from email.parser import BytesParser
from pathlib import Path

from ess_async import Client
from ess_async.delivery import WorkItem
from ess_async.journal import Journal, replay
from ess_async.retry import RetryPolicy
from ess_async.sender import Dispatcher
from ess_async.spool import Spool
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
