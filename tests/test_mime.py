"""Issue 10: the bytes a real server receives are what mail clients and spam filters expect.

Each test delivers through ``create_work`` to an aiosmtpd server on 127.0.0.1 and checks
the received bytes (``tests/mime_checks.py``), parsed with ``policy.strict``.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from ess_async import ConfigError, Manager
from ess_async.message import build_message
from ess_async.spool import decode_record

from .conftest import FakeClock, Received, SMTPServer, make_config
from .mime_checks import ENCODED_WORD, header_value, parse_strict, wire_problems


async def deliver(tmp_path: Path, server: SMTPServer, **attrs: Any) -> Received:
    """Queue one message, deliver it, return what the server got (checked on the wire)."""
    manager = Manager(tmp_path / "ws", spawn=1, config=make_config(server.port))
    await manager.create_work(**attrs)
    summary = await manager.process_workload()
    assert (summary.passed, summary.failed, summary.deferred) == (1, 0, 0)
    got = server.handler.messages[-1]
    assert wire_problems(got.data) == []
    return got


def encoded_lines(data: bytes, cte: bytes) -> list[bytes]:
    """Body lines of the parts with Content-Transfer-Encoding ``cte``."""
    lines = []
    for part in re.split(rb"\r\n--=+[0-9]+==(?:--)?\r\n", data):
        head, _, body = part.partition(b"\r\n\r\n")
        if re.search(rb"Content-Transfer-Encoding: " + cte, head):
            lines += [line for line in body.split(b"\r\n") if line]
    return lines


async def test_base64_lines_are_76(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 10 item 2: an attachment's base64 lines were 996 characters (RFC 2045: 76;
    SpamAssassin's BASE64_LENGTH_79_INF)."""
    data = bytes(range(256)) * 40
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="b64",
                        attachments=[("blob.bin", data, "application/octet-stream")])
    lines = encoded_lines(got.data, b"base64")
    assert lines and max(map(len, lines)) == 76
    (attachment,) = list(parse_strict(got.data).iter_attachments())
    assert attachment.get_content() == data


