"""Issue 11 item 3: the fast message builder (``fastbuild``) gives what the standard
library's ``email`` gives (``build_message(..., fast=False)``), for random inputs: the same
bytes once Date, Message-ID and the boundaries are set aside, and, parsed back with
``policy.default``, the same headers, structure and decoded contents; the shapes it does
not cover go to the standard library.
"""

from __future__ import annotations

import os
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ess_async import MessageError
from ess_async import message as message_module
from ess_async.message import MessageSpec, build_message

from .mime_checks import wire_problems
from .test_mime_matrix import MATRIX

_BOUNDARY = re.compile(rb'boundary="([^"]+)"')
# Cases of the matrix the fast path writes (the others go to the standard library).
FAST_CASES = {"plain", "names", "long-name", "subject-300-ascii", "subject-300-unicode",
              "subject-unbreakable", "lines-5000", "binary", "empty-attachment",
              "html-only", "html-no-text", "html-and-text", "recipients-500", "headers"}


def normalised(raw: bytes) -> bytes:
    """``raw`` with its Date and Message-ID values and its boundaries replaced by fixed
    text (boundaries numbered in order of appearance)."""
    for n, boundary in enumerate(dict.fromkeys(_BOUNDARY.findall(raw))):
        raw = raw.replace(boundary, b"=BOUNDARY-%d=" % n)
    raw = re.sub(rb"(?m)^Date: [^\r]*", b"Date: -", raw, count=1)
    return re.sub(rb"(?m)^Message-ID: [^\r]*", b"Message-ID: -", raw, count=1)


def tree(msg: EmailMessage) -> Any:
    """Headers (boundary aside), content type and parameters, and decoded content or
    sub-parts of ``msg``, as comparable values."""
    boundary = msg.get_boundary()
    headers = []
    for name, value in msg.items():
        if name.lower() in ("date", "message-id"):
            continue
        text = str(value)
        if boundary:
            text = text.replace(boundary, "B")
        headers.append((name.lower(), text))
    params = {k: v for k, v in msg["content-type"].params.items() if k != "boundary"} \
        if "content-type" in msg else {}
    if msg.is_multipart():
        content: Any = [tree(part) for part in msg.iter_parts()]  # type: ignore[arg-type]
    else:
        content = msg.get_payload(decode=True)
        if msg.get_content_maintype() == "text":
            content = (content, msg.get_content())
    return headers, msg.get_content_type(), params, msg.get_filename(), content


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def both(attrs: dict[str, Any]) -> tuple[MessageSpec, MessageSpec] | None:
    """The message by both paths, or None when both refuse it alike."""
    try:
        slow = build_message(attrs, fast=False)
    except MessageError as exc:
        with pytest.raises(MessageError) as info:
            build_message(attrs)
        assert (info.value.field, str(info.value)) == (exc.field, str(exc))
        return None
    return build_message(attrs), slow


def assert_same(fast: MessageSpec, slow: MessageSpec) -> None:
    assert normalised(fast.raw) == normalised(slow.raw)
    assert tree(parse(fast.raw)) == tree(parse(slow.raw))
    assert (fast.mail_from, fast.recipients, fast.smtputf8) == \
        (slow.mail_from, slow.recipients, slow.smtputf8)
    assert {**fast.summary, "message_id": ""} == {**slow.summary, "message_id": ""}
    assert wire_problems(fast.raw, smtputf8=fast.smtputf8) == []


_SPECIAL = st.sampled_from(["\r", "\n", "\r\n", "\n\n", "\t", " ", "=", ".", "-", "--",
                            "\x0b", "\x0c", "\x85", "\u2028", "é", "😀", "ü", "\x1c",
                            "From ", "=?utf-8?q?x?=", "<p>", "</p>", "<br>", "&amp;"])
_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_LONG = st.builds(lambda piece, n: piece * n,
                  st.sampled_from(["x", "é", "= ", " ", "ab ", "\t", "😀", "a\r\n", ".\n"]),
                  st.integers(1, 1200))
_BODY = st.lists(st.one_of(st.text(_CHARS, max_size=20), _SPECIAL, _LONG),
                 max_size=8).map("".join)
_NAME = st.text(st.sampled_from("abcXYZ éüÅ李😀 .,\"'()-"), max_size=30)
_HEADER_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
_WORDS = st.text(st.one_of(st.sampled_from("ab cd É 你好 😀 =?\t"), _HEADER_CHARS),
                 max_size=120)
_FILENAME = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.+-]{1,20}( [A-Za-z0-9_.+-]{1,10})?\.[a-z]{1,4}",
                  fullmatch=True),
    st.text(_HEADER_CHARS, min_size=1, max_size=90))
_MIMETYPE = st.sampled_from(["application/octet-stream", "text/plain", "text/csv",
                             "text/plain; charset=iso-8859-1", "image/png",
                             "application/json; charset=utf-8", "text/html; format=flowed",
                             "message/rfc822", "multipart/mixed", "Application/PDF"])
