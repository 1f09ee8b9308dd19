"""Validation in create_work: one MessageError naming the field, and nothing written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ess_async import Client, Manager, MessageError
from ess_async.message import build_message, stamp_date

from .conftest import make_config

BASE: dict[str, Any] = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}

BAD: list[tuple[dict[str, Any], str]] = [
    ({"to": None}, "to"),
    ({"to": []}, "to"),
    ({"to": "not-an-address"}, "to"),
    ({"to": "a@"}, "to"),
    ({"to": ["ok@example.com", "bad@@example.com"]}, "to[1]"),
    ({"cc": "two@example.com, three@example.com"}, "cc"),
    ({"bcc": 42}, "bcc"),
    ({"to": "a@exa mple.com"}, "to"),
    ({"from_": "nobody"}, "from"),
    ({"reply_to": "r@"}, "reply_to"),
    ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject"),
    ({"subject": "line\nbreak"}, "subject"),
    ({"subject": "nul\0"}, "subject"),
    ({"to": "a@example.com\r\nX: y"}, "to"),
    ({"headers": {"X-Evil": "a\r\nBcc: b@example.com"}}, "headers.X-Evil"),
    ({"headers": {"Bad Name": "x"}}, "headers"),
    ({"headers": {"Subject": "x"}}, "headers.Subject"),
    ({"headers": ["X-A"]}, "headers"),
    ({"attachments": ["/nonexistent/file.pdf"]}, "attachments[0]"),
    ({"attachments": [("a.txt", "not bytes", "text/plain")]}, "attachments[0]"),
    ({"attachments": [("a.txt", b"x", "textplain")]}, "attachments[0]"),
    ({"attachments": [("a\r\n.txt", b"x", "text/plain")]}, "attachments[0].filename"),
    ({"tags": "one"}, "tags"),
    ({"body": b"bytes"}, "body"),
    ({"priority_typo": 1}, "priority_typo"),
    # Issue 10 item 10: a mimetype may carry parameters, well-formed ones only.
    ({"attachments": [("a.txt", b"x", "text/plain; charset")]}, "attachments[0]"),
    # Issue 10 item 9: the Message-ID domain is configuration ([message]), not per message.
    ({"message_id_domain": "example.com"}, "message_id_domain"),
    ({"headers": {"Sender": "Zoë <@example.com>"}}, "headers.Sender"),
    # Issue 10 item 6: nothing that could make a line of more than 998 octets.
    ({"to": "a@" + "b" * 60 + ("." + "c" * 60) * 4 + ".example"}, "to"),
    ({"headers": {"Message-ID": "<" + "x" * 950 + "@example.com>"}}, "headers.Message-ID"),
]

DATE = "Tue, 01 Dec 2026 10:00:00 +0100"
# Issue 8 item 12: a Date or Message-ID in headers= was a bare ValueError from the email
# package; a given one is checked and replaces the generated one, a bad one is named.
BAD_GENERATED: list[tuple[dict[str, Any], str]] = [
    ({"headers": {"Date": "yesterday"}}, "headers.Date"),
    ({"headers": {"Date": DATE, "date": DATE}}, "headers.date"),
    ({"headers": {"Message-ID": "no-brackets@example.com"}}, "headers.Message-ID"),
    ({"headers": {"Message-ID": "<a@example.com>", "message-id": "<b@example.com>"}},
     "headers.message-id"),
    ({"headers": {"Sender": "a@example.com", "sender": "b@example.com"}}, "headers.sender"),
    ({"headers": {"Resent-Date": "not a date"}}, "headers.Resent-Date"),
    ({"headers": {"Content-Disposition": "inline"}}, "headers.Content-Disposition"),
    ({"headers": {"Content-Language": "en"}}, "headers.Content-Language"),
]
BAD += BAD_GENERATED


@pytest.mark.parametrize(("change", "field"), BAD)
async def test_bad_input_names_field_and_writes_nothing(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    with pytest.raises(MessageError) as info:
        await manager.create_work(**{**BASE, **change})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert isinstance(info.value, ValueError)
    queued = tmp_path / "ws" / "queued"
    assert not queued.exists() or os.listdir(queued) == []
    tmp = tmp_path / "ws" / "tmp"
    assert not tmp.exists() or os.listdir(tmp) == []


def test_client_rejects_the_same_way(tmp_path: Path) -> None:
    client = Client(tmp_path / "ws", config=make_config(25))
    with pytest.raises(MessageError, match=r"^to:"):
        client.create_work(to="bad", subject="x")
    assert not (tmp_path / "ws" / "queued").exists()


def test_no_sender_anywhere(tmp_path: Path) -> None:
    client = Client(tmp_path / "ws")  # no config file: no default sender
    with pytest.raises(MessageError) as info:
        client.create_work(to="a@example.com")
    assert info.value.field == "from"


async def test_from_alias_and_idn(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    path = await manager.create_work(**{"from": "Me <me@example.org>"}, to="x@bücher.example")
    record = Client(tmp_path / "ws").spool.read(path)
    assert record["mail_from"] == "me@example.org"
    assert record["recipients"] == ["x@xn--bcher-kva.example"]


async def test_attachment_path_is_copied_at_enqueue(tmp_path: Path) -> None:
    src = tmp_path / "report.csv"
    src.write_bytes(b"a,b\n1,2\n")
    manager = Manager(tmp_path / "ws", config=make_config(25))
    path = await manager.create_work(**BASE, attachments=[src])
    src.unlink()  # delivery must not need the file any more
    raw = Client(tmp_path / "ws").spool.read(path)["raw"]
    assert 'filename="report.csv"' in raw


async def test_hostile_attachment_filename_keeps_only_basename(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    path = await manager.create_work(**BASE, attachments=[("../../etc/passwd", b"x",
                                                           "text/plain")])
    raw = Client(tmp_path / "ws").spool.read(path)["raw"]
    assert 'filename="passwd"' in raw
    assert "../" not in raw


@pytest.mark.parametrize(("change", "field"), BAD_GENERATED)
def test_bad_generated_header_is_message_error(tmp_path: Path, change: dict[str, Any],
                                               field: str) -> None:
    """Issue 8 item 12: a bad or repeated Date / Message-ID (or another one-per-message
    header) in headers= is a MessageError naming it, not a bare ValueError, and nothing is
    written."""
    with pytest.raises(MessageError) as info:
        Client(tmp_path / "ws", config=make_config(25)).create_work(**{**BASE, **change})
    assert info.value.field == field
    assert not (tmp_path / "ws").exists() or not any(
        p.is_file() for p in (tmp_path / "ws").rglob("*"))


async def test_given_date_and_message_id_replace_generated(tmp_path: Path) -> None:
    """Issue 8 item 12: headers= may give Date and Message-ID; each replaces the generated
    one (the message has exactly one of each)."""
    manager = Manager(tmp_path / "ws", config=make_config(25))
    path = await manager.create_work(**BASE, headers={
        "date": DATE, "Message-ID": "<order-42@shop.example>", "X-Campaign": "spring"})
    record = manager.spool.read(path)
    head = record["raw"].split("\r\n\r\n", 1)[0].split("\r\n")
    assert [h for h in head if h.lower().startswith("date:")] == [f"Date: {DATE}"]
    assert [h for h in head if h.lower().startswith("message-id:")] == [
        "Message-ID: <order-42@shop.example>"]
    assert record["message_id"] == "<order-42@shop.example>"
    assert "X-Campaign: spring" in head


def test_display_name_white_space_is_one_space(tmp_path: Path) -> None:
    """A display name's white space is folding white space, sent as one space: the spool's
    summary says what is sent (hypothesis found '0\\t0' arriving as '0 0')."""
    client = Client(tmp_path / "ws", config=make_config(25))
    path = client.create_work(**{**BASE, "to": '"Ann \t  Lee " <a@example.com>'})
    record = client.spool.read(path)
    assert record["to"] == ["Ann Lee <a@example.com>"]
    assert "To: Ann Lee <a@example.com>\r\n" in record["raw"]


def test_stamp_date_replaces_only_the_date_line() -> None:
    """Issue 10 item 5: stamping the first attempt's Date is a string operation on the
    first line that keeps the message's size; a message without a leading Date (a caller
    gave one elsewhere, an older record) is left as it is."""
    spec = build_message({**BASE, "from_": "s@example.com"})
    raw = spec.raw.decode("ascii")
    assert spec.summary["date_pending"] is True
    assert raw.startswith("Date: ")
    stamped = stamp_date(raw, 1_800_000_000.0)
    assert stamped.startswith("Date: Fri, 15 Jan 2027 08:00:00 +0000\r\n")
    assert len(stamped) == len(raw)
    assert stamped.split("\r\n", 1)[1] == raw.split("\r\n", 1)[1]
    assert stamp_date("From: a@example.com\r\n\r\n", 0.0) == "From: a@example.com\r\n\r\n"
    given = build_message({**BASE, "from_": "s@example.com", "headers": {"Date": DATE}})
    assert "date_pending" not in given.summary