async def test_quoted_printable_lines_are_76(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 10 item 3: quoted-printable lines were up to 998 characters (RFC 2045: 76;
    sendmail splits lines over 990 with a '!')."""
    body = "Grüße " * 800 + "\n" + "ü" * 3000 + "\n"
    html = "<p>" + "Hällo wörld, " * 500 + "</p>\n"
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="qp",
                        body=body, html=html)
    lines = encoded_lines(got.data, b"quoted-printable")
    assert lines and max(map(len, lines)) <= 76
    msg = got.message
    assert msg.get_body(("plain",)).get_content() == body
    assert msg.get_body(("html",)).get_content() == html


async def test_headers_are_folded(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 10 item 6: headers were never folded (lines of 996 characters, single
    encoded-words of 652); now header lines are at most 78 and encoded-words 75."""
    subject = "Grüße aus Köln, schöne Tage! " * 10 + "word " * 40
    to = [f"Zoë Ünïcode {i} <user{i}@example.com>" for i in range(40)]
    got = await deliver(tmp_path, smtp_server, to=to, subject=subject.strip(),
                        headers={"X-Long": "plain ascii words " * 30})
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    words = ENCODED_WORD.findall(head)
    assert words and max(map(len, words)) <= 75
    msg = got.message
    assert msg["Subject"] == subject.strip()
    assert [str(a) for a in msg["To"].addresses] == to
    assert msg["X-Long"] == ("plain ascii words " * 30).strip()


INNER_EML = (
    "From: Ann Example <ann@example.org>\n"
    "To: bob@example.com\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"
    "Date: Tue, 01 Dec 2026 10:00:00 +0100\n"
    "Message-ID: <inner-1@example.org>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: multipart/mixed; boundary=\"inner\"\n"
    "\n"
    "--inner\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Hällo wörld, 8-bit text\n"
    "--inner\n"
    "Content-Type: application/octet-stream\n"
    "Content-Transfer-Encoding: base64\n"
    "Content-Disposition: attachment; filename=\"x.bin\"\n"
    "\n"
    "AAEC/w==\n"
    "--inner--\n"
).encode()


def check_inner(attachment: Any) -> None:
    """The attached message arrived whole: headers, text and its own attachment."""
    assert attachment.get_content_type() == "message/rfc822"
    assert attachment["Content-Transfer-Encoding"] in ("7bit", "8bit")
    inner = attachment.get_content()
    assert inner["Subject"] == "Grüße"
    assert inner["Message-ID"] == "<inner-1@example.org>"
    # (the line break before a boundary belongs to the boundary, RFC 2046)
    assert inner.get_body(("plain",)).get_content().rstrip("\r\n") == \
        "Hällo wörld, 8-bit text"
    (blob,) = list(inner.iter_attachments())
    assert blob.get_filename() == "x.bin"
    assert blob.get_content() == b"\x00\x01\x02\xff"


async def test_eml_attachment_is_message_rfc822_not_base64(tmp_path: Path,
                                                           smtp_server: SMTPServer) -> None:
    """Issue 10 item 1: an .eml attachment was sent as message/rfc822 in base64 (RFC 2046
    section 5.2.1 forbids it; parsers returned garbage) and its spooled copy had bare LFs.
    Now it is a 7-bit message/rfc822 part (8-bit inner bodies re-encoded), the spooled
    text is CRLF throughout, and the attachment reads back whole, as a tuple or a path."""
    path = tmp_path / "forwarded.eml"
    path.write_bytes(INNER_EML)
    manager = Manager(tmp_path / "ws", spawn=1, config=make_config(smtp_server.port))
    for attachment in [("fwd.eml", INNER_EML, "message/rfc822"), path]:
        queued = await manager.create_work(to="a@example.com", subject="fwd",
                                           attachments=[attachment])
        raw = manager.spool.read(queued)["raw"].encode("ascii")
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
        assert manager.spool.read(queued)["size"] == len(raw)
    assert (await manager.process_workload()).passed == 2
    for got, name in zip(smtp_server.handler.messages, ["fwd.eml", "forwarded.eml"],
                         strict=True):
        assert wire_problems(got.data) == []
        assert b"message/rfc822" in got.data
        (attachment,) = list(parse_strict(got.data).iter_attachments())
        assert attachment.get_filename() == name
        check_inner(attachment)
        check_inner(next(iter(got.message.iter_attachments())))


async def test_eml_that_is_not_a_message_is_sent_as_bytes(tmp_path: Path,
                                                          smtp_server: SMTPServer) -> None:
    """Issue 10 item 1: what cannot be a clean 7-bit message/rfc822 part (here bytes that
    are no message, and a message with raw 8-bit headers) goes as application/octet-stream,
    byte for byte."""
    junk = bytes(range(256)) * 4
    raw_8bit = "From: a@example.org\nSubject: Grüße\n\nHi\n".encode()
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="junk",
                        attachments=[("junk.eml", junk, "message/rfc822"),
                                     ("raw.eml", raw_8bit, "message/rfc822")])
    attachments = list(got.message.iter_attachments())
    assert [a.get_content_type() for a in attachments] == ["application/octet-stream"] * 2
    assert [a.get_content() for a in attachments] == [junk, raw_8bit]
    assert [a.get_filename() for a in attachments] == ["junk.eml", "raw.eml"]


async def test_html_only_gets_a_derived_text_part(tmp_path: Path,
                                                  smtp_server: SMTPServer) -> None:
    """Issue 10 item 4: html= without body= had an empty text/plain alternative (blank in
    text-only clients, MPART_ALT_DIFF). Now the text part is derived from the HTML."""
    html = ("<html><head><title>T</title><style>p {color: red}</style></head><body>"
            "<h1>Order&nbsp;shipped</h1><p>Hello <b>Zoë</b>,<br>your order is on its way."
            "</p><ul><li>Book</li><li>Pen</li></ul>"
            "<p><a href=\"https://shop.example/track/42\">Track it</a></p>"
            "<script>alert(1)</script></body></html>")
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="html",
                        html=html)
    msg = got.message
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("html",)).get_content().rstrip("\n") == html
    text = msg.get_body(("plain",)).get_content()
    assert text == ("Order shipped\n\nHello Zoë,\nyour order is on its way.\n\n- Book\n"
                    "- Pen\n\nTrack it (https://shop.example/track/42)\n")


