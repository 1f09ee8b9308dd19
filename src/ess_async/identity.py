"""Identity of sent mail: the Date, the Message-ID and the EHLO name.

Receivers distrust ``localhost`` in a Message-ID or an EHLO name: each warns once per
process on the ``ess_async.message`` logger (the library never configures logging).
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import time
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ("check_ehlo_name", "format_date", "is_local_name", "new_message_id", "stamp_date")

logger = logging.getLogger("ess_async.message")

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost6",
                          "localhost6.localdomain6", "127.0.0.1", "::1", "ipv6:::1"})
_warned: set[str] = set()


def is_local_name(name: str) -> bool:
    """Whether ``name`` (a host name, domain or address literal) means this machine only."""
    host = name.strip().strip("[]").rstrip(".").lower()
    return host in _LOCAL_NAMES or host.endswith((".localhost", ".localdomain"))


def _warn_once(kind: str, message: str, *args: object) -> None:
    if kind not in _warned:
        _warned.add(kind)
        logger.warning(message, *args)


def check_ehlo_name(local_hostname: str = "") -> str:
    """The name the SMTP transport gives in EHLO (``[transport.smtp] local_hostname``, else
    ``socket.getfqdn()``, as aiosmtplib does). Warns once per process when it is localhost,
    which receiving servers and spam filters distrust. Meant for the start of delivery; it
    may ask DNS, so call it off the event loop."""
    name = local_hostname or socket.getfqdn()
    if is_local_name(name):
        _warn_once("ehlo", "the EHLO name is %r: receiving servers may refuse or penalise "
                   "mail from it; set [transport.smtp] local_hostname to this host's name "
                   "in DNS", name)
    return name


def new_message_id(domain: str) -> str:
    """A new Message-ID: time and 80 random bits (no process id, unlike make_msgid)."""
    if is_local_name(domain):
        _warn_once("message-id", "Message-IDs end in @%s: set [message] message_id_domain "
                   "(or a sender with a real domain); spam filters penalise local ones",
                   domain)
    return f"<{time.time_ns():x}.{secrets.token_hex(10)}@{domain}>"


_last_date: tuple[int, str] | None = None  # (second, its text): one tuple, thread-safe


def format_date(when: float) -> str:
    """An RFC 5322 date in UTC: ``Tue, 01 Dec 2026 09:00:00 +0000`` (always 31 characters
    for years 1000 to 9999, so stamping it never changes a message's size)."""
    global _last_date
    second = math.floor(when)
    last = _last_date  # read once: another thread may replace it meanwhile
    if last is not None and last[0] == second:  # many messages are stamped a second
        return last[1]
    text = format_datetime(datetime.fromtimestamp(second, UTC))
    _last_date = (second, text)
    return text


def stamp_date(raw: str, when: float) -> str:
    """``raw`` with its Date set to ``when``: for the first delivery attempt of a message
    whose record has ``date_pending`` (its caller gave no Date). ``build_message`` puts
    that Date first, so this is a string operation on the first line; a message without a
    leading Date header is returned as it is."""
    if not raw.startswith("Date: "):
        return raw
    return "Date: " + format_date(when) + raw[raw.index("\r\n"):]
