"""Development transport: store each message in a Maildir folder instead of sending it."""

from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path

from .base import SendResult, Transport

__all__ = ("MaildirTransport",)


class MaildirTransport(Transport):
    """Deliver into ``path`` (created 0700) with the stdlib's ``mailbox.Maildir``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _add(self, mail_from: str, recipients: list[str], raw: bytes) -> str:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        box = mailbox.Maildir(self.path, create=True)
        envelope = (f"X-Ess-Envelope-From: {mail_from}\r\n"
                    f"X-Ess-Envelope-To: {', '.join(recipients)}\r\n")
        return box.add(envelope.encode("ascii") + raw)

    async def send(self, mail_from: str, recipients: list[str], raw: bytes) -> SendResult:
        key = await asyncio.to_thread(self._add, mail_from, recipients, raw)
        return SendResult(code=250, message=f"stored as {key}")