async def test_html_without_text_is_sent_alone(tmp_path: Path,
                                               smtp_server: SMTPServer) -> None:
    """Issue 10 item 4: HTML with no text at all (an image) is sent as text/html alone,
    never with an empty text/plain alternative."""
    html = '<img src="https://example.com/banner.png">'
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="img",
                        html=html)
    assert got.message.get_content_type() == "text/html"
    assert got.message.get_content().rstrip("\n") == html


async def test_date_is_the_first_attempt_and_retries_keep_it(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 10 item 5: Date was the enqueue time, so a message sent with send_at a day
    ahead carried a day-old Date (DATE_IN_PAST_24_48). Now it is the time of the first
    delivery attempt, and a retry keeps it (as MTAs do)."""
    clock = FakeClock()
    manager = Manager(tmp_path / "ws", spawn=1, config=make_config(smtp_server.port),
                      clock=clock)
    created = clock.now
    await manager.create_work(to="a@example.com", subject="tomorrow",
                              send_at=datetime.fromtimestamp(created + 86400, UTC))
    clock.advance(86400)
    first = clock.now
    smtp_server.handler.data_replies.append("DROP")  # kept, but the client cannot know
    assert (await manager.process_workload()).deferred == 1
    clock.advance(3600)
    assert (await manager.process_workload()).passed == 1
    dates = [m.message["Date"] for m in smtp_server.handler.messages]
    assert dates == [format_datetime(datetime.fromtimestamp(first, UTC))] * 2
    assert [m.message["Date"].datetime.timestamp() for m in
            smtp_server.handler.messages] == [first, first]
    for got in smtp_server.handler.messages:
        assert wire_problems(got.data) == []
    # The spool's final record holds the text as sent.
    (record,) = [decode_record(p.read_bytes())
                 for p in (tmp_path / "ws" / "passed").rglob("*.json")]
    assert "date_pending" not in record
    assert record["raw"].encode("ascii") == smtp_server.handler.messages[-1].data


async def test_given_date_is_never_replaced(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 10 items 5 and 7: a Date the caller gave is sent as given."""
    date = "Tue, 01 Dec 2026 10:00:00 +0100"
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="dated",
                        headers={"Date": date, "Message-ID": "<order-42@shop.example>"})
    assert header_value(got.data, "Date") == date
    assert header_value(got.data, "Message-ID") == "<order-42@shop.example>"


async def test_obsolete_and_commented_display_names(tmp_path: Path,
                                                    smtp_server: SMTPServer) -> None:
    """Issue 10 item 8: "John Q. Public <jq@example.com>" was refused as malformed (a period
    in an unquoted display name is obsolete, but what people type), and a comment in a
    display name ("Pat (Ops)") was dropped. Both are sent quoted and read back whole."""
    got = await deliver(tmp_path, smtp_server,
                        to=["John Q. Public <jq@example.com>", "Pat (Ops) <pat@example.com>"],
                        subject="names")
    assert header_value(got.data, "To") == \
        '"John Q. Public" <jq@example.com>, "Pat (Ops)" <pat@example.com>'
    assert [(a.display_name, a.addr_spec) for a in got.message["To"].addresses] == [
        ("John Q. Public", "jq@example.com"), ("Pat (Ops)", "pat@example.com")]
    assert sorted(got.rcpt_tos) == ["jq@example.com", "pat@example.com"]


MESSAGE_ID = re.compile(r"^<[0-9a-f]+\.[0-9a-f]{20}@(?P<domain>[^>]+)>$")


