"""Issue 8: only the documented duplicate window. The journal, stop and error paths must
not send a message twice, lose a retry or strand a message.

Disk faults are real errors raised inside the real code paths by the error points of
``ess_async.faults`` (an ``OSError(EIO)`` where the journal or the spool would get one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from ess_async import Client, Manager, faults
from ess_async.journal import replay
from ess_async.spool import decode_record

from .conftest import SMTPServer, make_config

FAST_RETRY = {"min_backoff": 0.1, "max_backoff": 0.2}


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> object:
    yield
    for point in faults.FAIL_POINTS:
        faults.inject_failure(point, 0)


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


async def test_compaction_keeps_entries_written_but_not_yet_synced(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 item 1: compaction between two fsyncs (a waiter woken, not yet running) must
    not drop the waiter's ``accepted`` entry, which it is then told is durable."""
    config = make_config(smtp_server.port, server={"journal_compact_after": 1})
    manager = Manager(tmp_path / "ws", config=config)
    run = await manager._open_run()
    try:
        journal = run.journal
        first = {"op": "accepted", "id": "00000000000000000001-naaaaaaaa", "at": 1.0,
                 "code": 250, "reply": "OK", "refused": {}, "attempt": 1}
        second = {**first, "id": "00000000000000000002-nbbbbbbbb"}
        for entry in (first, second):
            run.dispatcher.claimed[entry["id"]] = None

        async def first_sender() -> None:
            await journal.append_durable(first)
            run.dispatcher.claimed[first["id"]] = first
            manager._maybe_compact(run)  # what finishing a message does, before 2 runs

        task = asyncio.create_task(first_sender())
        await asyncio.sleep(0)  # the first sender is inside its fsync now
        await asyncio.gather(task, journal.append_durable(second))
        compaction = getattr(run, "compaction", None)
        if compaction is not None:
            await compaction
        on_disk = replay(journal.path)
        assert first["id"] in on_disk
        assert second["id"] in on_disk  # it was promised durable
    finally:
        await manager._close_run(run)


