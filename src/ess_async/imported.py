"""Enqueue a message the caller already built: ``create_work(message=...)``.

``message`` is an ``email.message.EmailMessage`` / ``Message`` (Django's included) or raw
RFC 5322 bytes. Its headers are kept as they are (byte for byte) but for:

- ``Bcc``, which is removed (its recipients are on the envelope only);
- ``From``, ``Date`` and ``Message-ID``, added when missing (From: the ``from_`` argument,
  else ``[message] from``; Date: the first delivery attempt, as for other messages;
  Message-ID: ``[message] message_id_domain``, else the sender's domain).

The envelope: ``from_`` when given, else the From header (its Sender when From has more
than one mailbox), else ``[message] from``; recipients: ``to``/``cc``/``bcc`` when any is
given, else the To, Cc and Bcc headers. Other message attributes (subject, body, ...) are
a MessageError: the message carries them. Bodies in 8 bits (or with lines over 998
octets) are re-encoded in quoted-printable (text) or base64, so the spooled message is
7-bit. Headers in raw UTF-8 (RFC 6532) are rewritten in RFC 2047 encoded-words where
they can be (unstructured ones, display names); a UTF-8 mailbox keeps them raw and makes
it an SMTPUTF8 message.

The same validation as for ``create_work``'s attributes applies: CR, LF or another
control character in a header value, a malformed address (``to[1]: malformed address``),
no recipient, a bad Date or Message-ID raise MessageError naming the field.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from email._header_value_parser import get_address_list
from email.generator import BytesGenerator
from email.headerregistry import Address
from email.message import Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

from .errors import MessageError
from .identity import format_date, new_message_id
from .message import (
    _HEADER_BAD,
    _HEADER_NAME,
    _MSG_ID,
    _RENDER_POLICY,
    _RENDER_POLICY_UTF8,
    MessageSpec,
    _address_list,
    _message_id_domain,
    _tags,
    parse_address,
)
from .mime import address_header, unstructured_header
from .parts import crlf, seven_bit_leaf

__all__ = ("ENVELOPE_FIELDS", "import_message")

#: Keyword arguments that may accompany ``message=`` (``from`` is an alias of ``from_``).
ENVELOPE_FIELDS = frozenset({"from_", "to", "cc", "bcc", "tags"})
_ONCE = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc", "subject", "date",
                   "message-id", "in-reply-to", "references", "mime-version"})
_ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc")
# Headers with a syntax of their own: never rewritten as unstructured text.
_STRUCTURED = frozenset({"date", "message-id", "in-reply-to", "references", "received",
                         "return-path", "mime-version", "resent-date", "resent-message-id",
                         "dkim-signature", "list-id", "list-unsubscribe", "authentication-results"})
_FOLD = re.compile(r"\r\n(?=[ \t])")
_MAX_LINE = 998


def _serialize(message: Message) -> bytes:
    """A Message object as bytes, after checking its header values for line breaks that
    would start a new header (an injection); folding (a break before white space) is fine."""
    for name, value in message.raw_items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise MessageError("headers", f"invalid header name {name!r}")
        if isinstance(value, str):
            unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
            bad = _HEADER_BAD.search(unfolded.replace("\t", " "))
            if bad and not ("\ud800" <= bad.group() <= "\udfff"):
                raise MessageError(f"headers.{name}", f"must not contain {bad.group()!r}")
    out = io.BytesIO()
    try:
        policy = message.policy.clone(linesep="\r\n")
        BytesGenerator(out, mangle_from_=False, policy=policy).flatten(message)
    except Exception as exc:  # the generator refuses what it cannot write
        raise MessageError("message", f"cannot serialize the message: {exc}") from None
    return out.getvalue()


def _split(data: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields (name, field bytes with CRLFs) and the body of CRLF-normalized data."""
    if data.startswith(b"\r\n") or not data:
        raise MessageError("message", "no headers")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:  # headers only, no body
        head, body = data.removesuffix(b"\r\n"), b""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, previous = fields[-1]
            fields[-1] = (name, previous + line + b"\r\n")
            continue
        name_bytes, colon, _ = line.partition(b":")
        name = name_bytes.decode("latin-1")
        if not colon or not _HEADER_NAME.match(name):
            raise MessageError("message", f"malformed header line {line[:60]!r}")
        fields.append((name, line + b"\r\n"))
    return fields, body


