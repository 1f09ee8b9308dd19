"""A sender settles a claimed message by appending what changed to the file it claimed and
renaming it (issue 11: creating a new file per settle bounded end to end). Readers merge
the update lines; a settle interrupted by a crash or a disk error is carried out (or, if
its update was torn, cut off) by recovery, and nothing is sent twice."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ess_async import Client, Manager
from ess_async import spool as spool_module
from ess_async.journal import Journal
from ess_async.spool import (
    UPDATE_MARK,
    CorruptRecord,
    decode_record,
    encode_record,
    encode_update,
)

from .conftest import FakeClock, SMTPServer, make_config, write_config
from .test_crash import run_cli


def final_files(ws: Path) -> dict[str, list[Path]]:
    return {state: sorted((ws / state).rglob("*.json"))
            for state in ("queued", "active", "deferred", "passed", "failed")}


def a_record() -> dict[str, Any]:
    return {"version": 1, "id": "01796094653622497463-n6407ed20", "state": "queued",
            "priority": "normal", "send_at": None, "created_at": 1.7e9,
            "mail_from": "s@example.com", "recipients": ["a@example.com"], "subject": "s",
            "attempts": 0, "next_attempt_at": None, "last_error": None, "smtputf8": False,
            "date_pending": True, "raw": "Subject: s\r\n\r\nbody\r\n"}


def test_a_delivered_message_keeps_its_file(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """The passed/ record is the very file enqueued (same inode), its bytes first, then one
    update line: no file is created to settle a message."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    path = Client(ws).create_work(to="a@example.com", subject="one")
    enqueued, inode = path.read_bytes(), path.stat().st_ino
    assert run_cli(ws, "process") == 0
    (passed,) = final_files(ws)["passed"]
    data = passed.read_bytes()
    assert passed.stat().st_ino == inode
    assert data.startswith(enqueued) and data.count(UPDATE_MARK) == 1
    record = decode_record(data)
    assert (record["state"], record["attempts"], record["result"]["code"]) == ("passed", 1, 250)
    assert "date_pending" not in record  # removed by the update's "unset"
    assert len(smtp_server.handler.messages) == 1


def test_updates_merge_in_order() -> None:
    base = a_record()
    first = {**base, "state": "deferred", "attempts": 1, "next_attempt_at": 1.8e9}
    del first["date_pending"]
    second = {**first, "state": "passed", "attempts": 2, "next_attempt_at": None,
              "result": {"code": 250, "message": "ok"}}
    data = encode_record(base) + encode_update(base, first) + encode_update(first, second)
    assert decode_record(data) == second
    # A pretty-printed record (an operator's edit) takes updates as well.
    pretty = orjson.dumps(base, option=orjson.OPT_INDENT_2)
    assert decode_record(pretty + encode_update(base, first)) == first
    # Only what changed is written: not the message again.
    assert b'"raw"' not in encode_update(base, first)


@pytest.mark.parametrize(("tail", "reason"), [
    (b'\n{"set":{"state":"pas', "update line 1: not JSON"),
    (b'\n{"set":[1]}', "update line 1: malformed"),
    (b'\n{"set":{},"unset":[1]}', "update line 1: malformed"),
    (b'\n{"set":{"attempts":"x"}}', "missing or malformed key 'attempts'"),
])
def test_a_bad_update_line_is_a_corrupt_record(tail: bytes, reason: str) -> None:
    with pytest.raises(CorruptRecord) as info:
        decode_record(encode_record(a_record()) + tail)
    assert info.value.reason.startswith(reason)


_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                       | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_extra_keys = st.sampled_from(["tags", "last_error", "result", "refused", "note", "x", "é"])


@settings(max_examples=300, deadline=None)
@given(old=st.dictionaries(_extra_keys, _values), new=st.dictionaries(_extra_keys, _values),
       attempts=st.sampled_from([0, 1, 2]))
