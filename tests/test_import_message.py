"""Issue 13 part 2: ``create_work(message=...)`` for a message the caller already built."""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageError
from tests.conftest import SMTPServer, make_config


def _built() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "Ann <ann@example.com>, bob@example.com"
    msg["Cc"] = "carol@example.com"
    msg["Bcc"] = "secret@example.com"
    msg["Subject"] = "Grüße from the shop"
    msg["X-Campaign"] = "spring"
    msg.set_content("Grüße!\nFrom the shop, a line starting with From.\n")
    msg.add_alternative("<p>Grüße!</p>", subtype="html")
    msg.add_attachment(b"\x00\x01binary", maintype="application", subtype="octet-stream",
                       filename="data.bin")
    return msg


def _record(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


async def test_email_message_delivered_as_built(tmp_path: Path,
                                                smtp_server: SMTPServer) -> None:
    """Issue 13 part 2: an EmailMessage goes out with its headers, parts and 8-bit text
    (re-encoded 7-bit); the envelope comes from To, Cc and Bcc; Bcc is not sent."""
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    path = await manager.create_work(message=_built(), tags=["shop"])
    record = _record(path)
    assert record["recipients"] == ["ann@example.com", "bob@example.com", "carol@example.com",
                                    "secret@example.com"]
    assert record["mail_from"] == "shop@example.com"
    assert record["tags"] == ["shop"]
    assert record["subject"] == "Grüße from the shop"
    await manager.process_workload()
    smtp_server.handler.wait_for(1)
    got = smtp_server.handler.messages[0]
    assert got.mail_from == "shop@example.com"
    assert sorted(got.rcpt_tos) == sorted(record["recipients"])  # type: ignore[arg-type]
    assert got.data.isascii()
    assert b"secret@example.com" not in got.data
    msg = got.message
    assert msg["Bcc"] is None
    assert msg["X-Campaign"] == "spring"
    assert msg["Subject"] == "Grüße from the shop"
    assert msg["Date"] and msg["Message-ID"].endswith("@example.com>")
    body = msg.get_body(("plain",))
    assert body is not None
    assert body.get_content() == "Grüße!\nFrom the shop, a line starting with From.\n"
    html = msg.get_body(("html",))
    assert html is not None and html.get_content() == "<p>Grüße!</p>\n"
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "data.bin"
    assert attachment.get_content() == b"\x00\x01binary"


async def test_envelope_arguments_win(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 13 part 2: from_ and to given: the envelope is theirs, the headers stay."""
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    await manager.create_work(message=_built(), from_="bounces@example.com",
                              to=["only@example.com"])
    await manager.process_workload()
    smtp_server.handler.wait_for(1)
    got = smtp_server.handler.messages[0]
    assert (got.mail_from, got.rcpt_tos) == ("bounces@example.com", ["only@example.com"])
    assert got.message["To"] == "Ann <ann@example.com>, bob@example.com"
    assert got.message["From"] == "Shop <shop@example.com>"
    assert got.message["Bcc"] is None


def test_raw_bytes_kept_byte_for_byte(tmp_path: Path) -> None:
    """Issue 13 part 2: raw bytes (LF line ends) with Date and Message-ID: headers kept as
    written (folding too), Bcc removed, CRLF line ends; nothing generated."""
    raw = (b"Date: Mon, 30 Nov 2026 15:59:42 +0000\n"
           b"Message-ID: <abc.1@example.org>\n"
           b"From: ops@example.org\n"
           b"To: a@example.com,\n  b@example.com\n"
           b"Bcc: hidden@example.com\n"
           b"Subject: disk\n  full\n"
           b"\n"
           b"The disk is full.\n")
    client = Client(tmp_path / "ws", config=make_config(2525))
    record = _record(client.create_work(message=raw))
    assert record["recipients"] == ["a@example.com", "b@example.com", "hidden@example.com"]
    assert record["raw"] == (
        "Date: Mon, 30 Nov 2026 15:59:42 +0000\r\nMessage-ID: <abc.1@example.org>\r\n"
        "From: ops@example.org\r\nTo: a@example.com,\r\n  b@example.com\r\n"
        "Subject: disk\r\n  full\r\n\r\nThe disk is full.\r\n")
    assert "date_pending" not in record
    assert record["message_id"] == "<abc.1@example.org>"


def test_missing_from_date_message_id_added(tmp_path: Path) -> None:
    """Issue 13 part 2: From (the config's [message] from), Date (stamped at the first
    attempt) and Message-ID are added when missing; a compat32 Message works."""
    msg = MIMEText("hello")
    msg["To"] = "a@example.com"
    msg["Subject"] = "hi"
    client = Client(tmp_path / "ws", config=make_config(2525))
    record = _record(client.create_work(message=msg))
    raw = str(record["raw"])
    assert raw.startswith("Date: ")
    assert "\r\nFrom: sender@example.com\r\n" in raw
    assert "\r\nMessage-ID: <" in raw and str(record["message_id"]).endswith("@example.com>")
    assert record["date_pending"] is True
    assert record["mail_from"] == "sender@example.com"


def test_raw_utf8_headers(tmp_path: Path) -> None:
    """Issue 13 part 2: raw UTF-8 headers (RFC 6532, as PHP's mail() writes them) are
    rewritten in 7 bits where they can be (Subject in encoded-words, display names); a
    UTF-8 mailbox keeps them raw and makes an SMTPUTF8 message; Latin-1 bytes in a
    header are a MessageError."""
    client = Client(tmp_path / "ws", config=make_config(2525))
    raw = "To: Jörg <j@example.com>\nSubject: Grüße\nX-Note: ok\n\nhi\n".encode()
    record = _record(client.create_work(message=raw))
    assert record["smtputf8"] is False
    text = str(record["raw"])
    assert text.isascii() and "\r\nX-Note: ok\r\n" in text
    assert record["subject"] == "Grüße" and record["to"] == ["Jörg <j@example.com>"]
    parsed = message_from_bytes(text.encode().replace(b"\r\n", b"\n"), policy=policy.default)
    assert (parsed["Subject"], parsed["To"]) == ("Grüße", "Jörg <j@example.com>")
    utf8 = _record(client.create_work(message="To: jörg@example.com\nSubject: Grüße\n\nhi\n"
                                      .encode()))
    assert utf8["smtputf8"] is True and utf8["recipients"] == ["jörg@example.com"]
    with pytest.raises(MessageError) as info:
        client.create_work(message="To: a@example.com\nSubject: Grüße\n\nhi\n".encode("latin-1"))
    assert info.value.field == "headers.Subject"


@pytest.mark.parametrize(("message", "kwargs", "field"), [
    (b"To: a@example.com, bad@@example.com\r\n\r\nhi\r\n", {}, "to[1]"),
    (b"Subject: none\r\n\r\nhi\r\n", {}, "to"),
    (b"To: a@example.com\r\n\r\nhi\r\n", {"to": "nope"}, "to"),
    (b"To: a@example.com\r\nDate: yesterday\r\n\r\nhi\r\n", {}, "headers.Date"),
    (b"To: a@example.com\r\nMessage-ID: 42\r\n\r\nhi\r\n", {}, "headers.Message-ID"),
    (b"To: a@example.com\r\nSubject: a\r\nSubject: b\r\n\r\nhi\r\n", {}, "headers.Subject"),
    (b"To: a@example.com\r\nX-Bad: a\x00b\r\n\r\nhi\r\n", {}, "headers.X-Bad"),
    (b"not a header\r\n\r\nhi\r\n", {}, "message"),
    (b"", {}, "message"),
    (b"To: a@example.com\r\n\r\nhi\r\n", {"subject": "x"}, "subject"),
    ("To: a@example.com\r\n\r\nhi\r\n", {}, "message"),
])
def test_invalid_messages(tmp_path: Path, message: object, kwargs: dict[str, object],
                          field: str) -> None:
    """Issue 13 part 2: the same validation as for attributes: MessageError naming the
    field, and nothing is written."""
    client = Client(tmp_path / "ws", config=make_config(2525))
    with pytest.raises(MessageError) as info:
        client.create_work(message=message, **kwargs)
    assert info.value.field == field
    assert sum(client.spool.counts().values()) == 0


def test_header_injection_in_message_object(tmp_path: Path) -> None:
    """Issue 13 part 2: a compat32 Message whose header value holds CR/LF (an injected
    header) is a MessageError; folding (a line break before white space) is fine."""
    client = Client(tmp_path / "ws", config=make_config(2525))
    msg = Message()
    msg["To"] = "a@example.com"
    msg["Subject"] = "hi\r\nBcc: victim@example.com"
    msg.set_payload("hello")
    with pytest.raises(MessageError) as info:
        client.create_work(message=msg)
    assert info.value.field == "headers.Subject"
    folded = Message()
    folded["To"] = "a@example.com"
    folded["Subject"] = "a long\r\n subject"
    folded.set_payload("hello")
    record = _record(client.create_work(message=folded))
    assert record["recipients"] == ["a@example.com"]