def _value(name: str, field: bytes) -> str:
    """The unfolded value of a header field, checked."""
    if len(max(field.split(b"\r\n"), key=len)) > _MAX_LINE:
        raise MessageError(f"headers.{name}", f"a line is longer than {_MAX_LINE} octets")
    try:
        text = field.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"headers.{name}", "8-bit bytes that are not UTF-8") from None
    value = _FOLD.sub("", text[len(name) + 1:].removesuffix("\r\n"))
    bad = _HEADER_BAD.search(value)
    if bad:
        raise MessageError(f"headers.{name}", f"must not contain {bad.group()!r}")
    return value.strip(" \t")


def _seven_bit_header(name: str, value: str, field: bytes) -> bytes:
    """A header written in raw UTF-8 (RFC 6532), rewritten in 7 bits when it can be: an
    unstructured one (Subject, X-...) in RFC 2047 encoded-words, an address list with
    ASCII mailboxes with its display names encoded. Others stay UTF-8 (then the message
    needs SMTPUTF8)."""
    lower = name.lower()
    if lower in _ADDRESS_HEADERS and lower != "bcc":
        addresses = _addresses(lower, value)
        groups = any(token[0].token_type == "group"
                     for token in get_address_list(value)[0].addresses)
        if addresses and not groups and all(a.username.isascii() for a in addresses):
            return address_header(name, addresses).encode("ascii")
        return field
    if lower.startswith("content-") or lower in _STRUCTURED:
        return field
    return unstructured_header(name, value).encode("ascii")


def _addresses(name: str, value: str) -> list[Address]:
    """Each mailbox of an address-list header (groups flattened), validated."""
    try:
        parsed, rest = get_address_list(value) if value else (None, "")
    except Exception:
        raise MessageError(name, f"malformed address list {value[:60]!r}") from None
    if rest.strip():
        raise MessageError(name, f"malformed address list {value[:60]!r}")
    texts = [str(mailbox).strip() for address in (parsed.addresses if parsed else [])
             for mailbox in address.all_mailboxes]
    return [parse_address(f"{name}[{i}]" if len(texts) > 1 else name, text)
            for i, text in enumerate(texts)]


def _needs_7bit(body: bytes) -> bool:
    return not body.isascii() or any(len(line) > _MAX_LINE for line in body.split(b"\r\n"))


def _seven_bit(data: bytes, utf8: bool) -> bytes:
    """``data`` with every 8-bit (or over-long) body re-encoded: text in quoted-printable,
    the rest in base64; composite parts then declare 7bit."""
    render = _RENDER_POLICY_UTF8 if utf8 else _RENDER_POLICY
    msg = BytesParser(policy=render).parsebytes(data)
    for part in msg.walk():
        cte = str(part.get("content-transfer-encoding", "7bit")).strip().lower()
        if part.is_multipart():
            if cte in ("8bit", "binary"):
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        seven_bit_leaf(part)
    try:
        return crlf(msg.as_bytes(policy=render))
    except Exception as exc:
        raise MessageError("message", f"cannot re-encode the message: {exc}") from None


