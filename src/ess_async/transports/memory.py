"""In-memory transport: keep each delivered message in a list (tests, development).

``[transport] type = "memory"`` delivers into ``ess_async.transports.memory.outbox``, a
module-level list shared by every transport created without an explicit list; the
pytest plugin (``ess_async.testing``) gives each test its own list.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import SendResult, Transport

__all__ = ("MemoryTransport", "SentMessage", "outbox")


@dataclass(frozen=True)
class SentMessage:
    """One delivered message: the SMTP envelope and the exact bytes that were sent."""

    mail_from: str
    recipients: list[str]
    raw: bytes


outbox: list[SentMessage] = []
"""Where transports created with ``outbox=None`` append what they deliver."""


class MemoryTransport(Transport):
    """Accept every message and append it to ``outbox`` (the module's ``outbox`` when None)."""

    def __init__(self, outbox: list[SentMessage] | None = None) -> None:
        self.outbox: list[SentMessage] = outbox if outbox is not None else _default()

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        self.outbox.append(SentMessage(mail_from, list(recipients), bytes(raw)))
        return SendResult(code=250, message=f"stored in memory ({len(self.outbox)})")


def _default() -> list[SentMessage]:
    return outbox
