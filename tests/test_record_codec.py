"""Records and journal entries through orjson (issue 11 item 2): the same data as the json
module wrote and read, and what orjson cannot do the same way (NaN, integers beyond 64
bits, lone surrogates) goes through json as before: quarantined, never a crash."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ess_async import Client, Manager
from ess_async import record as record_module
from ess_async.journal import _encode, replay
from ess_async.spool import CorruptRecord, Spool, decode_record, encode_record

from .conftest import SMTPServer, make_config


def old_encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def old_reason(data: bytes) -> str:
    """Why the json-only decoder (before orjson) refused ``data``."""
    try:
        record_module._check_record(record_module._decode_json(data))
    except CorruptRecord as exc:
        return exc.reason
    raise AssertionError("the old decoder took it")


def a_record(tmp_path: Path, **attrs: object) -> tuple[Client, Path, dict[str, Any]]:
    client = Client(tmp_path / "ws", config=make_config(25))
    path = client.create_work(**{"to": "a@example.com", "subject": "s", **attrs})
    return client, path, json.loads(path.read_bytes())


def test_encode_is_the_json_modules_data(tmp_path: Path) -> None:
    _, _, record = a_record(tmp_path, subject="Grüße ☃", body="naïve\n")
    record.update(line_separator="a\u2028b\u2029c\x7f",
                  last_error={"code": 451, "message": "réessayez \U0001f600", "at": 1.5e9,
                              "ratio": 0.1 + 0.2}, refused={"x@example.com": [550, "no"]},
                  big=2**63 + 5, neg=-(2**63), tiny=5e-324, unicode_key={"ключ": "значение"})
    encoded = encode_record(record)
    assert json.loads(encoded) == json.loads(old_encode(record)) == record
    assert "Grüße".encode() in encoded  # UTF-8, as ensure_ascii=False wrote it
    assert decode_record(encoded) == record
    # A file written by the old encoder reads back the same.
    assert decode_record(old_encode(record)) == record


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30, -(10**40)],
                         ids=["2**64", "-2**63-1", "10**30", "-10**40"])
def test_ints_beyond_64_bits_keep_their_type(tmp_path: Path, value: int) -> None:
    """orjson refuses to write them and reads them as floats: json does both, as before."""
    _, _, record = a_record(tmp_path)
    record["extra"] = [1, {"n": value}]
    encoded = encode_record(record)
    assert encoded == old_encode(record)
    decoded = decode_record(encoded)
    assert decoded["extra"][1]["n"] == value
    assert type(decoded["extra"][1]["n"]) is int
    record["attempts"] = value  # an int: a record as far as the checks go, as before
    assert decode_record(encode_record(record))["attempts"] == value


@pytest.mark.parametrize("text", ["10" * 200, "1" + "0" * 400, "-" + "9" * 500])
def test_huge_int_time_is_corrupt_not_a_crash(tmp_path: Path, text: str) -> None:
    _, _, record = a_record(tmp_path)
    data = old_encode(record).replace(b'"next_attempt_at":null',
                                      b'"next_attempt_at":' + text.encode())
    if len(text) > 300:  # no float can hold it
        with pytest.raises(CorruptRecord, match="next_attempt_at"):
            decode_record(data)
    else:
        assert decode_record(data)["next_attempt_at"] == int(text)


def test_non_finite_floats_are_written_as_json_wrote_them(tmp_path: Path) -> None:
    """orjson would write NaN as null (a valid record, due at once); json writes NaN,
    which is refused when read, as it always was."""
    _, _, record = a_record(tmp_path)
    record["next_attempt_at"] = float("nan")
    encoded = encode_record(record)
    assert b'"next_attempt_at":NaN' in encoded
    with pytest.raises(CorruptRecord, match="non-finite"):
        decode_record(encoded)
    record["next_attempt_at"] = float("inf")
    assert b'"next_attempt_at":Infinity' in encode_record(record)


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbf" + b'{"id":1}',          # a BOM: json reads it, then the checks refuse it
    b'{"id":"\\ud800"}',                      # a lone surrogate escape
    '{"id":1}'.encode("utf-16"),              # UTF-16: json detects it
    b'{"raw":"\xff"}',                         # not UTF-8
    b"[1, 2]", b"null", b"1e400", b'{"a":NaN}', b"{" * 100, b"",
])
def test_what_orjson_refuses_is_judged_as_before(data: bytes) -> None:
    with pytest.raises(CorruptRecord) as new:
        decode_record(data)
    if data:
        assert new.value.reason == old_reason(data)


async def test_hostile_numbers_are_quarantined_while_delivery_goes_on(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port)
    client = Client(ws, config=config)
    paths = [client.create_work(to="a@example.com", subject=f"m{i}") for i in range(4)]
    good = paths[0]
    for path, old, new in [
            (paths[1], b'"next_attempt_at":null', b'"next_attempt_at":1' + b"0" * 400),
            (paths[2], b'"attempts":0', b'"attempts":0,"x":[1e400]'),
            (paths[3], b'"attempts":0', b'"attempts":' + b"9" * 30)]:
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new, 1))
    summary = await Manager(ws, spawn=2, config=config).process_workload()
    assert (summary.passed, summary.corrupt) == (2, 2)  # 10**30 attempts is still an int
    assert sorted(smtp_server.handler.subjects()) == ["m0", "m3"]
    assert sorted(os.listdir(ws / "corrupt")) == sorted(
        [paths[1].name, paths[1].name + ".reason", paths[2].name, paths[2].name + ".reason"])
    assert good.name not in os.listdir(ws / "queued")


def test_journal_lines_read_back(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    entries = [{"op": "accepted", "id": "a", "at": 1.7e9, "code": 250,
                "reply": "2.0.0 d'accord ✓", "refused": {}, "attempt": 1},
               {"op": "accepted", "id": "b", "at": 1.7e9, "code": 250,
                "reply": "bad \udcff byte", "refused": {}, "attempt": 1},  # surrogateescape
               {"op": "claim", "id": "c", "at": float("nan")},  # never trusted
               {"op": "claim", "id": "d", "at": 1.0, "n": 2**70}]
    lines = [_encode(e) for e in entries]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    assert lines[2] == b'{"op":"claim","id":"c","at":NaN}\n'
    path.write_bytes(b"".join(lines))
    last = replay(path)
    assert last["a"] == entries[0] and last["b"] == entries[1] and last["d"] == entries[3]
    assert "c" not in last


def test_settle_reports_each_failed_item_and_keeps_its_active_copy(tmp_path: Path) -> None:
    client, path, record = a_record(tmp_path)
    spool = client.spool
    other = client.create_work(to="b@example.com", subject="t")
    claimed = {p.stem: p.read_bytes() for p in (path, other)}
    for p in (path, other):
        os.rename(p, spool.path("active", p.stem))
    ok = {**decode_record(claimed[other.stem]), "state": "deferred", "attempts": 1}
    gone = {**record, "id": "01000000000000000000-n00000000", "state": "deferred"}
    errors = spool.settle_many([(gone["id"], "deferred", gone, None),
                                (other.stem, "deferred", ok, claimed[other.stem])])
    assert isinstance(errors[0], FileNotFoundError) and errors[1] is None
    assert spool.path("active", path.stem).read_bytes() == claimed[path.stem]  # untouched
    assert not spool.path("active", other.stem).exists()
    moved = spool.path("deferred", other.stem)
    assert Spool(spool.workspace).read(moved) == ok
    assert moved.read_bytes().startswith(claimed[other.stem])  # the same file, appended to
    assert os.listdir(spool.workspace / "tmp") == []


def old_replay(data: bytes) -> dict[str, dict[str, Any]]:
    """The json-only replay (before orjson read the journal)."""
    def reject(name: str) -> Any:
        raise ValueError(name)

    last: dict[str, dict[str, Any]] = {}
    for line in data.splitlines():
        try:
            entry = json.loads(line, parse_constant=reject)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            at = entry.get("at")
            if isinstance(at, float) and not math.isfinite(at):
                continue
            last[entry["id"]] = entry
    return last


_JOURNAL_PIECES = st.sampled_from([
    b'{"op":"claim","id":"a","at":1.5}', b'{"op":"accepted","id":"a","at":2,"code":250}',
    b'{"id":"b","at":NaN}', b'{"id":"b","at":1e400}', b'{"id":"b","n":99999999999999999999}',
    b'{"id":"\\ud800"}', b"\xef\xbb\xbf{\"id\":\"c\"}", b'{"id":"\xff"}', b'{"op":"cla',
    b'{"id":"d","reply":"d\'accord \xe2\x9c\x93"}', b"[1]", b"null", b'{"id":1}', b"",
    b'{"id":"e","x":-0.0,"y":1E5}', b'{"id":"e","id":"f"}'])


@given(st.lists(_JOURNAL_PIECES, max_size=12))
def test_replay_reads_what_the_json_module_read(pieces: list[bytes]) -> None:
    data = b"\n".join(pieces)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "journal.log"
        path.write_bytes(data)
        assert replay(path) == old_replay(data)
