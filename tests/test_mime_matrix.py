"""Issue 10, "Done when": a matrix of messages delivered to a real SMTP server, each checked
on the bytes received (``mime_checks.wire_problems``: line lengths in base64 and
quoted-printable bodies, header folding, encoded-words <= 75, CRLF, 7-bit,
``policy.strict`` without defects) and read back equal to what was queued.

``BUILDERS`` lists whatever builds messages; a new builder (the fast one of the
performance issue) is added there and must pass the same checks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from email import message_from_string, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from ess_async import Manager
from ess_async.message import MessageSpec, build_message

from .conftest import SMTPServer, make_config
from .mime_checks import display_name, wire_problems

BUILDERS: dict[str, Callable[[dict[str, Any]], MessageSpec]] = {
    "email.message": lambda attrs: build_message(attrs, fast=False),
    # Issue 11 item 3: the fast builder (it hands what it does not cover to email.message).
    "fastbuild": lambda attrs: build_message(attrs),
}

_rand = random.Random(10)
BINARY = bytes(_rand.randrange(256) for _ in range(5000))
BIG = _rand.randbytes(10 * 1024 * 1024)
EML = (b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>\r\nTo: b@example.com\r\n"
       b"Subject: inner\r\nMessage-ID: <in@example.org>\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
       + "Grüße aus dem Anhang\r\n".encode() * 3)
NAMES = ["Zoë Ångström", "李小龙", "محمد علي", "Émile 😀 Zola", "Doe, Jürgen",
         'Ann "The Hammer" Lee', "John Q. Public", "Ñandú Åsa Øre Ærø", "Pat (Ops)"]
LONG_NAME = "Maximilian Alexander von Gröbenstein-Lüdenscheidt zu Äußersthausen 🏰"
WORDS = "Grüße aus Köln, schöne Tage! Ça va? 你好，世界。 مرحبا بالعالم 😀 "  # noqa: RUF001
EMPTY_HTML = '<img src="https://example.com/banner.png">'

MATRIX: dict[str, dict[str, Any]] = {
    "plain": {"to": "a@example.com", "subject": "Hi", "body": "Hello\n"},
    "names": {"to": [f"{n} <u{i}@example.com>" if "," not in n and '"' not in n else
                     f'"{n.replace(chr(34), chr(92) + chr(34))}" <u{i}@example.com>'
                     for i, n in enumerate(NAMES)],
              "cc": "Ünïcode Çc <cc@example.com>", "reply_to": "Rëply <r@example.com>",
              "from_": "Zoë Sender <sender@example.com>", "subject": WORDS.strip(),
              "body": WORDS * 3},
    "long-name": {"to": f"{LONG_NAME} <long@example.com>", "subject": "long name"},
    "subject-300-ascii": {"to": "a@example.com", "subject": ("word " * 60).strip()},
    "subject-300-unicode": {"to": "a@example.com", "subject": (WORDS * 6)[:300].strip()},
    "subject-unbreakable": {"to": "a@example.com", "subject": "x" * 300},
    "lines-5000": {"to": "a@example.com", "subject": "long lines",
                   "body": "x" * 5000 + "\n" + "ü" * 5000 + "\n" + ("word " * 1000) + "\n",
                   "html": "<p>" + "y" * 5000 + "</p>\n" + "<p>" + "é" * 5000 + "</p>\n"},
    "binary": {"to": "a@example.com", "subject": "bin",
               "attachments": [("data.bin", BINARY, "application/octet-stream")]},
    "text-attachments": {"to": "a@example.com", "subject": "text",
                         "attachments": [("notes.txt", (WORDS * 50).encode(), "text/plain"),
                                         ("Ünïcödé fïlé nàmé " * 6 + ".csv",
                                          b"a,b\r\n1,2\r\n", "text/csv")]},
    "eml": {"to": "a@example.com", "subject": "fwd",
            "attachments": [("forward.eml", EML, "message/rfc822")]},
    "empty-attachment": {"to": "a@example.com", "subject": "empty",
                         "attachments": [("empty.dat", b"", "application/octet-stream")]},
    "html-only": {"to": "a@example.com", "subject": "html",
                  "html": f"<h1>Hällo</h1><p>{WORDS}</p><ul><li>one</li><li>two</li></ul>"},
    "html-no-text": {"to": "a@example.com", "subject": "img", "html": EMPTY_HTML},
    "html-and-text": {"to": "a@example.com", "subject": "both", "body": WORDS,
                      "html": f"<p>{WORDS}</p>"},
    "recipients-500": {"to": [f"User Nümber {i} <user{i}@example.com>" for i in range(250)],
                       "cc": [f"cc{i}@example.com" for i in range(200)],
                       "bcc": [f"bcc{i}@example.com" for i in range(50)],
                       "subject": "many"},
    "headers": {"to": "a@example.com", "subject": "hdr",
                "headers": {"X-Long": "ascii words " * 40, "X-Unicode": WORDS * 4,
                            "X-Looks-Encoded": "=?utf-8?q?not_encoded?= really",
                            "List-Unsubscribe": "<https://example.com/u/" + "z" * 100 + ">"}},
    "smtputf8": {"to": "用户 <用户@例子.example>", "subject": WORDS, "body": WORDS},
}
BIG_CASE = {"to": "a@example.com", "subject": "10 MB",
            "attachments": [("big.bin", BIG, "application/octet-stream")]}


def _expected_text(attrs: dict[str, Any]) -> str | None:
    body = attrs.get("body")
    return None if body is None else body.replace("\r\n", "\n")


def check_received(case: str, attrs: dict[str, Any], data: bytes, msg: EmailMessage) -> None:
    """``data`` (as received) is well-formed and reads back as ``attrs``."""
    assert wire_problems(data, smtputf8=case == "smtputf8") == [], case
    assert msg["Subject"] == attrs.get("subject", "").strip()
    to = attrs["to"] if isinstance(attrs["to"], list) else [attrs["to"]]
    assert [a.addr_spec for a in msg["To"].addresses] == [
        t.rsplit("<", 1)[-1].rstrip(">").replace("例子.example", "xn--fsqu00a.example")
        for t in to]
    if len(to) == 1 and "<" in to[0]:
        assert display_name(data) == to[0].rsplit("<", 1)[0].strip().strip('"')
    elif case == "names":
        got = [a.display_name for a in msg["To"].addresses]
        assert got == NAMES
    # The Message-ID's random hex may end in "bcc0" (1 in 65,536): look past it.
    outside_id = data.replace(str(msg["Message-ID"]).encode(), b"")
    assert "bcc" not in {k.lower() for k in msg} and b"bcc0@" not in outside_id
    text = _expected_text(attrs)
    html = attrs.get("html")
    if html == EMPTY_HTML:
        assert msg.get_content_type() == "text/html"
    elif text is not None or html is not None:
        plain = msg.get_body(("plain",))
        assert plain is not None and plain.get_content().strip()
        if text is not None:
            assert plain.get_content().rstrip("\n") == text.rstrip("\n")
    if html is not None:
        html_part = msg.get_body(("html",))
        assert html_part is not None
        assert html_part.get_content().rstrip("\n") == html.rstrip("\n")
    for (filename, content, mimetype), part in zip(
            attrs.get("attachments", []), msg.iter_attachments(), strict=True):
        assert part.get_filename() == filename
        if mimetype == "message/rfc822":
            assert part.get_content_type() == "message/rfc822"
            inner = part.get_content()
            assert inner["Message-ID"] == "<in@example.org>"
            assert inner["From"].addresses[0].display_name == "Jürgen"
            assert inner.get_content() == "Grüße aus dem Anhang\n" * 3
        else:
            assert part.get_payload(decode=True) == content
    for key, value in attrs.get("headers", {}).items():
        assert msg[key] == value.strip()


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("case", list(MATRIX))
def test_builder_output_passes_the_checks(builder: str, case: str) -> None:
    """Every builder's bytes pass the wire checks before any server sees them."""
    spec = BUILDERS[builder]({"from_": "s@example.com", **MATRIX[case]})
    assert wire_problems(spec.raw, smtputf8=spec.smtputf8) == []


