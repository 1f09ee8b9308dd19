"""Validate the attributes of a message and build it: headers by ``mime`` (the standard
library's folder mangles white space around encoded-words), bodies and attachments by
``fastbuild`` for the common shapes (the same bytes, 2.5-8x less CPU) and by the standard
library's ``email`` for the rest.

Everything a message needs at send time (envelope, rendered MIME text, attachments'
contents) is produced here, at ``create_work`` time, so delivery never reads user files.
The one exception is the Date of a message whose caller gave none: it is the time of the
first delivery attempt, stamped into the spooled text by ``stamp_date``.
"""

from __future__ import annotations

import functools
import mimetypes
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import policy
from email.errors import NonASCIILocalPartDefect, ObsoleteHeaderDefect
from email.headerregistry import Address, AddressHeader, BaseHeader, DateHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from .errors import MessageError
from .fastbuild import fast_mime
from .htmltext import html_to_text
from .identity import check_ehlo_name, format_date, is_local_name, new_message_id, stamp_date
from .mime import LINE, address_header, unstructured_header
from .parts import Attachment, add_attachment, crlf

__all__ = ("MESSAGE_FIELDS", "MessageSpec", "build_message", "check_ehlo_name", "format_date",
           "is_local_name", "parse_address", "stamp_date")

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
# Bodies and the Content-* headers of MIME parts. Lines of 76: the email package writes
# base64 and quoted-printable bodies in lines of at most max_line_length (RFC 2045 allows
# 76), and folds the Content-* headers it writes there. (max_line_length=998 was set
# before, probably to keep the email package from folding headers, which it does wrongly
# around encoded-words: it made base64 and quoted-printable lines of 996 and 998.) The
# message's own headers are written by ``mime``. refold_source="none": the headers of an
# attached message are kept as they are, never refolded.
_RENDER_POLICY = policy.SMTP.clone(max_line_length=LINE, header_factory=_HEADERS,
                                   refold_source="none")
# For UTF-8 mailboxes (RFC 6531): addresses stay raw UTF-8; the server must offer SMTPUTF8.
_RENDER_POLICY_UTF8 = _RENDER_POLICY.clone(utf8=True)
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
    # A UTF-8 local part is allowed (sent with SMTPUTF8), and so is a period in an unquoted
    # display name ("John Q. Public <jq@example.com>": obsolete, but what people type; it
    # is sent quoted); every other defect is not.
    if len(addresses) != 1 or any(not _tolerated(d) for d in defects):
        return f"malformed address {text!r} (give one address per item)"
    addr = addresses[0]
    if not addr.username or not addr.domain or " " in addr.addr_spec:
        return f"malformed address {text!r}"
    if len(addr.addr_spec) > 254:  # RFC 5321 section 4.5.3.1.3 (a path of 256 with <>)
        return f"address longer than 254 characters: {text[:40]!r}..."
    if not addr.username.isascii() and (addr.username.startswith('"') or any(
            ch in addr.username for ch in " ,<>()[]\\")):
        return f"malformed UTF-8 local part in {text!r}"
    try:
        domain = _ascii_domain(addr.domain)
    except ValueError as exc:
        return str(exc)
    # White space in a display name is folding white space: it is sent (and read back) as
    # one space, so keep it that way in the spool's summary too.
    display = _BLANKS.sub(" ", _display_name(parsed) or addr.display_name).strip(" \t")
    return Address(display_name=display, username=addr.username, domain=domain)


def _tolerated(defect: Exception) -> bool:
    return isinstance(defect, NonASCIILocalPartDefect) or (
        isinstance(defect, ObsoleteHeaderDefect) and str(defect).startswith("period in"))


def _display_name(parsed: Any) -> str | None:
    """The display name with its comments ("Pat (Ops)"), which the email package drops, or
    None when it has none (then the email package's display name is right)."""
    found: list[Any] = []

    def walk(token: Any, inside: bool) -> None:
        kind = getattr(token, "token_type", "")
        if kind == "comment" and inside:
            found.append(token)
        if isinstance(token, list) and kind != "angle-addr":
            for child in token:
                walk(child, inside or kind == "display-name")

    tree = getattr(parsed, "_parse_tree", None)
    walk(tree, False)
    if not found:
        return None
    names: list[str] = []

    def text(token: Any, comment: bool = False) -> str:
        kind = getattr(token, "token_type", "")
        if kind == "comment":
            return "(" + "".join(text(t, True) for t in token) + ")"
        if kind == "bare-quoted-string":
            return "".join(str(t) for t in token)
        if isinstance(token, list):
            return "".join(text(t, comment) for t in token)
        return str(token) if comment else str(getattr(token, "value", token))

    def collect(token: Any) -> None:
        if getattr(token, "token_type", "") == "display-name":
            names.append(text(token))
        elif isinstance(token, list):
            for child in token:
                collect(child)

    collect(tree)
    return names[0] if len(names) == 1 else None


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


