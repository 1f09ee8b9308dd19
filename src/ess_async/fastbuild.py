"""The MIME body of the common messages written directly (issue 11 item 3): text, text and
HTML, HTML alone, each with or without plain attachments, in the bytes the standard
library's ``email`` (``message.py``'s other path) writes for them, boundaries aside.

Building a message with ``email.message.EmailMessage`` costs most of its time in header
objects, policies and the generator; the bodies' encodings are the same functions here:
``email.quoprimime.body_encode`` for quoted-printable, base64 in lines of 76, and the
standard library's choice among 7bit, quoted-printable and base64 for ASCII text with long
lines. ``fast_mime`` returns None for what it does not cover (then ``message.py`` uses the
standard library): an SMTPUTF8 message, an attachment of a composite type (message/*,
multipart/*), a filename or parameter that would need quoting, encoding (RFC 2231) or
folding, a parameter other than charset.

The property test (tests/test_fastbuild.py) checks that both paths give the same bytes
once the boundaries are set equal, for random inputs.
"""

from __future__ import annotations

import binascii
import random
import re
import sys
from collections.abc import Sequence
from email import quoprimime

from .mime import LINE
from .parts import Attachment

__all__ = ("fast_mime",)

_BOUNDARY_WIDTH = len(repr(sys.maxsize - 1))  # as email.generator makes them
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_FILENAME = re.compile(r"^[A-Za-z0-9_.+-]+(?: [A-Za-z0-9_.+-]+)*$")
_CHARSET = re.compile(r"^[A-Za-z0-9_.-]+$")
_B64_CHUNK = LINE // 4 * 3  # bytes per base64 line of 76


def _boundary() -> str:
    return "=" * 15 + f"{random.randrange(sys.maxsize):0{_BOUNDARY_WIDTH}d}" + "=="


def _base64(data: bytes) -> bytes:
    return b"".join(binascii.b2a_base64(data[i:i + _B64_CHUNK])
                    for i in range(0, len(data), _B64_CHUNK)).replace(b"\n", b"\r\n")


def _qp(data: bytes) -> bytes:
    encoded = quoprimime.body_encode(data.decode("latin-1"), LINE)
    return encoded.replace("\n", "\r\n").encode("ascii")


def _text_body(value: str) -> tuple[str, bytes]:
    """The transfer encoding and body of a text part, as ``message.py`` asks the standard
    library for it (``cte`` None for ASCII, quoted-printable otherwise)."""
    lines = value.encode("utf-8").splitlines()
    if value.isascii():
        if max(map(len, lines), default=0) <= LINE:
            return "7bit", b"\r\n".join(lines) + b"\r\n"
        sniff = b"\r\n".join(lines[:10]) + b"\r\n"
        sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), LINE)
        if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
            return "base64", _base64(b"\r\n".join(lines) + b"\r\n")
        if len(lines) <= 10:
            return "quoted-printable", sniff_qp.replace("\n", "\r\n").encode("ascii")
    return "quoted-printable", _qp(b"\n".join(lines) + b"\n")


def _text_part(value: str, subtype: str, mime_version: bool) -> tuple[bytes, bool]:
    """A text part (headers, blank line, body) and whether its body is 7bit."""
    cte, body = _text_body(value)
    head = (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n")
    if mime_version:
        head += "MIME-Version: 1.0\r\n"
    return head.encode("ascii") + b"\r\n" + body, cte == "7bit"


def _attachment_head(att: Attachment) -> bytes | None:
    if not (_TOKEN.match(att.maintype) and _TOKEN.match(att.subtype)):
        return None
    if att.maintype in ("message", "multipart") or not _FILENAME.match(att.filename):
        return None
    params = ""
    for key, value in att.params.items():
        if key == "charset" and _CHARSET.match(value):
            params += f'; charset="{value}"'
        elif key == "name" and value == att.filename:
            params += f'; name="{value}"'
        else:
            return None
    if not params.endswith(f'; name="{att.filename}"'):
        return None  # the standard library would order the headers otherwise
    disposition = f'Content-Disposition: attachment; filename="{att.filename}"'
    content_type = f"Content-Type: {att.maintype}/{att.subtype}{params}"
    if len(disposition) > LINE or len(content_type) > LINE:
        return None  # folded by the standard library's folder: leave it to it
    return (f"Content-Transfer-Encoding: base64\r\n{disposition}\r\n{content_type}\r\n"
            "MIME-Version: 1.0\r\n\r\n").encode("ascii")


def _multipart(subtype: str, parts: list[bytes], plain: list[bytes],
               mime_version: bool) -> bytes:
    """``parts`` in a multipart/``subtype``; ``plain`` are the 7bit bodies among them,
    which the boundary must not occur in."""
    boundary = _boundary()
    while any(boundary.encode("ascii") in body for body in plain):
        boundary = _boundary()
    mark = ("--" + boundary).encode("ascii")
    head = "MIME-Version: 1.0\r\n" if mime_version else ""
    head += f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n\r\n'
    return (head.encode("ascii") + mark + b"\r\n"
            + (b"\r\n" + mark + b"\r\n").join(parts)
            + b"\r\n" + mark + b"--\r\n")


def fast_mime(text: str, html: str | None,
              attachments: Sequence[Attachment]) -> bytes | None:
    """The MIME headers and body of a message (what follows the headers ``message.py``
    writes itself), or None when this shape is left to the standard library.

    ``text`` is the text part as ``message.py`` settles it (the body, or the text derived
    from ``html``); with ``html`` and an empty ``text`` the message is the HTML alone.
    """
    heads = [_attachment_head(att) for att in attachments]
    if any(head is None for head in heads):
        return None
    top = not attachments  # the first part is the message itself: MIME-Version on it
    plain: list[bytes] = []
    if html is not None and not text:
        first, seven = _text_part(html, "html", top)
        plain += [first] if seven else []
    else:
        first, seven = _text_part(text, "plain", top and html is None)
        plain += [first] if seven else []
        if html is not None:
            alt, seven = _text_part(html, "html", True)
            plain += [alt] if seven else []
            first = _multipart("alternative", [first, alt], plain, top)
    if top:
        return first
    parts = [first]
    for att, head in zip(attachments, heads, strict=True):
        assert head is not None
        parts.append(head + _base64(att.data))
    return _multipart("mixed", parts, plain, True)