async def test_message_id_domain(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 10 item 9: the Message-ID's domain was the sender's (``@localhost`` for a
    local sender) with the process id in it (make_msgid). Now ``[message]
    message_id_domain`` sets it, and it holds time and randomness only."""
    config = make_config(smtp_server.port,
                         message={"message_id_domain": "mail.example.net"})
    manager = Manager(tmp_path / "ws", spawn=1, config=config)
    await manager.create_work(to="a@example.com", subject="id")
    await manager.create_work(to="a@example.com", subject="id2", from_="x@example.org")
    assert (await manager.process_workload()).passed == 2
    ids = [header_value(m.data, "Message-ID") for m in smtp_server.handler.messages]
    for msg_id in ids:
        match = MESSAGE_ID.match(msg_id)
        assert match and match["domain"] == "mail.example.net"
    assert ids[0] != ids[1]
    default = await deliver(tmp_path / "2", smtp_server, to="a@example.com", subject="d",
                            from_="Me <me@Bücher.example>")
    match = MESSAGE_ID.match(header_value(default.data, "Message-ID"))
    assert match and match["domain"] == "xn--bcher-kva.example"


def test_message_id_domain_must_be_a_domain() -> None:
    """Issue 10 item 9: a bad ``message_id_domain`` is a ConfigError naming it."""
    for bad in ("not a domain", "[127.0.0.1]", "-x.example", 42):
        with pytest.raises(ConfigError) as info:
            make_config(25, message={"message_id_domain": bad})
        assert info.value.key == "message.message_id_domain"


def test_localhost_identity_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 item 9: a Message-ID or EHLO name of localhost is penalised by receivers;
    each warns once per process (the library configures no logging)."""
    from ess_async import identity
    from ess_async.message import check_ehlo_name, is_local_name

    identity._warned.clear()
    caplog.set_level(logging.WARNING, logger="ess_async.message")
    for _ in range(3):
        build_message({"to": "a@example.com", "from_": "app@localhost"})
    assert check_ehlo_name("mail.example.com") == "mail.example.com"
    assert check_ehlo_name("localhost.localdomain") == "localhost.localdomain"
    check_ehlo_name("localhost")
    warnings = [r.getMessage() for r in caplog.records if r.name == "ess_async.message"]
    assert len(warnings) == 2
    assert "@localhost" in warnings[0] and "message_id_domain" in warnings[0]
    assert "EHLO" in warnings[1] and "local_hostname" in warnings[1]
    assert is_local_name("[127.0.0.1]") and is_local_name("box.localdomain")
    assert not is_local_name("example.com")
    identity._warned.clear()


async def test_text_attachment_charset_and_name(tmp_path: Path,
                                                smtp_server: SMTPServer) -> None:
    """Issue 10 item 10: text attachments had no charset unless the caller gave one (now
    UTF-8 when the bytes are UTF-8), and no name= on Content-Type (older clients read it)."""
    latin = "Grüße\n".encode("latin-1")
    got = await deliver(tmp_path, smtp_server, to="a@example.com", subject="att",
                        attachments=[("notes.txt", "Grüße ✓\n".encode(), "text/plain"),
                                     ("raw.txt", latin, "text/plain"),
                                     ("l1.csv", latin, "text/csv; charset=iso-8859-1"),
                                     ("Grüße.pdf", b"%PDF", "application/pdf")])
    notes, raw, l1, pdf = got.message.iter_attachments()
    assert notes.get_content_type() == "text/plain"
    assert notes.get_param("charset") == "utf-8"
    assert notes.get_content() == "Grüße ✓\n"
    assert raw.get_param("charset") is None
    assert raw.get_payload(decode=True) == latin
    assert l1.get_param("charset") == "iso-8859-1"
    assert l1.get_content() == "Grüße\n"
    for part, name in [(notes, "notes.txt"), (raw, "raw.txt"), (l1, "l1.csv"),
                       (pdf, "Grüße.pdf")]:
        assert part.get_filename() == name
        assert part["Content-Type"].params["name"] == name
    assert pdf.get_content() == b"%PDF"


async def test_delivery_start_warns_of_a_localhost_ehlo_name(
        tmp_path: Path, smtp_server: SMTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 item 9: starting delivery through SMTP with an EHLO name of localhost
    warns once, naming [transport.smtp] local_hostname."""
    from ess_async import identity

    identity._warned.clear()
    caplog.set_level(logging.WARNING, logger="ess_async")
    config = make_config(smtp_server.port, transport={"smtp": {
        "port": smtp_server.port, "local_hostname": "localhost"}})
    await Manager(tmp_path / "ws", config=config).process_workload()
    assert any("EHLO" in r.getMessage() and "local_hostname" in r.getMessage()
               for r in caplog.records)
    identity._warned.clear()
