"""Spool records that must be refused when read (quarantined as corrupt), and times that
must be refused when enqueued."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageError
from ess_async.spool import CorruptRecord

from .conftest import make_config

BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", str(10**400)]


def spooled_record(tmp_path: Path, **attrs: object) -> tuple[Client, Path, str]:
    """A real record written by ``create_work``: its client, path and JSON text."""
    client = Client(tmp_path / "ws", config=make_config(25))
    path = client.create_work(**{"to": "a@example.com", "subject": "s", **attrs})
    return client, path, path.read_text()


def rewrite(path: Path, text: str, old: str, new: str) -> None:
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("number", BAD_NUMBERS, ids=[*BAD_NUMBERS[:-1], "10**400"])
def test_non_finite_next_attempt_at_is_corrupt(tmp_path: Path, number: str) -> None:
    """Issue 8 item 8: a NaN, an infinity, 1e400 (read as inf) or an int no float can hold
    as a record's next_attempt_at is a corrupt record (quarantined), not a timer that is
    never due and spins the loop."""
    client, path, text = spooled_record(tmp_path)
    rewrite(path, text, '"next_attempt_at":null', f'"next_attempt_at":{number}')
    with pytest.raises(CorruptRecord) as caught:
        client.spool.read(path)
    assert "next_attempt_at" in caught.value.reason or "non-finite" in caught.value.reason


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_number_anywhere_is_corrupt(tmp_path: Path, number: str) -> None:
    """Issue 8 item 8: a non-finite number in any part of a record (here an extra key
    nothing reads) makes the record corrupt."""
    client, path, text = spooled_record(tmp_path)
    rewrite(path, text, '"attempts":0', f'"attempts":0,"extra":[1.5,{{"x":{number}}}]')
    with pytest.raises(CorruptRecord, match="non-finite"):
        client.spool.read(path)


@pytest.mark.parametrize(("key", "value"), [
    ("created_at", "null"), ("created_at", "true"), ("created_at", '"1"'),
    ("send_at", "false"), ("next_attempt_at", '"soon"'), ("created_at", str(10**400)),
], ids=["null", "true", "string", "false", "soon", "10**400"])
def test_malformed_times_are_corrupt(tmp_path: Path, key: str, value: str) -> None:
    """Issue 8 item 8: every time in a record is null (where optional) or a finite number,
    never a bool or a string."""
    client, path, text = spooled_record(tmp_path)
    start = text.index(f'"{key}":') + len(key) + 3
    end = min(i for i in (text.find(",", start), text.find("}", start)) if i >= 0)
    path.write_text(text[:start] + value + text[end:])
    with pytest.raises(CorruptRecord, match=f"malformed key '{key}'"):
        client.spool.read(path)


def test_finite_times_still_read(tmp_path: Path) -> None:
    """Issue 8 item 8 (guard): ordinary times, integer or float, still read."""
    client, path, text = spooled_record(tmp_path)
    rewrite(path, text, '"next_attempt_at":null', '"next_attempt_at":1800000000')
    assert client.spool.read(path)["next_attempt_at"] == 1800000000
    rewrite(path, path.read_text(), '"next_attempt_at":1800000000',
            '"next_attempt_at":1.8e9,"finished_at":-1.5,"held_at":null')
    assert client.spool.read(path)["next_attempt_at"] == 1.8e9


@pytest.mark.parametrize("send_at", [math.nan, math.inf, -math.inf, 10**400, 1e308 * 10,
                                     -(10**400)],
                         ids=["nan", "inf", "-inf", "10**400", "1e308*10", "-10**400"])
def test_non_finite_send_at_is_refused(tmp_path: Path, send_at: object) -> None:
    """Issue 8 item 8: create_work(send_at=nan | inf | 10**400) is a MessageError naming
    send_at, and nothing is written."""
    ws = tmp_path / "ws"
    with pytest.raises(MessageError) as caught:
        Client(ws, config=make_config(25)).create_work(to="a@example.com", send_at=send_at)
    assert caught.value.field == "send_at"
    assert not ws.exists() or not any(p.is_file() for p in ws.rglob("*"))


async def test_non_finite_send_at_is_refused_async(tmp_path: Path) -> None:
    """Issue 8 item 8: the same through Manager.create_work; a datetime still works."""
    ws = tmp_path / "ws"
    manager = Manager(ws, config=make_config(25))
    with pytest.raises(MessageError) as caught:
        await manager.create_work(to="a@example.com", send_at=math.nan)
    assert caught.value.field == "send_at"
    assert not ws.exists() or not any(p.is_file() for p in ws.rglob("*"))
    later = datetime(2100, 1, 1, tzinfo=UTC)
    path = await manager.create_work(to="a@example.com", send_at=later)
    assert path.parent.name == "scheduled"


@pytest.mark.parametrize("key", ["recipients", "mail_from"])
def test_non_ascii_address_needs_smtputf8(tmp_path: Path, key: str) -> None:
    """Issue 8 item 9: a record whose address is not ASCII must say smtputf8; one that does
    not is corrupt (read before MAIL FROM, not failing inside the SMTP transaction)."""
    attrs: dict[str, object] = ({"to": "jürgen@example.com"} if key == "recipients"
                                else {"from_": "jürgen@example.com"})
    client, path, text = spooled_record(tmp_path, **attrs)
    assert client.spool.read(path)["smtputf8"] is True  # as written: fine
    rewrite(path, text, '"smtputf8":true', '"smtputf8":false')
    with pytest.raises(CorruptRecord, match=f"malformed key '{key}': non-ASCII"):
        client.spool.read(path)
    rewrite(path, text, '"smtputf8":true', '"smtputf8":null')
    with pytest.raises(CorruptRecord, match=f"malformed key '{key}'"):
        client.spool.read(path)