def _attachment(index: int, item: object) -> Attachment:
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
    filename = filename.replace("\\", "/").rsplit("/", 1)[-1].strip(" \t")
    if not filename or filename in {".", ".."}:
        raise MessageError(name, "empty filename")
    mimetype = _check_text(f"{name}.mimetype", mimetype, header=True)
    # "type/subtype", optionally with parameters: "text/csv; charset=iso-8859-1".
    kind, _, _ = mimetype.partition(";")
    parsed: Any = _HEADERS("content-type", mimetype)
    if kind.strip().count("/") != 1 or not all(kind.strip().split("/")) or parsed.defects:
        raise MessageError(name, f"invalid mimetype {mimetype!r}")
    params = {k.lower(): v for k, v in parsed.params.items()
              if k.lower() not in ("name", "boundary")}
    if parsed.maintype == "text" and "charset" not in params:
        # Say what the bytes are when they are UTF-8 (ASCII included); else leave it open.
        try:
            data.decode("utf-8")
            params["charset"] = "utf-8"
        except UnicodeDecodeError:
            pass
    params["name"] = filename  # older clients read the name from Content-Type
    return Attachment(filename, data, parsed.maintype, parsed.subtype, params)


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
        if lower == "message-id" and len(text) > 900:  # one line, within 998 octets
            raise MessageError(f"headers.{key}", "longer than 900 characters")
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


def _message_id_domain(value: object, sender: Address) -> str:
    if value is None or value == "":
        return sender.domain.rstrip(".")
    text = _check_text("message_id_domain", value, header=True)
    try:
        domain = _ascii_domain(text)
    except ValueError as exc:
        raise MessageError("message_id_domain", str(exc)) from None
    if domain.startswith("["):
        raise MessageError("message_id_domain", f"must be a domain name, not {text!r}")
    return domain.rstrip(".")


def _custom_header(key: str, value: str) -> str:
    """The header line(s) of a ``headers=`` item."""
    cls = _HEADERS[key]
    if issubclass(cls, AddressHeader) and not value.isascii():
        parsed: Any = _HEADERS(key, value)
        addresses = list(parsed.addresses)
        if parsed.defects or not addresses or any(g.display_name for g in parsed.groups):
            raise MessageError(f"headers.{key}", f"malformed address list {value!r}")
        return address_header(key, [_parse_mailbox_or_raise(f"headers.{key}", a)
                                    for a in addresses])
    return unstructured_header(key, value)


def _parse_mailbox_or_raise(name: str, address: Address) -> Address:
    return parse_address(name, str(address))


def _stdlib_message(text: str, html: str | None, attachments: list[Attachment],
                    render: Any) -> EmailMessage:
    """The MIME headers and body by the standard library's ``email`` (to render)."""
    msg = EmailMessage(policy=render)
    if html is not None and not text:
        msg.set_content(html, subtype="html", cte=_cte(html))
    else:
        msg.set_content(text, cte=_cte(text))
        if html is not None:
            msg.add_alternative(html, subtype="html", cte=_cte(html))
    for attachment in attachments:
        add_attachment(msg, attachment, render)
    return msg


def build_message(attrs: Mapping[str, Any],
                  defaults: Mapping[str, Any] | None = None, *,
                  fast: bool = True) -> MessageSpec:
    """Validate ``attrs`` (``defaults`` merged under them) and render the message.

    ``defaults`` may also hold ``message_id_domain`` (``[message]`` in the config).
    Raises MessageError naming the first bad field; performs no writes. The common shapes
    are written by ``fastbuild`` (the same bytes, boundaries aside) unless ``fast`` is
    False; the rest by the standard library's ``email``.
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
    id_domain = _message_id_domain(merged.get("message_id_domain"), sender)

    utf8 = not all(a.username.isascii() for a in [sender, *to, *cc, *bcc, *reply_to])
    render = _RENDER_POLICY_UTF8 if utf8 else _RENDER_POLICY
    given = {key.lower(): val for key, val in headers.items()
             if key.lower() in _GENERATED_HEADERS}
    message_id = given.get("message-id") or new_message_id(id_domain)
    # Date first: stamp_date sets it at the first delivery attempt with a string operation.
    lines = [f"Date: {given.get('date') or format_date(time.time())}\r\n",
             address_header("From", [sender])]
    for header, addresses in (("To", to), ("Cc", cc), ("Reply-To", reply_to)):
        if addresses:
            lines.append(address_header(header, addresses))
    lines += [unstructured_header("Subject", subject), f"Message-ID: {message_id}\r\n"]
    lines += [_custom_header(key, val) for key, val in headers.items()
              if key.lower() not in _GENERATED_HEADERS]

    # The MIME structure: 7-bit transfer encodings keep the spooled text ASCII and need no
    # 8BITMIME from the server. HTML without text gets a text part derived from it.
    text = body if body is not None else ""
    if html is not None and not text.strip():
        text = html_to_text(html)
    fast_bytes = fast_mime(text, html, attachments) if fast and not utf8 else None
    msg = _stdlib_message(text, html, attachments, render) if fast_bytes is None else None
    try:
        mime = msg.as_bytes(policy=render) if msg is not None else fast_bytes or b""
        head = "".join(lines).encode("utf-8" if utf8 else "ascii")
    except (ValueError, TypeError, UnicodeError) as exc:  # a bug, not the caller's fault
        raise MessageError("headers", f"cannot render message: {exc}") from None
    raw = crlf(head + mime)

    recipients = list(dict.fromkeys(a.addr_spec for a in [*to, *cc, *bcc]))
    summary: dict[str, Any] = {
        "to": [str(a) for a in to],
        "cc": [str(a) for a in cc],
        "bcc_count": len(bcc),
        "subject": subject,
        "message_id": message_id,
        "tags": tags,
        "size": len(raw),
    }
    if "date" not in given:
        summary["date_pending"] = True  # stamped at the first delivery attempt
    return MessageSpec(mail_from=sender.addr_spec, recipients=recipients, raw=raw,
                       summary=summary, smtputf8=utf8)