def import_message(message: object, attrs: Mapping[str, Any],
                   defaults: Mapping[str, Any] | None = None, *, now: float) -> MessageSpec:
    """Validate ``message`` (with the envelope ``attrs``) and render the spooled copy.

    ``defaults`` is ``[message]`` from the config: its ``from`` (when the message has no
    From and no ``from_`` is given), ``tags`` and ``message_id_domain`` are used.
    """
    given: dict[str, Any] = {}
    for key, value in attrs.items():
        key = "from_" if key == "from" else key
        if key not in ENVELOPE_FIELDS:
            raise MessageError(key, "not allowed with message= (the message has its own; "
                               "only from_, to, cc, bcc and tags may be given)")
        if value is not None:
            given[key] = value
    defaults = defaults or {}

    if isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)
    elif isinstance(message, Message):
        data = _serialize(message)
    else:
        raise MessageError("message", "must be an email.message.EmailMessage, a Message or "
                           f"bytes, not {type(message).__name__}")
    fields, body = _split(crlf(data))

    values: dict[str, list[str]] = {}
    for index, (name, field) in enumerate(fields):
        lower = name.lower()
        value = _value(name, field)
        if not field.isascii():
            fields[index] = (name, _seven_bit_header(name, value, field))
        if lower in _ONCE and lower in values:
            raise MessageError(f"headers.{name}", "given twice (a message has one at most)")
        values.setdefault(lower, []).append(value)
        if lower == "date":
            try:
                parsedate_to_datetime(value)
            except (TypeError, ValueError):
                raise MessageError(f"headers.{name}", f"not an RFC 5322 date: {value!r} "
                                   "(e.g. 'Mon, 30 Nov 2026 15:59:42 +0000')") from None
        if lower == "message-id" and (not _MSG_ID.match(value) or len(value) > 900):
            raise MessageError(f"headers.{name}", f"not a message id <left@right>: {value!r}")
    header_addresses = {name: _addresses(name, values[name][0])
                        for name in _ADDRESS_HEADERS if name in values}
    utf8 = not all(field.isascii() for name, field in fields if name.lower() != "bcc")

    if any(k in given for k in ("to", "cc", "bcc")):
        to, cc, bcc = (_address_list(k, given.get(k)) for k in ("to", "cc", "bcc"))
    else:
        to, cc, bcc = (header_addresses.get(k, []) for k in ("to", "cc", "bcc"))
    recipients = list(dict.fromkeys(a.addr_spec for a in [*to, *cc, *bcc]))
    if not recipients:
        raise MessageError("to", "no recipient (give to=, cc= or bcc=, or To, Cc or Bcc "
                           "headers)")

    from_header = header_addresses.get("from", [])
    if "from_" in given:
        sender = parse_address("from", given["from_"])
    elif len(from_header) == 1:
        sender = from_header[0]
    elif len(from_header) > 1 and len(header_addresses.get("sender", [])) == 1:
        sender = header_addresses["sender"][0]
    elif not from_header and defaults.get("from_") is not None:
        sender = parse_address("from", defaults["from_"])
    else:
        raise MessageError("from", "no sender (give from_, a From header or set [message] "
                           "from in config)" if not from_header else
                           "several From mailboxes and no single Sender: give from_")
    utf8 = utf8 or not all(a.username.isascii() for a in [sender, *to, *cc, *bcc])

    added: list[str] = []
    if "date" not in values:
        added.append(f"Date: {format_date(now)}\r\n")  # first: stamp_date sets it later
    if not from_header:
        added.append(address_header("From", [sender]))
    message_id = values.get("message-id", [""])[0]
    if not message_id:
        domain = _message_id_domain(defaults.get("message_id_domain"), sender)
        message_id = new_message_id(domain)
        added.append(f"Message-ID: {message_id}\r\n")
    kept = b"".join(field for name, field in fields if name.lower() != "bcc")
    head = "".join(added).encode("utf-8") + kept
    raw = head + b"\r\n" + body
    if _needs_7bit(body):
        raw = _seven_bit(raw, utf8)
        if _needs_7bit(raw.partition(b"\r\n\r\n")[2]):
            raise MessageError("message", "a body could not be re-encoded in 7 bits")
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError("message", "8-bit bytes that are not UTF-8") from None
        utf8 = True

    tags = _tags(given.get("tags", defaults.get("tags")))
    subject = values.get("subject", [""])[0]
    summary: dict[str, Any] = {
        "to": [str(a) for a in header_addresses.get("to", [])],
        "cc": [str(a) for a in header_addresses.get("cc", [])],
        "bcc_count": len(bcc),
        "subject": _decoded(subject),
        "message_id": message_id,
        "tags": tags,
        "size": len(raw),
    }
    if "date" not in values:
        summary["date_pending"] = True
    return MessageSpec(mail_from=sender.addr_spec, recipients=recipients, raw=raw,
                       summary=summary, smtputf8=utf8)


def _decoded(subject: str) -> str:
    """A Subject as people read it (RFC 2047 encoded-words decoded)."""
    if "=?" not in subject:
        return subject
    try:
        return str(_RENDER_POLICY.header_factory("subject", subject))
    except Exception:
        return subject
