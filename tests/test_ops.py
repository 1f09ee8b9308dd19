"""Queue operations (mailq / postsuper): through the API, the CLI, and beside a running
``serve`` process."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ess_async import Client, Manager, MessageNotFound
from ess_async.lock import lock_holder
from ess_async.ops import MessageBusy, MessageStateError, QueueOps, parse_duration
from ess_async.spool import decode_record

from .conftest import FakeClock, SMTPServer, make_config

DAY = 86400.0
NO_SERVER = 9  # nothing listens on 127.0.0.1:9; these tests never deliver


# -- helpers ---------------------------------------------------------------------------


def run_cli(workspace: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ess_async", "--log-level", "WARNING", command,
         "--workspace", str(workspace), *args],
        capture_output=True, text=True, timeout=60)


def cli_ok(workspace: Path, command: str, *args: str) -> str:
    result = run_cli(workspace, command, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def cli_error(workspace: Path, command: str, *args: str) -> str:
    result = run_cli(workspace, command, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def state_of(ops: QueueOps, msg_id: str) -> str | None:
    try:
        return str(ops.show(msg_id)["state"])
    except MessageNotFound:
        return None


def wait_state(ops: QueueOps, msg_id: str, state: str, timeout: float = 20.0) -> None:
    wait_until(lambda: state_of(ops, msg_id) == state, timeout, f"{msg_id} to be {state} "
               f"(it is {state_of(ops, msg_id)})")


def record(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = decode_record(path.read_bytes())
    return data


def assert_private(workspace: Path) -> None:
    for path in workspace.rglob("*.json"):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path


def config_text(port: int) -> str:
    # Deferred messages come back only after an hour: they stay put while a test acts.
    return (f'[message]\nfrom = "sender@example.com"\n\n[retry]\nmin_backoff = 3600\n'
            f'max_backoff = 7200\n\n[server]\ngrace = 5\nspawn = 1\n\n[transport.smtp]\n'
            f'host = "127.0.0.1"\nport = {port}\ntimeout = 10\n')


@contextmanager
def serving(workspace: Path, smtp_server: SMTPServer) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m ess_async serve`` on ``workspace``, ready (it has delivered a probe
    message, so its watcher is up); stopped with SIGTERM at the end."""
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "config.toml").write_text(config_text(smtp_server.port))
    probe = Client(workspace).create_work(to="probe@example.com", subject="probe").stem
    with open(workspace.parent / "serve.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ess_async", "serve", "--workspace",
                                 str(workspace)], stdout=log, stderr=log)
    try:
        ops = QueueOps(workspace)
        wait_until(lambda: state_of(ops, probe) == "passed" or proc.poll() is not None,
                   what="serve to deliver a probe message")
        assert proc.poll() is None, (workspace.parent / "serve.log").read_text()
        assert lock_holder(workspace) == proc.pid
        ops.delete(probe)
        with smtp_server.handler.lock:
            smtp_server.handler.messages.clear()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, (workspace.parent / "serve.log").read_text()