async def test_matrix_delivered_to_a_real_server(tmp_path: Path,
                                                 smtp_server: SMTPServer) -> None:
    """Issue 10, Done when: the whole matrix, and a 10 MB attachment, delivered to aiosmtpd
    and checked on the bytes it received."""
    manager = Manager(tmp_path / "ws", spawn=2, config=make_config(smtp_server.port))
    cases = {**MATRIX, "big": BIG_CASE}
    for case, attrs in cases.items():
        await manager.create_work(**{**attrs, "headers": {**attrs.get("headers", {}),
                                                          "X-Case": case}})
    summary = await manager.process_workload()
    assert (summary.passed, summary.failed, summary.deferred) == (len(cases), 0, 0)
    received = {m.message["X-Case"]: m for m in smtp_server.handler.messages}
    assert set(received) == set(cases)
    for case, attrs in cases.items():
        got = received[case]
        msg = got.message
        if case == "smtputf8":  # UTF-8 headers (RFC 6532): read as text
            msg = message_from_string(got.data.decode().replace("\r\n", "\n"),
                                      policy=policy.default)
        check_received(case, {**attrs, "headers": {**attrs.get("headers", {}),
                                                    "X-Case": case}}, got.data, msg)
    assert len(received["recipients-500"].rcpt_tos) == 500
    assert received["smtputf8"].rcpt_tos == ["用户@xn--fsqu00a.example"]
