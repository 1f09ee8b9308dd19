"""Issue 11 item 5: a huge queued/ backlog is kept as a compact listing and offered a
chunk at a time; priorities and age order still hold, and rescans never double-offer.
(A few thousand messages and small chunk sizes stand in for a million.)"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import ClassVar

import pytest

from ess_async import Client, Manager, SendResult, Transport
from ess_async import manager as manager_mod

from .conftest import SMTPServer, make_config

SUBJECT = re.compile(rb"\r\nSubject: (\S+)\r\n")


class Recording(Transport):
    """Accepts everything; records the Subject (the message id) of each message."""

    sent: ClassVar[list[str]] = []
    most_queued = 0
    manager: Manager | None = None

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        found = SUBJECT.search(raw)
        assert found is not None
        Recording.sent.append(found.group(1).decode())
        run = Recording.manager._run if Recording.manager else None
        if run is not None:
            Recording.most_queued = max(Recording.most_queued, run.queue.qsize())
        await asyncio.sleep(0)
        return SendResult(250, "OK")


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_mod, "_CHUNK", 40)
    monkeypatch.setattr(manager_mod, "_RUN_IDS", 64)
    Recording.sent = []
    Recording.most_queued = 0
    Recording.manager = None


def fill(ws: Path, letters: str) -> list[str]:
    """One message per letter (h, n, l) with its own id, written as copies of one valid
    record (ids out of creation order on disk: scandir order is not id order)."""
    path = Client(ws).create_work(to="a@example.com", subject="SUBJ", from_="s@example.com")
    data = path.read_bytes()
    os.unlink(path)
    ids = []
    for i, letter in enumerate(letters):
        msg_id = f"{10**19 + (i * 7919) % 100003:020d}-{letter}{i:08x}"
        (ws / "queued" / f"{msg_id}.json").write_bytes(
            data.replace(path.stem.encode(), msg_id.encode()).replace(
                b"Subject: SUBJ", f"Subject: {msg_id}".encode()))
        ids.append(msg_id)
    return ids


def expected_order(ids: list[str]) -> list[str]:
    rank = {"h": 0, "n": 1, "l": 2}
    return sorted(ids, key=lambda i: (rank[i[21]], i))


async def test_lazy_offering_keeps_priority_and_age_order(tmp_path: Path,
                                                          small_chunks: None) -> None:
    ws = tmp_path / "ws"
    ids = fill(ws, "lnh" * 700 + "n" * 400)
    manager = Manager(ws, spawn=1, config=make_config(1), transport_factory=Recording)
    Recording.manager = manager
    summary = await manager.process_workload()
    assert summary.passed == len(ids)
    # high before normal before low, oldest first within each, with one sender
    assert Recording.sent == expected_order(ids)
    # never the whole backlog in memory as queue items: a chunk at a time
    assert 0 < Recording.most_queued <= 40
    assert os.listdir(ws / "queued") == []


async def test_rescans_during_a_scan_and_while_offering_never_double_offer(
        tmp_path: Path, small_chunks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "ws"
    ids = fill(ws, "nhl" * 600)
    manager = Manager(ws, spawn=4, config=make_config(1), transport_factory=Recording)
    Recording.manager = manager
    listings = 0
    original = manager._list_queued

    def counted(gentle: bool = False) -> tuple[list[list[str]], int]:
        nonlocal listings
        listings += 1
        return original(gentle)

    monkeypatch.setattr(manager, "_list_queued", counted)
    async with manager:
        run = manager._run
        assert run is not None
        # start-up asked for two scans (the watcher's and serve's); three more now, at
        # once, while the first listing may still run: one more listing at most each
        # time a scan is in progress, never two at the same time
        await asyncio.gather(*(manager._scan_queued(run) for _ in range(3)))
        queued = [item.msg_id for item in run.queue._queue]  # type: ignore[attr-defined]
        assert len(queued) == len(set(queued))
        for _ in range(3):  # and rescans while the backlog is being offered
            await asyncio.sleep(0.02)
            await manager._scan_queued(run)
            queued = [item.msg_id for item in run.queue._queue]  # type: ignore[attr-defined]
            assert len(queued) == len(set(queued))  # nothing offered twice
        for _ in range(500):
            if len(Recording.sent) >= len(ids):
                break
            await asyncio.sleep(0.02)
    assert sorted(Recording.sent) == sorted(ids)  # each delivered exactly once
    assert len(Recording.sent) == len(set(Recording.sent))
    assert listings <= 2 + 3 + 3
    assert os.listdir(ws / "queued") == []


async def test_scan_asked_during_a_scan_lists_again(tmp_path: Path,
                                                    small_chunks: None) -> None:
    """A message that arrives while a listing runs is found by the scan asked for
    meanwhile (the watcher's first scan must never be lost to one in progress)."""
    ws = tmp_path / "ws"
    fill(ws, "n" * 50)
    manager = Manager(ws, spawn=1, config=make_config(1), transport_factory=Recording)
    run = await manager._open_run()
    try:
        started = asyncio.Event()
        release = asyncio.Event()
        loop = asyncio.get_running_loop()
        original = manager._list_queued
        calls = 0

        def slow(gentle: bool = False) -> tuple[list[list[str]], int]:
            nonlocal calls
            calls += 1
            listed = original(gentle)
            if calls == 1:  # listed before the late message arrives
                loop.call_soon_threadsafe(started.set)
                asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return listed

        manager._list_queued = slow  # type: ignore[method-assign]
        first = asyncio.create_task(manager._scan_queued(run))
        await started.wait()
        late = fill(ws, "h")[0]
        await manager._scan_queued(run)  # returns at once: the running scan lists again
        release.set()
        await first
        assert calls == 2
        # the first listing offered one chunk (40) and kept 10; the second, a chunk more
        # than was queued: the late one and those 10, the 40 queued ones skipped
        assert run.pending.get(late) == "queued"
        assert run.queue.qsize() == 51
        assert run.backlog_size == 0
        assert run.queue.get_nowait().msg_id == late  # high priority first
    finally:
        await manager._close_run(run)


async def test_watchers_first_scan_is_skipped_after_a_later_listing(
        tmp_path: Path, small_chunks: None) -> None:
    """serve lists queued/ itself once the watch is set up; the watcher's first scan
    (``unless_since`` = when its watch was set up) then lists nothing again, but does
    list if no listing began after its watch."""
    ws = tmp_path / "ws"
    fill(ws, "n" * 10)
    manager = Manager(ws, spawn=1, config=make_config(1), transport_factory=Recording)
    run = await manager._open_run()
    try:
        calls = 0
        original = manager._list_queued

        def counted(gentle: bool = False) -> tuple[list[list[str]], int]:
            nonlocal calls
            calls += 1
            return original(gentle)

        manager._list_queued = counted  # type: ignore[method-assign]
        watch_set_up = time.monotonic()
        await manager._scan_queued(run)
        await manager._scan_queued(run, unless_since=watch_set_up)
        assert calls == 1
        late = fill(ws, "h")[0]
        await manager._scan_queued(run, unless_since=time.monotonic())
        assert calls == 2
        assert run.pending.get(late) == "queued"
    finally:
        await manager._close_run(run)


def test_a_slow_listing_is_repeated_less_often() -> None:
    """The safety-net rescan spends at most 5% of the time listing queued/: every 30 s
    for a small folder, every 200 s when a listing (a million files) took 10 s, and at
    least every 10 minutes (it also times deferred and scheduled messages)."""
    from ess_async.manager import rescan_interval

    assert rescan_interval(0.0) == rescan_interval(1.0) == 30.0
    assert rescan_interval(10.0) == 200.0
    assert rescan_interval(100.0) == 600.0  # found in review: never later than 10 minutes


async def test_the_listing_quarantines_strays_and_leaves_dot_files(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """The one listing of queued/ also finds entries that are not message files: they go
    to corrupt/ with a reason; dot files (an editor's, a copy in progress) stay."""
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    Client(ws, config=config).create_work(to="a@example.com", subject="good")
    (ws / "queued" / "notes.txt").write_text("not a message")
    (ws / "queued" / ".partial.json").write_text("{")
    summary = await Manager(ws, config=config).process_workload()
    assert summary.passed == 1
    assert smtp_server.handler.subjects() == ["good"]
    assert sorted(os.listdir(ws / "queued")) == [".partial.json"]
    corrupt = sorted(os.listdir(ws / "corrupt"))
    assert len(corrupt) == 2 and corrupt[1].endswith(".reason")
    assert "not a message file name" in (ws / "corrupt" / corrupt[1]).read_text()