# -- the API ---------------------------------------------------------------------------


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("30s", "10m", "12h", "7d", "2w", "90", "1.5h")] == [
        30, 600, 43200, 604800, 1209600, 90, 5400]
    for bad in ("", "7x", "-1d", "d", "1 d 2"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_list_and_show(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(NO_SERVER))
    first = client.create_work(to=["a@example.com", "b@example.com"], subject="first",
                               body="hello")
    later = client.create_work(to="c@example.com", subject="later", priority="low",
                               send_at=time.time() + 3600)
    third = client.create_work(to="d@example.com", subject="third", priority="high")
    ops = QueueOps(ws)

    infos = ops.list()
    assert [i.id for i in infos] == [first.stem, later.stem, third.stem]  # oldest first
    assert [i.state for i in infos] == ["queued", "scheduled", "queued"]
    assert [i.priority for i in infos] == ["normal", "low", "high"]
    assert infos[0].recipients == ["a@example.com", "b@example.com"]
    assert infos[0].subject == "first" and infos[0].attempts == 0
    assert 0 <= infos[0].age < 60
    assert infos[1].next_attempt_at == pytest.approx(record(later)["send_at"])
    assert [i.id for i in ops.list(["scheduled"])] == [later.stem]
    assert [i.id for i in ops.list("queued", limit=1)] == [first.stem]
    assert ops.list(["passed", "failed"]) == []
    with pytest.raises(ValueError, match="unknown state 'sent'"):
        ops.list(["sent"])
    # An injected clock drives the ages.
    aged = QueueOps(ws, clock=lambda: record(first)["created_at"] + 7200)
    assert aged.list(limit=1)[0].age == pytest.approx(7200)

    shown = ops.show(first.stem)
    assert shown["state"] == "queued" and shown["path"] == str(first)
    assert "raw" not in shown and shown["raw_size"] == len(record(first)["raw"].encode())
    assert ops.show(first, raw=True)["raw"] == record(first)["raw"]  # a path works too
    with pytest.raises(MessageNotFound, match="00000000000000000001-n00000000"):
        ops.show("00000000000000000001-n00000000")
    with pytest.raises(ValueError, match="not a message id"):
        ops.show("../../etc/passwd")
    # A workspace that does not exist has no messages (and is not created).
    assert QueueOps(tmp_path / "nowhere").list() == []
    with pytest.raises(MessageNotFound):
        QueueOps(tmp_path / "nowhere").hold(first.stem)
    assert not (tmp_path / "nowhere").exists()


async def test_hold_release_retry_delete(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    handler = smtp_server.handler
    clock = FakeClock(time.time())
    config = make_config(smtp_server.port, retry={"min_backoff": 3600, "max_backoff": 7200})
    manager = Manager(ws, config=config, spawn=1, clock=clock)
    ops = QueueOps(ws, clock=clock)

    # A held message is never sent; released, it is.
    held = await manager.create_work(to="a@example.com", subject="held")
    assert ops.hold(held.stem) == ws / "held" / held.name
    rec = record(ws / "held" / held.name)
    assert (rec["state"], rec["held_from"]) == ("held", "queued")
    assert (await manager.process_workload()).total == 0
    assert ops.release(held) == held
    assert "held_from" not in record(held)
    assert (await manager.process_workload()).passed == 1
    assert handler.subjects() == ["held"]

    # Scheduled: held, then released back to scheduled/ while send_at is ahead...
    later = await manager.create_work(to="a@example.com", subject="later",
                                      send_at=clock.now + 600)
    assert ops.hold(later).parent.name == "held"
    assert ops.release(later) == later
    assert record(later)["next_attempt_at"] == record(later)["send_at"]
    # ... and to queued/ once it has passed.
    ops.hold(later)
    clock.advance(601)
    assert ops.release(later).parent.name == "queued"
    assert record(ws / "queued" / later.name)["next_attempt_at"] is None

    # Deferred (451) and failed (550): retried now, attempts kept.
    handler.data_replies.extend(["250 OK", "451 4.3.0 later", "550 5.7.1 no"])  # in id order
    deferred = await manager.create_work(to="a@example.com", subject="deferred")
    failed = await manager.create_work(to="a@example.com", subject="failed")
    summary = await manager.process_workload()  # "later" passes, the others do not
    assert (summary.passed, summary.deferred, summary.failed) == (1, 1, 1)
    assert ops.retry(deferred.stem) == ws / "queued" / deferred.name
    rec = record(ws / "queued" / deferred.name)
    assert (rec["state"], rec["next_attempt_at"], rec["attempts"]) == ("queued", None, 1)
    (failed_path,) = (ws / "failed").rglob(failed.name)
    with pytest.raises(MessageStateError, match=f"hold message {failed.stem}: it is failed"):
        ops.hold(failed.stem)
    assert ops.retry(failed_path) == ws / "queued" / failed.name
    assert not failed_path.exists()
    rec = record(ws / "queued" / failed.name)
    assert rec["attempts"] == 1 and rec["state"] == "queued"
    assert "result" not in rec and "finished_at" not in rec
    assert rec["last_error"]["code"] == 550  # what happened last time is kept
    summary = await manager.process_workload()
    assert summary.passed == 2
    assert sorted(handler.subjects()) == ["deferred", "failed", "held", "later"]
    assert all(r["attempts"] == 2 for r in map(record, (ws / "passed").rglob("*.json"))
               if r["subject"] in ("deferred", "failed"))

    # retry_all: every deferred and failed message.
    handler.data_replies.extend(["451 4.3.0 later", "550 5.7.1 no"])
    await manager.create_work(to="a@example.com", subject="d2")
    await manager.create_work(to="a@example.com", subject="f2")
    await manager.process_workload()
    assert ops.retry_all(["deferred"]) == 1
    assert ops.retry_all() == 1
    assert ops.retry_all() == 0
    assert (await manager.process_workload()).passed == 2

    # Wrong states say what the message is.
    queued = await manager.create_work(to="a@example.com", subject="queued")
    with pytest.raises(MessageStateError, match=f"release message {queued.stem}: it is queued"):
        ops.release(queued)
    with pytest.raises(MessageStateError, match="it is queued"):
        ops.retry(queued)
    passed = next((ws / "passed").rglob("*.json"))
    with pytest.raises(MessageStateError, match="it is passed"):
        ops.hold(passed)
    ops.hold(queued)
    with pytest.raises(MessageStateError, match="it is held"):
        ops.hold(queued)
    assert_private(ws)

    # delete: from any state but active.
    assert ops.delete(queued) == "held"
    assert ops.delete(passed) == "passed"
    assert not passed.exists()
    with pytest.raises(MessageNotFound):
        ops.delete(queued)


def test_active_message_is_busy(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    path = Client(ws, config=make_config(NO_SERVER)).create_work(to="a@example.com")
    os.rename(path, ws / "active" / path.name)  # what a sender's claim does
    ops = QueueOps(ws)
    assert ops.show(path)["state"] == "active"
    assert [i.state for i in ops.list()] == ["active"]
    for op in (ops.hold, ops.delete, ops.retry, ops.release):
        with pytest.raises(MessageBusy, match=f"{path.stem}: it is active"):
            op(path)
    assert f"{path.stem}: it is active (being sent)" in cli_error(ws, "delete", path.stem)
    assert (ws / "active" / path.name).exists()


def test_links_and_damaged_files_are_not_followed(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(NO_SERVER))
    outside = client.create_work(to="a@example.com", subject="outside")
    target = tmp_path / "target.json"
    os.rename(outside, target)
    before = target.read_bytes()
    link_id = outside.stem
    os.symlink(target, ws / "held" / f"{link_id}.json")
    damaged = client.create_work(to="a@example.com")
    damaged.write_bytes(b"{not json")
    ops = QueueOps(ws)

    shown = ops.show(link_id)
    assert shown["state"] == "held" and "cannot open" in shown["unreadable"]
    infos = {i.id: i for i in ops.list()}
    assert infos[link_id].last_error is not None
    assert infos[damaged.stem].last_error.startswith("unreadable: not JSON")  # type: ignore[union-attr]
    with pytest.raises(MessageStateError, match="unreadable"):
        ops.release(link_id)
    with pytest.raises(MessageStateError, match=f"hold message {damaged.stem}.*unreadable"):
        ops.hold(damaged)
    assert damaged.exists()  # left where it was, for the server to quarantine
    assert ops.delete(link_id) == "held"
    assert not os.path.lexists(ws / "held" / f"{link_id}.json")
    assert target.read_bytes() == before  # the link was removed, never its target


async def test_purge(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    t0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC
    clock = FakeClock(t0)
    manager = Manager(ws, config=make_config(smtp_server.port), spawn=1, clock=clock)
    smtp_server.handler.data_replies.extend(["250 ok", "550 no"])
    old = await manager.create_work(to="a@example.com", subject="old")
    old_failed = await manager.create_work(to="a@example.com", subject="old failed")
    await manager.process_workload()
    clock.advance(60)  # same day, a minute later
    minute = await manager.create_work(to="a@example.com", subject="a minute later")
    await manager.process_workload()
    clock.advance(5 * DAY)
    recent = await manager.create_work(to="a@example.com", subject="recent")
    await manager.process_workload()
    (ws / "queued" / "00000000000000000001-n0000000a.json").write_bytes(b"junk")
    await manager.process_workload()  # quarantined, noted with the real time
    assert manager.status()["corrupt"] == 1

    # Seven days and 30 seconds after t0: "old" is past the cutoff, "a minute later" not
    # (both in the same daily folder).
    ops = QueueOps(ws, clock=lambda: t0 + 7 * DAY + 30)
    assert ops.purge("passed", older_than=7 * DAY) == 1
    remaining = {r["subject"] for r in map(record, (ws / "passed").rglob("*.json"))}
    assert remaining == {"a minute later", "recent"}
    assert ops.purge("failed", 8 * DAY) == 0
    assert ops.purge("failed", 7 * DAY) == 1
    with pytest.raises(MessageNotFound):
        ops.show(old_failed)
    assert state_of(ops, old.stem) is None and state_of(ops, minute.stem) == "passed"
    assert QueueOps(ws, clock=lambda: t0 + 30 * DAY).purge("passed", 7 * DAY) == 2
    assert state_of(ops, recent.stem) is None

    # Quarantined files go by the time of quarantine.
    now = QueueOps(ws)
    assert now.purge("corrupt", older_than=3600) == 0
    assert QueueOps(ws, clock=lambda: time.time() + 7200).purge("corrupt", 3600) == 1
    assert list((ws / "corrupt").iterdir()) == []  # the .reason note went with it

    with pytest.raises(ValueError, match="can only purge"):
        now.purge("queued", 0)
    with pytest.raises(ValueError, match="older_than"):
        now.purge("passed", -1)


# -- the command line ------------------------------------------------------------------


def test_cli(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(NO_SERVER))
    first = client.create_work(to="a@example.com", subject="first", from_="s@example.com")
    second = client.create_work(to="b@example.com", subject="second", from_="s@example.com")

    listed = json.loads(cli_ok(ws, "list", "--json"))
    assert [m["id"] for m in listed] == [first.stem, second.stem]
    assert listed[0]["recipients"] == ["a@example.com"] and listed[0]["state"] == "queued"
    assert [m["id"] for m in json.loads(cli_ok(ws, "list", "--json", "--limit", "1"))] == [
        first.stem]
    text = cli_ok(ws, "list")
    assert first.stem in text and "subject: second" in text and "2 message(s)" in text

    shown = json.loads(cli_ok(ws, "show", first.stem))
    assert shown["subject"] == "first" and "raw" not in shown
    assert "Subject: first" in json.loads(cli_ok(ws, "show", str(first), "--raw"))["raw"]

    assert cli_ok(ws, "hold", first.stem).split() == [first.stem, "held"]
    assert json.loads(cli_ok(ws, "list", "--json", "--state", "held"))[0]["id"] == first.stem
    assert "it is held" in cli_error(ws, "hold", first.stem)
    assert cli_ok(ws, "release", first.stem).split() == [first.stem, "queued"]

    # Make them deferred and failed by hand: what a sender writes.
    for path, state in ((first, "deferred"), (second, "failed")):
        rec = record(path)
        rec.update(state=state, attempts=3, next_attempt_at=time.time() + 600,
                   last_error={"code": 451, "message": "later", "at": time.time()})
        folder = ws / state if state == "deferred" else ws / "failed" / "2027-01-15"
        folder.mkdir(exist_ok=True)
        (folder / path.name).write_text(json.dumps(rec))
        path.unlink()
    text = cli_ok(ws, "list", "--state", "deferred")
    assert "last error: 451 later" in text and "next attempt in" in text
    assert cli_ok(ws, "retry", first.stem).split() == [first.stem, "queued"]
    assert cli_ok(ws, "retry", "--all").strip() == "retried 1 message(s)"
    assert record(second)["attempts"] == 3
    assert "it is queued" in cli_error(ws, "retry", first.stem)

    assert cli_ok(ws, "delete", second.stem).strip() == f"{second.stem} deleted (was queued)"
    assert "no message" in cli_error(ws, "delete", second.stem)
    assert "not a message id" in cli_error(ws, "show", "nope")
    assert cli_ok(ws, "purge", "--state", "passed", "--older-than", "7d").strip() == (
        "purged 0 passed message(s)")
    assert "not a duration" in cli_error(ws, "purge", "--state", "failed", "--older-than", "7x")
    assert run_cli(ws, "purge", "--state", "queued", "--older-than", "1d").returncode == 2
    assert run_cli(ws, "retry").returncode == 2  # an id or --all
    assert cli_ok(ws, "list", "--state", "failed").strip() == "no messages"
    assert_private(ws)


# -- beside a running server -----------------------------------------------------------


def test_ops_while_serving(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    handler = smtp_server.handler
    client = Client(ws, config=make_config(smtp_server.port))
    ops = QueueOps(ws)

    def create(subject: str, **kwargs: Any) -> str:
        return client.create_work(to="a@example.com", subject=subject, **kwargs).stem

    with serving(ws, smtp_server):
        handler.data_replies.append("451 4.3.0 try later")
        deferred = create("deferred")
        wait_state(ops, deferred, "deferred")

        # A deferred message, held and released, is sent at once.
        assert cli_ok(ws, "hold", deferred).split() == [deferred, "held"]
        assert cli_ok(ws, "release", deferred).split() == [deferred, "queued"]
        wait_state(ops, deferred, "passed")
        assert handler.subjects() == ["deferred"]

        # A message scheduled for later can be held and put back on schedule.
        scheduled = create("scheduled", send_at=time.time() + 3600)
        assert cli_ok(ws, "hold", scheduled).split() == [scheduled, "held"]
        assert cli_ok(ws, "release", scheduled).split() == [scheduled, "scheduled"]

        # Held before its time comes, a message is never sent, even when the server's
        # timer for it fires; released after that, it is sent.
        send_at = time.time() + 1.5
        soon = create("held, never sent", send_at=send_at)
        ops.hold(soon)
        wait_until(lambda: time.time() > send_at + 0.5, what="the send_at to pass")
        barrier = create("barrier")
        wait_state(ops, barrier, "passed")
        assert state_of(ops, soon) == "held"
        assert "held, never sent" not in handler.subjects()
        assert cli_ok(ws, "release", soon).split() == [soon, "queued"]
        wait_state(ops, soon, "passed")

        # A failed message (550), retried, is delivered; so is a deferred one.
        handler.data_replies.append("550 5.7.1 not now")
        failed = create("failed")
        wait_state(ops, failed, "failed")
        assert cli_ok(ws, "retry", failed).split() == [failed, "queued"]
        wait_state(ops, failed, "passed")
        handler.data_replies.append("451 4.3.0 try later")
        again = create("deferred again")
        wait_state(ops, again, "deferred")
        assert cli_ok(ws, "retry", "--all").strip() == "retried 1 message(s)"
        wait_state(ops, again, "passed")
        assert record(next((ws / "passed").rglob(f"{again}.json")))["attempts"] == 2

        # list, show, delete and purge meanwhile.
        listed = {m["id"]: m["state"] for m in json.loads(cli_ok(ws, "list", "--json"))}
        assert listed[scheduled] == "scheduled" and listed[failed] == "passed"
        assert json.loads(cli_ok(ws, "show", scheduled))["state"] == "scheduled"
        assert cli_ok(ws, "delete", scheduled).strip() == f"{scheduled} deleted (was scheduled)"
        assert cli_ok(ws, "purge", "--state", "passed", "--older-than", "1d").strip() == (
            "purged 0 passed message(s)")
        assert cli_ok(ws, "purge", "--state", "passed", "--older-than", "0s").strip() == (
            "purged 5 passed message(s)")
        assert ops.list() == []

    assert sorted(handler.subjects()) == ["barrier", "deferred", "deferred again", "failed",
                                          "held, never sent"]


def test_holding_races_with_the_server(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Hold messages the server is claiming at the same moment: each hold either wins
    (the message is never sent while held) or loses cleanly (busy, or already passed)."""
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(smtp_server.port))
    ops = QueueOps(ws)
    held: list[str] = []
    with serving(ws, smtp_server):
        ids = [client.create_work(to="a@example.com", subject=f"m{i}").stem for i in range(40)]
        subject = {msg_id: f"m{i}" for i, msg_id in enumerate(ids)}
        wait_state(ops, ids[0], "passed")  # the server is working through them: race it
        for msg_id in reversed(ids):
            try:
                ops.hold(msg_id)
                held.append(msg_id)
            except MessageBusy as exc:
                assert exc.state == "active"
            except MessageStateError as exc:
                assert exc.state == "passed"
        sent = [i for i in ids if i not in held]
        for msg_id in sent:
            wait_state(ops, msg_id, "passed")
        assert all(state_of(ops, msg_id) == "held" for msg_id in held)
        subjects = smtp_server.handler.subjects()
        assert sorted(subjects) == sorted(subject[i] for i in sent)  # once each, none held
        for msg_id in held:
            assert ops.release(msg_id).parent.name == "queued"
        for msg_id in held:
            wait_state(ops, msg_id, "passed")
        subjects = smtp_server.handler.subjects()
    assert sorted(subjects) == sorted(subject.values())