def test_a_record_plus_its_update_reads_as_the_new_record(
        old: dict[str, Any], new: dict[str, Any], attempts: int) -> None:
    base = {**a_record(), **old}
    target = {**a_record(), **new, "attempts": attempts}
    target.pop("date_pending")
    data = encode_record(base) + encode_update(base, target)
    assert decode_record(data) == target
    # Exactly, types included (1 is not True, 0.0 is not 0).
    assert orjson.dumps(decode_record(data), option=orjson.OPT_SORT_KEYS) == \
        orjson.dumps(target, option=orjson.OPT_SORT_KEYS)


def test_a_failed_append_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills in the middle of an update: the claimed file is as it was claimed."""
    client = Client(tmp_path / "ws", config=make_config(25))
    path = client.create_work(to="a@example.com", subject="s")
    claimed = path.read_bytes()
    spool = client.spool
    os.rename(path, spool.path("active", path.stem))
    record = {**decode_record(claimed), "state": "deferred", "attempts": 1}

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_all", half_then_full)
    (error,) = spool.settle_many([(path.stem, "deferred", record, claimed)])
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert spool.path("active", path.stem).read_bytes() == claimed


def interrupted_settle(tmp_path: Path, port: int, *, tail: bytes, state: str,
                       accepted: bool) -> tuple[Path, str, bytes]:
    """A workspace as a crash leaves it: a message claimed (journaled with its size), maybe
    accepted, and ``tail`` appended to its file (its settle, whole or torn), not moved."""
    ws = tmp_path / "ws"
    write_config(ws, port)
    path = Client(ws).create_work(to="a@example.com", subject="one")
    claimed = path.read_bytes()
    msg_id = path.stem
    active = ws / "active" / path.name
    os.rename(path, active)
    record = decode_record(claimed)
    settled = {**record, "state": state, "attempts": 1, "finished_at": 1.7e9,
               "result": {"code": 250 if state == "passed" else 550, "message": "x"}}
    update = encode_update(record, settled)
    with active.open("ab") as fh:
        fh.write(update if tail == b"whole" else tail)
    journal = Journal(ws / "journal.log")
    journal.append({"op": "claim", "id": msg_id, "at": 1.7e9, "size": len(claimed)})
    if accepted:
        journal.append({"op": "accepted", "id": msg_id, "at": 1.7e9, "code": 250,
                        "reply": "ok", "refused": {}, "attempt": 1, "size": len(claimed)})
    journal.close()
    return ws, msg_id, claimed


@pytest.mark.parametrize(("state", "accepted"), [("passed", True), ("failed", False),
                                                 ("deferred", False)])
def test_recovery_carries_out_a_whole_update(tmp_path: Path, smtp_server: SMTPServer,
                                             state: str, accepted: bool) -> None:
    ws, msg_id, claimed = interrupted_settle(tmp_path, smtp_server.port, tail=b"whole",
                                             state=state, accepted=accepted)
    assert run_cli(ws, "cleanup") == 0
    files = final_files(ws)
    assert [p.stem for p in files[state]] == [msg_id]
    assert sum(len(v) for v in files.values()) == 1
    assert files[state][0].read_bytes().startswith(claimed)
    assert decode_record(files[state][0].read_bytes())["state"] == state
    assert smtp_server.handler.messages == []  # carried out, never sent


@pytest.mark.parametrize("accepted", [True, False])
def test_recovery_cuts_a_torn_update(tmp_path: Path, smtp_server: SMTPServer,
                                     accepted: bool) -> None:
    """A torn update was never synced, so its settle never happened: it is cut off. An
    accepted message is then finished as passed from the journal (never sent again);
    another is requeued and delivered."""
    ws, msg_id, claimed = interrupted_settle(tmp_path, smtp_server.port,
                                             tail=b'\n{"set":{"state":"fai', state="failed",
                                             accepted=accepted)
    assert run_cli(ws, "process") == 0
    files = final_files(ws)
    assert [p.stem for p in files["passed"]] == [msg_id]
    assert sum(len(v) for v in files.values()) == 1
    data = files["passed"][0].read_bytes()
    assert data.startswith(claimed) and b'"fai' not in data
    assert decode_record(data)["state"] == "passed"
    assert len(smtp_server.handler.messages) == (0 if accepted else 1)
    assert list((ws / "corrupt").iterdir()) == []


# -- found in review ---------------------------------------------------------------------


async def test_a_message_at_the_size_limit_survives_its_retries(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """``max_message_size`` bounds the record; its update lines have room of their own. A
    message just under the limit, deferred (its first attempt stamping a Date in a later
    second than the enqueue), is delivered at its next attempt, not quarantined; its
    update carries the Date's change, not a second copy of the message."""
    ws = tmp_path / "ws"
    clock = FakeClock()
    smtp_server.handler.data_replies.append("451 4.3.0 try again later")
    probe = Client(tmp_path / "probe", config=make_config(smtp_server.port))
    size = probe.create_work(to="a@example.com", subject="big", body="x" * 25_000).stat().st_size
    config = make_config(smtp_server.port, server={"grace": 5, "max_message_size": size + 8})
    manager = Manager(ws, config=config, clock=clock)
    path = await manager.create_work(to="a@example.com", subject="big", body="x" * 25_000)
    enqueued = path.read_bytes()
    clock.advance(5)
    assert (await manager.process_workload()).deferred == 1
    (deferred,) = final_files(ws)["deferred"]
    assert size < deferred.stat().st_size < size + 1000  # the Date spliced, not re-sent
    assert decode_record(deferred.read_bytes())["raw"] != decode_record(enqueued)["raw"]
    clock.advance(10)
    assert (await manager.process_workload()).passed == 1
    outcome = await manager.wait(path, timeout=5)
    assert outcome.state == "passed"
    assert list((ws / "corrupt").iterdir()) == []
    (passed,) = final_files(ws)["passed"]
    sent = smtp_server.handler.messages[-1].data
    assert decode_record(passed.read_bytes())["raw"].encode("ascii") == sent
    assert len(smtp_server.handler.messages) == 1  # the 451 is not recorded as received
    assert smtp_server.handler.transactions == 2


