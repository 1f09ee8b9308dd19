"""Validate the attributes of a message and build it with the standard library's ``email``.

Everything a message needs at send time (envelope, rendered MIME text, attachments'
contents) is produced here, at ``create_work`` time, so delivery never reads user files.
"""

from __future__ import annotations

import functools
import mimetypes
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import policy
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import Address, BaseHeader, DateHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parsedate_to_datetime
from pathlib import Path
from typing import Any

from .errors import MessageError

__all__ = ("MESSAGE_FIELDS", "MessageSpec", "build_message", "parse_address")

#: Keyword arguments ``create_work`` accepts (``from`` is accepted as an alias of ``from_``).
MESSAGE_FIELDS = frozenset(
    {"to", "cc", "bcc", "from_", "reply_to", "subject", "body", "html", "headers",
     "attachments", "tags"}
)
# Headers that attributes own; setting them through ``headers`` would be ambiguous. So are
# all Content-* headers: they describe the MIME structure built here (and would be lost).
_RESERVED_HEADERS = frozenset(
    {"to", "cc", "bcc", "from", "reply-to", "subject", "mime-version"}
)
# Generated unless ``headers`` gives them (then theirs replaces ours, once checked).
_GENERATED_HEADERS = ("date", "message-id")
_MSG_ID = re.compile(r"^<[!-;=?A-~]+@[!-;=?A-~]+>$")  # RFC 5322 msg-id, no folding
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
_BLANKS = re.compile(r"[ \t]+")
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# In a header value: control characters (tab aside), line and paragraph separators and
# lone surrogates could split the header or fail to encode. In a body: NUL and surrogates.
_HEADER_BAD = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_BODY_BAD = re.compile("[\x00\ud800-\udfff]")


