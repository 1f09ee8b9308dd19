"""Attachments in the MIME tree, including an .eml attached as a message (RFC 2046 allows
message/rfc822 only in 7bit, 8bit or binary, never base64).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from email import policy, quoprimime
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import EmailPolicy

from .mime import LINE

__all__ = ("Attachment", "add_attachment", "attached_message", "crlf", "seven_bit_leaf")


@dataclass(frozen=True)
class Attachment:
    """A validated attachment."""

    filename: str
    data: bytes
    maintype: str
    subtype: str
    params: dict[str, str]


def _clean(raw: bytes) -> bool:
    """Whether ``raw`` (an attached message, as it would be sent) is fit to send as a
    7bit message/rfc822 part: ASCII, lines <= 998, no defect for policy.strict, no encoded
    composite part. (Raw UTF-8 headers, even in a message sent with SMTPUTF8, are not:
    they would need message/global.)"""
    if not raw.isascii() or max(map(len, raw.split(b"\r\n"))) > 998:
        return False
    try:
        msg = BytesParser(policy=policy.strict).parsebytes(raw)
        for part in msg.walk():
            cte = str(part.get("content-transfer-encoding", "7bit")).lower()
            composite = part.is_multipart()
            if part.defects or (composite and cte not in ("7bit", "8bit", "binary")):
                return False
            if any(getattr(v, "defects", ()) for v in part.values()):
                return False
    except Exception:  # strict parsing raises the first defect
        return False
    return True


def seven_bit_leaf(part: Message) -> None:
    """Make one leaf part 7-bit: a body with 8-bit octets or lines over 998 octets is
    re-encoded (text in quoted-printable, so its lines stay lines; the rest in base64);
    an 8bit or binary label on a body that is already 7-bit becomes 7bit."""
    payload = part.get_payload()
    if not isinstance(payload, str):
        return
    cte = str(part.get("content-transfer-encoding", "7bit")).strip().lower()
    if not payload.isascii() or max(map(len, payload.splitlines()), default=0) > 998:
        body = part.get_payload(decode=True)
        assert isinstance(body, bytes)
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            part.set_payload(quoprimime.body_encode(body.decode("latin-1"), LINE))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(base64.encodebytes(body).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
    elif cte in ("8bit", "binary"):
        part.replace_header("Content-Transfer-Encoding", "7bit")


def attached_message(data: bytes, render: EmailPolicy[EmailMessage]) -> EmailMessage | None:
    """``data`` (an .eml) as the message of a message/rfc822 part, which RFC 2046 allows
    only in 7bit, 8bit or binary: bodies with 8-bit octets or over-long lines are
    re-encoded (text in quoted-printable, the rest in base64). None when it still is not
    a clean 7-bit message (then it is sent as application/octet-stream)."""
    try:
        inner = BytesParser(policy=render).parsebytes(data)
        if not inner.keys() or inner.defects:
            return None
        for part in inner.walk():
            if not part.is_multipart():
                seven_bit_leaf(part)
        raw = inner.as_bytes(policy=render)
        if not _clean(raw):
            return None
        result = BytesParser(policy=render).parsebytes(raw)
    except Exception:  # anything the parser or generator cannot take: send the bytes
        return None
    assert isinstance(result, EmailMessage)
    return result


def add_attachment(msg: EmailMessage, att: Attachment,
                   render: EmailPolicy[EmailMessage]) -> None:
    """Add ``att`` to ``msg``: in base64, but an .eml as a message/rfc822 part."""
    maintype, subtype, params = att.maintype, att.subtype, dict(att.params)
    if maintype == "message" and subtype == "rfc822":
        inner = attached_message(att.data, render)
        if inner is not None:
            msg.add_attachment(inner, cte="7bit", filename=att.filename,
                               params={"name": att.filename})
            return
    if maintype == "multipart" or (maintype == "message" and subtype != "global"):
        # A composite type cannot be base64 (RFC 2046): send the bytes as they are.
        maintype, subtype = "application", "octet-stream"
        params = {"name": att.filename}
    msg.add_attachment(att.data, maintype=maintype, subtype=subtype, filename=att.filename,
                       params=params)


def crlf(raw: bytes) -> bytes:
    """Every line ending CRLF (the email package keeps an attached message's own)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return raw
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