@given(text=st.text(min_size=1100, max_size=1400),
       edits=st.lists(st.tuples(st.integers(0, 1400), st.integers(0, 30), st.text(max_size=40)),
                      min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_a_spliced_text_reads_back_exactly(text: str, edits: list[tuple[int, int, str]]
                                           ) -> None:
    base = {**a_record(), "raw": text}
    changed = text
    for start, count, inserted in edits:
        start = min(start, len(changed))
        changed = changed[:start] + inserted + changed[start + count:]
    target = {**base, "raw": changed, "state": "deferred"}
    data = encode_record(base) + encode_update(base, target)
    assert decode_record(data) == target


def test_a_torn_update_without_a_journal_entry_is_cut_not_quarantined(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """A lone settle syncs the spool file, not the claim's journal line: a power loss can
    keep part of the update and lose that line. Recovery, with no size to go by, cuts the
    torn last line (every update line starts with a newline) and requeues the message."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    path = Client(ws).create_work(to="a@example.com", subject="torn")
    claimed = path.read_bytes()
    active = ws / "active" / path.name
    os.rename(path, active)
    record = decode_record(claimed)
    update = encode_update(record, {**record, "state": "deferred", "attempts": 1,
                                    "next_attempt_at": 1.7e9})
    with active.open("ab") as fh:
        fh.write(update[: len(update) // 2])
    assert run_cli(ws, "process") == 0
    assert list((ws / "corrupt").iterdir()) == []
    assert [p.stem for p in final_files(ws)["passed"]] == [path.stem]
    assert smtp_server.handler.subjects() == ["torn"]


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_bad_entry_in_active_is_still_quarantined(tmp_path: Path, smtp_server: SMTPServer,
                                                    kind: str) -> None:
    """Recovery's look for an interrupted settle opens the active/ file for writing: a link
    or a folder there must still reach the usual path (quarantine), not stay forever."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    path = Client(ws).create_work(to="a@example.com", subject="x")
    path.unlink()
    bad = ws / "active" / path.name
    if kind == "symlink":
        (tmp_path / "elsewhere.json").write_text("{}")
        bad.symlink_to(tmp_path / "elsewhere.json")
    else:
        bad.mkdir()
    for _ in range(2):
        assert run_cli(ws, "process") == 0
    assert not os.path.lexists(bad)
    assert [p.name for p in (ws / "corrupt").iterdir() if p.suffix == ".json"] == [path.name]