_ATTACHMENT = st.tuples(_FILENAME, st.one_of(st.binary(max_size=400),
                                             _BODY.map(lambda s: s.encode("utf-8"))),
                        _MIMETYPE)


def _mailbox(name: str, n: int) -> str:
    if not name.strip():
        return f"u{n}@example.com"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <u{n}@example.com>'


# FASTBUILD_EXAMPLES=5000 for a longer search.
@settings(max_examples=int(os.environ.get("FASTBUILD_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(_NAME, min_size=1, max_size=4), sender=_NAME, subject=_WORDS,
       body=st.one_of(st.none(), _BODY), html=st.one_of(st.none(), _BODY),
       attachments=st.lists(_ATTACHMENT, max_size=3), header=_WORDS)
@example(names=["Zoë"], sender="", subject="Grüße", body="Hello\r\nWorld\r",
         html=None, attachments=[], header="")
@example(names=[""], sender="", subject="", body=None, html="<p>x</p>" * 30,
         attachments=[("a.txt", b"", "text/plain")], header="")
def test_fast_path_equals_the_standard_library(names: list[str], sender: str, subject: str,
                                               body: str | None, html: str | None,
                                               attachments: list[Any], header: str) -> None:
    """Issue 11 item 3: for random names, subjects, bodies (CR/LF, long lines, non-ASCII),
    HTML and attachments, the fast path's bytes equal the standard library's (Date,
    Message-ID and boundaries aside), parse back to the same headers, structure and
    decoded content, and pass wire_problems."""
    attrs: dict[str, Any] = {
        "to": [_mailbox(n, i) for i, n in enumerate(names)],
        "from_": _mailbox(sender, 99), "subject": subject, "body": body, "html": html,
        "attachments": attachments, "headers": {"X-Words": header} if header else None,
    }
    with mock.patch.object(message_module, "_stdlib_message",
                           wraps=message_module._stdlib_message) as spy:
        built = both(attrs)
    if built is not None:
        event("standard library" if spy.call_count > 1 else "fast path")
        assert_same(*built)


@pytest.mark.parametrize("case", list(MATRIX))
def test_matrix_cases_equal_and_routed(case: str) -> None:
    """Issue 11 item 3: every case of the MIME matrix gives the same message by both paths,
    and the covered shapes (text, text + HTML, HTML alone, plain attachments) never touch
    the standard library's message classes on the fast path."""
    attrs = {"from_": "s@example.com", **MATRIX[case]}
    built = both(attrs)
    assert built is not None
    assert_same(*built)
    with mock.patch.object(message_module, "_stdlib_message",
                           wraps=message_module._stdlib_message) as spy:
        build_message(attrs)
    assert spy.called == (case not in FAST_CASES)


@pytest.mark.parametrize("attachment", [
    ("Ünïcode.txt", b"x", "text/plain"),  # RFC 2231 filename
    ("fwd.eml", b"Subject: x\r\n\r\nbody\r\n", "message/rfc822"),
    ("a.txt", b"x", "text/plain; format=flowed"),  # a parameter other than charset
    ('quote".txt', b"x", "text/plain"),
    ("x" * 70 + ".bin", b"x", "application/octet-stream"),  # a folded header
])
def test_uncovered_attachments_go_to_the_standard_library(
        attachment: tuple[str, bytes, str]) -> None:
    """Issue 11 item 3: attachments the fast path does not write (encoded or quoted
    filenames, message/*, other parameters, folded headers) are the standard library's,
    with the same result."""
    attrs = {"to": "a@example.com", "from_": "s@example.com", "body": "hi",
             "attachments": [attachment]}
    with mock.patch.object(message_module, "_stdlib_message",
                           wraps=message_module._stdlib_message) as spy:
        fast = build_message(attrs)
    assert spy.called
    assert_same(fast, build_message(attrs, fast=False))


def test_smtputf8_goes_to_the_standard_library() -> None:
    """Issue 11 item 3: a UTF-8 mailbox (SMTPUTF8) is rendered by the standard library."""
    attrs = {"to": "用户@例子.example", "from_": "s@example.com", "body": "hi"}
    with mock.patch.object(message_module, "_stdlib_message",
                           wraps=message_module._stdlib_message) as spy:
        fast = build_message(attrs)
    assert spy.called and fast.smtputf8
    assert_same(fast, build_message(attrs, fast=False))


def test_boundary_never_in_a_7bit_body() -> None:
    """Issue 11 item 3: a 7bit body holding the boundary the fast path first drew makes it
    draw another (as the standard library's generator does)."""
    first = "=" * 15 + "1" * 19 + "=="
    attrs = {"to": "a@example.com", "from_": "s@example.com", "body": f"--{first}\n",
             "html": f"<p>--{first}--</p>"}
    draws = iter([1111111111111111111, 2222222222222222222])
    with mock.patch("ess_async.fastbuild.random.randrange", lambda _n: next(draws)):
        spec = build_message(attrs)
    assert b'boundary="===============2222222222222222222=="' in spec.raw
    assert tree(parse(spec.raw)) == tree(parse(build_message(attrs, fast=False).raw))