async def test_failed_accepted_write_never_requeues(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    """Issue 8 item 2: an I/O error making the ``accepted`` entry durable after the 250
    must not put the message back in the queue: it is recorded as passed directly."""
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        faults.inject_failure("journal_sync")
        path = await manager.create_work(to="a@example.com", subject="once")
        outcome = await manager.wait(path, timeout=20)
        assert outcome.state == "passed"
        await asyncio.sleep(1.5)  # the old code sent it again after a 1 s pause
    assert smtp_server.handler.subjects() == ["once"]


async def test_accepted_message_is_recorded_when_the_disk_allows(
        tmp_path: Path, smtp_server: SMTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 8 items 2 and 12: neither the journal nor the passed record can be written
    after the 250; the acceptance is kept in memory and the record written once the disk
    works again (logged and counted), never sent twice."""
    caplog.set_level(logging.INFO, logger="ess_async")
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        faults.inject_failure("journal_sync")
        faults.inject_failure("spool_commit", 2)  # the first retry fails too
        path = await manager.create_work(to="a@example.com", subject="once")
        outcome = await manager.wait(path, timeout=20)
        assert outcome.state == "passed"
        assert outcome.code == 250
        assert manager._run is not None
        assert manager._run.dispatcher.summary.passed == 1
    assert smtp_server.handler.subjects() == ["once"]
    assert records(tmp_path / "ws", "queued") == records(tmp_path / "ws", "active") == []
    assert "now recorded" in caplog.text or "record is written now" in caplog.text


async def test_settle_whose_folder_fsync_failed_is_recorded_once(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """The accepted message's file was moved to passed/, then the folder's fsync failed:
    the retry finds it moved, syncs the folder and counts it once (with its own record),
    never sends it again."""
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        faults.inject_failure("spool_dir_sync")
        path = await manager.create_work(to="a@example.com", subject="once")
        outcome = await manager.wait(path, timeout=20)
        assert (outcome.state, outcome.code) == ("passed", 250)
        assert manager._run is not None
        dispatcher = manager._run.dispatcher
        for _ in range(500):  # the file is moved before the retry records it
            if dispatcher.summary.passed and not dispatcher.unsettled:
                break
            await asyncio.sleep(0.02)
        summary = dispatcher.summary
        assert (summary.passed, summary.failed, summary.deferred) == (1, 0, 0)
    assert smtp_server.handler.subjects() == ["once"]
    assert [r["id"] for r in records(tmp_path / "ws", "passed")] == [path.stem]
    assert records(tmp_path / "ws", "active") == []


async def test_partially_deferred_message_is_retried_while_serving(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 item 5: a 4xx for one recipient while the other accepted sets a retry timer
    (the old code left it in deferred/ until a restart)."""
    smtp_server.handler.rcpt_replies["b@example.com"] = ["450 4.2.0 try later"]
    config = make_config(smtp_server.port, retry=FAST_RETRY)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        path = await manager.create_work(to=["a@example.com", "b@example.com"], subject="x")
        outcome = await manager.wait(path, timeout=15)
    assert outcome.state == "passed"
    assert [m.rcpt_tos for m in smtp_server.handler.messages] == [["a@example.com"],
                                                                  ["b@example.com"]]


async def test_failed_commit_of_a_deferral_keeps_its_timer(tmp_path: Path,
                                                           smtp_server: SMTPServer) -> None:
    """Issue 8 item 6: the group commit of a deferred record fails; the message still gets
    its retry timer (the old code left it with none until a restart)."""
    smtp_server.handler.data_replies.append("451 4.3.0 later")
    config = make_config(smtp_server.port, retry=FAST_RETRY)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        faults.inject_failure("spool_commit")
        path = await manager.create_work(to="a@example.com", subject="x")
        outcome = await manager.wait(path, timeout=15)
    assert outcome.state == "passed"
    assert outcome.attempts == 2


async def test_failed_claim_write_does_not_strand_the_message(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 item 7: the journal write of a claim fails; the claim is undone and the
    message offered again (the old code kept its id claimed for the whole run)."""
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        faults.inject_failure("journal_write")
        path = await manager.create_work(to="a@example.com", subject="x")
        outcome = await manager.wait(path, timeout=15)
    assert outcome.state == "passed"
    assert smtp_server.handler.subjects() == ["x"]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_non_finite_time_is_quarantined_and_timers_go_on(
        tmp_path: Path, smtp_server: SMTPServer, bad: str) -> None:
    """Issue 8 item 8: a non-finite next_attempt_at is a corrupt record (quarantined); it
    must not wedge the timers (the old code never sent a good message due in 1 s)."""
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    client = Client(ws, config=config)
    hostile = client.create_work(to="a@example.com", subject="hostile")
    good = client.create_work(to="a@example.com", subject="good")
    for path, due in ((hostile, bad), (good, "0.5")):
        record = decode_record(path.read_bytes())
        record.update(state="deferred", attempts=1, next_attempt_at="DUE")
        text = json.dumps(record).replace('"DUE"', due)
        (ws / "deferred" / path.name).write_text(text)
        path.unlink()
    async with Manager(ws, spawn=1, config=config) as manager:
        outcome = await manager.wait(good, timeout=15)
        assert outcome.state == "passed"
        corrupt = await manager.wait(hostile, timeout=5)
        assert corrupt.state == "corrupt"
    assert smtp_server.handler.subjects() == ["good"]


async def test_two_waits_on_one_id_are_both_woken(tmp_path: Path,
                                                 smtp_server: SMTPServer) -> None:
    """Issue 8 item 12: one wait() ending must not unregister another wait() on the same
    id (which then fell back to polling)."""
    config = make_config(smtp_server.port)
    manager = Manager(tmp_path / "ws", config=config)
    path = await manager.create_work(to="a@example.com", subject="x")
    second = asyncio.create_task(manager.wait(path, timeout=10))
    with pytest.raises(TimeoutError):
        await manager.wait(path, timeout=0.05)
    assert path.stem in manager.file_store._waiters  # the second caller is still registered
    await manager.process_workload()
    assert (await second).state == "passed"
    assert manager.file_store._waiters == {}


async def test_idle_stop_does_not_claim_in_flight_sends(
        tmp_path: Path, smtp_server: SMTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 8 item 12: stopping an idle server does not log in-flight sends."""
    caplog.set_level(logging.INFO, logger="ess_async")
    async with Manager(tmp_path / "ws", spawn=3, config=make_config(smtp_server.port)) as m:
        await m.wait(await m.create_work(to="a@example.com", subject="x"), timeout=10)
        assert m._run is not None
        async with asyncio.timeout(10):
            while m._run.busy:  # the sender finishing up after the outcome was recorded
                await asyncio.sleep(0.01)
    assert "in-flight" not in caplog.text


def _open_in(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open (other tests' descriptors, opened
    or closed meanwhile, do not matter)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


async def test_failed_start_closes_what_it_opened(tmp_path: Path,
                                                 smtp_server: SMTPServer) -> None:
    """Issue 8 item 12: a start that fails after opening the journal (here: the delivery
    log cannot be opened) must not leak its descriptors or keep the lock."""
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port, server={"delivery_log": True})
    (ws / "delivery.log").mkdir(parents=True)  # cannot be opened for writing
    manager = Manager(ws, config=config)
    manager.create_config()
    for _ in range(3):
        with pytest.raises(IsADirectoryError):
            await manager.process_workload()
    assert _open_in(ws) == []
    manager._lock.acquire()  # and the workspace lock was released
    manager._lock.release()


async def test_stop_while_waiting_for_the_final_reply_is_outcome_unknown(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 item 3(a): the grace deadline cancels a send that is waiting for the reply
    to its final dot. The message may have been delivered: it is recorded as outcome
    unknown and deferred (the old code put it back in queued/ untouched, and the next run
    sent it again at once)."""
    handler = smtp_server.handler
    handler.hold.add("DATA")
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port, server={"grace": 0.2})
    manager = Manager(ws, spawn=1, config=config)
    async with manager:
        path = await manager.create_work(to="a@example.com", subject="slow")
        await asyncio.to_thread(handler.held.wait, 10)
    handler.release.set()  # (aiosmtpd drops the held reply with the closed connection)
    (record,) = records(ws, "deferred")
    assert record["id"] == path.stem
    assert record["attempts"] == 1
    assert record["last_error"]["outcome_unknown"] is True
    assert records(ws, "queued") == records(ws, "active") == []
    summary = await Manager(ws, config=config).process_workload()  # not due yet
    assert summary.total == 0
    assert handler.peers == []  # no second DATA


async def test_rescan_does_not_reread_scheduled_files(tmp_path: Path,
                                                     smtp_server: SMTPServer) -> None:
    """Issue 8, scale: the 30-second rescan of scheduled/ reads only files it has no
    timer for (the old code re-read every scheduled file in full, bodies included)."""
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    manager = Manager(ws, config=config)
    later = await manager.create_work(to="a@example.com", subject="later",
                                      send_at=manager.clock() + 3600)
    run = await manager._open_run()
    try:
        await manager._load_waiting(run, "scheduled")
        assert later.stem in run.timed
        later.write_bytes(b"{not json")  # a re-read would quarantine it
        await manager._load_waiting(run, "scheduled")
        assert later.exists()
        assert list((ws / "corrupt").iterdir()) == []
    finally:
        await manager._close_run(run)


def _entry(msg_id: str) -> dict:
    return {"op": "accepted", "id": msg_id, "at": 1.0, "code": 250, "reply": "OK",
            "refused": {}, "attempt": 1}


async def test_compaction_whose_folder_sync_fails_keeps_appends_durable(
        tmp_path: Path) -> None:
    """Issue 8 item 1 (review): a compaction that renamed the new file into place but
    could not sync the folder must not leave the writer on the old, unlinked file, where
    later "durable" entries would be invisible to recovery."""
    from ess_async.journal import Journal

    journal = Journal(tmp_path / "journal.log")
    try:
        await journal.append_durable(_entry("00000000000000000001-naaaaaaaa"))
        faults.inject_failure("journal_dir_sync")
        with pytest.raises(OSError):
            await journal.compact()
        later = _entry("00000000000000000002-nbbbbbbbb")
        await journal.append_durable(later)  # said durable: recovery must see it
        assert set(replay(tmp_path / "journal.log")) == {
            "00000000000000000001-naaaaaaaa", "00000000000000000002-nbbbbbbbb"}
    finally:
        journal.close()


async def test_entry_held_during_compaction_is_never_falsely_durable(
        tmp_path: Path) -> None:
    """Issue 8 item 1 (review): an entry appended while a compaction runs is written
    after it; if that write fails, its append_durable must not return as if it were on
    disk (the journal is rewritten from memory first, or the call raises)."""
    from ess_async.journal import Journal

    journal = Journal(tmp_path / "journal.log")
    try:
        compaction = asyncio.create_task(journal.compact())
        await asyncio.sleep(0)  # the compaction is in its thread; appends are held
        faults.inject_failure("journal_write")  # writing the held line will fail
        held = _entry("00000000000000000003-ncccccccc")
        try:
            await journal.append_durable(held)
        except OSError:
            pass  # acceptable: the caller knows it is not durable
        else:
            assert held["id"] in replay(tmp_path / "journal.log")
        await compaction
    finally:
        journal.close()


class _SlowSigner:
    """A signer whose second signature never finishes (a busy signing pool)."""

    def __init__(self) -> None:
        self.calls = 0
        self.in_second = asyncio.Event()

    async def sign(self, raw: bytes) -> bytes:
        self.calls += 1
        if self.calls >= 2:
            self.in_second.set()
            await asyncio.sleep(3600)
        return raw

    def close(self) -> None:
        pass


async def test_stop_while_signing_never_reads_the_last_sends_state(
        tmp_path: Path, smtp_server: SMTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 8 item 3 (review): a stop that cuts a send while its message is being signed
    (before the transport starts) must leave it queued: the pooled transport still holds
    the previous send's result, which must not be read as this message's (the message
    was recorded as passed and never sent: lost)."""
    from ess_async import manager as manager_module

    signer = _SlowSigner()
    monkeypatch.setattr(manager_module.DkimSigner, "from_config",
                        staticmethod(lambda *args, **kwargs: signer))
    config = make_config(smtp_server.port, server={"grace": 0.3})
    manager = Manager(tmp_path / "ws", config=config, spawn=1)
    async with manager:
        first = await manager.create_work(to="a@example.com", subject="A")
        assert (await manager.wait(first, timeout=10)).state == "passed"
        second = await manager.create_work(to="b@example.com", subject="B")
        await asyncio.wait_for(signer.in_second.wait(), 10)
    assert smtp_server.handler.subjects() == ["A"]
    assert [p.stem for p in (tmp_path / "ws" / "queued").iterdir()] == [second.stem]