class _HeaderClasses(HeaderRegistry):
    """The stdlib registry builds a new class for every header it parses (a third of the
    time spent building a message); the class for a given name never changes, so keep it."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


_HEADERS = _HeaderClasses()
_RENDER_POLICY = policy.SMTP.clone(max_line_length=998, header_factory=_HEADERS)
# For UTF-8 mailboxes (RFC 6531): headers stay raw UTF-8; the server must offer SMTPUTF8.
_RENDER_POLICY_UTF8 = policy.SMTPUTF8.clone(max_line_length=998, header_factory=_HEADERS)
MAX_HEADER_VALUE = 4000


@dataclass(frozen=True)
class MessageSpec:
    """A validated message, ready to be spooled."""

    mail_from: str
    recipients: list[str]
    raw: bytes
    summary: dict[str, Any] = field(default_factory=dict)
    smtputf8: bool = False  # a UTF-8 mailbox: raw is UTF-8 and needs an SMTPUTF8 server


def _check_text(name: str, value: object, *, header: bool) -> str:
    if not isinstance(value, str):
        raise MessageError(name, f"must be a string, not {type(value).__name__}")
    bad = (_HEADER_BAD if header else _BODY_BAD).search(value)
    if bad:
        raise MessageError(name, f"must not contain {bad.group()!r}")
    if header:
        if len(value) > MAX_HEADER_VALUE:
            raise MessageError(name, f"is longer than {MAX_HEADER_VALUE} characters")
        return value.strip()  # folding would drop surrounding white space anyway
    return value


def _ascii_domain(domain: str) -> str:
    """The domain in ASCII (IDNA), or ValueError."""
    if domain.startswith("[") and domain.endswith("]"):
        return domain  # address literal, e.g. [127.0.0.1]
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise ValueError(f"invalid domain {domain!r}") from None
    labels = ascii_domain.rstrip(".").split(".")
    if not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid domain {domain!r}")
    return ascii_domain


def parse_address(name: str, value: object) -> Address:
    """Parse one mailbox (``a@b.example`` or ``Name <a@b.example>``) or raise MessageError."""
    text = _check_text(name, value, header=True).strip()
    parsed = _parse_mailbox(text)
    if isinstance(parsed, str):
        raise MessageError(name, parsed)
    return parsed


@functools.lru_cache(maxsize=4096)
def _parse_mailbox(text: str) -> Address | str:
    """The mailbox in ``text``, or what is wrong with it (cached: senders and recipients
    repeat, and the header parser is the slowest part of building a message)."""
    if not text:
        return "empty address"
    try:
        parsed: Any = _HEADERS("to", text)
        addresses = parsed.addresses
        defects = parsed.defects
    except Exception:  # the parser raises assorted errors on garbage
        return f"malformed address {text!r}"
    # A UTF-8 local part is allowed (sent with SMTPUTF8); every other defect is not.
    if len(addresses) != 1 or any(not isinstance(d, NonASCIILocalPartDefect)
                                  for d in defects):
        return f"malformed address {text!r} (give one address per item)"
    addr = addresses[0]
    if not addr.username or not addr.domain or " " in addr.addr_spec:
        return f"malformed address {text!r}"
    if not addr.username.isascii() and (addr.username.startswith('"') or any(
            ch in addr.username for ch in " ,<>()[]\\")):
        return f"malformed UTF-8 local part in {text!r}"
    try:
        domain = _ascii_domain(addr.domain)
    except ValueError as exc:
        return str(exc)
    # White space in a display name is folding white space: it is sent (and read back) as
    # one space, so keep it that way in the spool's summary too.
    display = _BLANKS.sub(" ", addr.display_name).strip(" \t")
    return Address(display_name=display, username=addr.username, domain=domain)


def _address_header(name: str, addresses: list[Address]) -> Any:
    return _parsed_header(name, ", ".join(str(a) for a in addresses))


@functools.lru_cache(maxsize=1024)
def _parsed_header(name: str, value: str) -> Any:
    """A ready header object: EmailMessage stores it as is instead of parsing it again."""
    return _HEADERS(name, value)


def _address_list(name: str, value: object) -> list[Address]:
    if value is None:
        return []
    if isinstance(value, str):
        items: list[object] = [value]
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        items = list(value)
    else:
        raise MessageError(name, "must be an address or a list of addresses")
    return [parse_address(f"{name}[{i}]" if len(items) > 1 else name, v)
            for i, v in enumerate(items)]


def _attachment(index: int, item: object) -> tuple[str, bytes, str]:
    name = f"attachments[{index}]"
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MessageError(name, f"cannot read {str(path)!r}: {exc.strerror}") from None
        filename = path.name
        mimetype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    elif isinstance(item, tuple | list) and len(item) == 3:
        filename, data, mimetype = item
        if not isinstance(data, bytes | bytearray):
            raise MessageError(name, "content must be bytes")
        data = bytes(data)
    else:
        raise MessageError(name, "must be a file path or a (filename, bytes, mimetype) tuple")
    filename = _check_text(f"{name}.filename", filename, header=True)
    # A filename is a hint for the recipient, never a path: keep only its last component.
    filename = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if not filename or filename in {".", ".."}:
        raise MessageError(name, "empty filename")
    mimetype = _check_text(f"{name}.mimetype", mimetype, header=True)
    if mimetype.count("/") != 1 or not all(mimetype.split("/")):
        raise MessageError(name, f"invalid mimetype {mimetype!r}")
    return filename, data, mimetype


def _headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MessageError("headers", "must be a mapping of header name to value")
    result: dict[str, str] = {}
    seen: set[str] = set()
    for key, val in value.items():
        if not isinstance(key, str) or not _HEADER_NAME.match(key):
            raise MessageError("headers", f"invalid header name {key!r}")
        lower = key.lower()
        if lower in _RESERVED_HEADERS:
            raise MessageError(f"headers.{key}", "set through its own attribute instead")
        if lower.startswith("content-"):
            raise MessageError(f"headers.{key}", "Content-* headers describe the MIME "
                               "structure, which body, html and attachments set")
        text = _check_text(f"headers.{key}", val, header=True)
        cls = _HEADERS[key]
        if getattr(cls, "max_count", None) == 1 and lower in seen:
            raise MessageError(f"headers.{key}", "given twice (a message has one at most)")
        seen.add(lower)
        if issubclass(cls, DateHeader):
            try:
                parsedate_to_datetime(text)
            except (TypeError, ValueError):
                raise MessageError(f"headers.{key}", f"not an RFC 5322 date: {text!r} "
                                   "(e.g. 'Mon, 30 Nov 2026 15:59:42 +0000')") from None
        if lower == "message-id" and not _MSG_ID.match(text):
            raise MessageError(f"headers.{key}", f"not a message id <left@right>: {text!r}")
        result[key] = text
    return result


def _tags(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise MessageError("tags", "must be a list of strings")
    return [_check_text("tags", t, header=True) for t in value]


def _cte(text: str) -> str | None:
    return None if text.isascii() else "quoted-printable"


def build_message(attrs: Mapping[str, Any],
                  defaults: Mapping[str, Any] | None = None) -> MessageSpec:
    """Validate ``attrs`` (``defaults`` merged under them) and render the message.

    Raises MessageError naming the first bad field; performs no writes.
    """
    merged: dict[str, Any] = dict(defaults or {})
    for key, value in attrs.items():
        key = "from_" if key == "from" else key
        if key not in MESSAGE_FIELDS:
            raise MessageError(key, "unknown message attribute")
        if value is not None:
            merged[key] = value

    to = _address_list("to", merged.get("to"))
    cc = _address_list("cc", merged.get("cc"))
    bcc = _address_list("bcc", merged.get("bcc"))
    if not (to or cc or bcc):
        raise MessageError("to", "no recipient (give to, cc or bcc)")
    if merged.get("from_") is None:
        raise MessageError("from", "no sender (give from_ or set [message] from in config)")
    sender = parse_address("from", merged["from_"])
    reply_to = _address_list("reply_to", merged.get("reply_to"))
    subject = _check_text("subject", merged.get("subject", ""), header=True)
    body = merged.get("body")
    html = merged.get("html")
    if body is not None:
        _check_text("body", body, header=False)
    if html is not None:
        _check_text("html", html, header=False)
    headers = _headers(merged.get("headers"))
    attachments = [_attachment(i, a) for i, a in enumerate(merged.get("attachments") or [])]
    tags = _tags(merged.get("tags"))

    utf8 = not all(a.username.isascii() for a in [sender, *to, *cc, *bcc, *reply_to])
    render = _RENDER_POLICY_UTF8 if utf8 else _RENDER_POLICY
    msg = EmailMessage(policy=render)
    msg["From"] = _address_header("From", [sender])
    for header, addresses in (("To", to), ("Cc", cc), ("Reply-To", reply_to)):
        if addresses:
            msg[header] = _address_header(header, addresses)
    msg["Subject"] = subject
    given = {key.lower(): val for key, val in headers.items()
             if key.lower() in _GENERATED_HEADERS}
    msg["Date"] = given.get("date") or _parsed_header(
        "Date", formatdate(localtime=False, usegmt=True))
    msg["Message-ID"] = given.get("message-id") or make_msgid(domain=sender.domain)
    for key, val in headers.items():
        if key.lower() not in _GENERATED_HEADERS:
            msg[key] = val
    # 7-bit transfer encodings keep the spooled text ASCII and need no 8BITMIME from the server.
    text = body if body is not None else ""
    msg.set_content(text, cte=_cte(text))
    if html is not None:
        msg.add_alternative(html, subtype="html", cte=_cte(html))
    for filename, data, mimetype in attachments:
        maintype, subtype = mimetype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    try:
        raw = msg.as_bytes(policy=render)
    except (ValueError, TypeError) as exc:  # e.g. a header the policy cannot fold
        raise MessageError("headers", f"cannot render message: {exc}") from None

    recipients = list(dict.fromkeys(a.addr_spec for a in [*to, *cc, *bcc]))
    summary = {
        "to": [str(a) for a in to],
        "cc": [str(a) for a in cc],
        "bcc_count": len(bcc),
        "subject": subject,
        "message_id": msg["Message-ID"],
        "tags": tags,
        "size": len(raw),
    }
    return MessageSpec(mail_from=sender.addr_spec, recipients=recipients, raw=raw,
                       summary=summary, smtputf8=utf8)
