"""Development transport: store each message in a Maildir folder instead of sending it."""

from __future__ import annotations

import asyncio
import mailbox
import os
from pathlib import Path

from .base import SendResult, Transport

__all__ = ("MaildirTransport",)


class MaildirTransport(Transport):
    """Deliver into ``path`` (created 0700) with the stdlib's ``mailbox.Maildir``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _add(self, mail_from: str, recipients: list[str], raw: bytes) -> str:
        box = mailbox.Maildir(self.path, create=True)  # creates new/ cur/ tmp/ as 0700
        envelope = (f"X-Ess-Envelope-From: {mail_from}\r\n"
                    f"X-Ess-Envelope-To: {', '.join(recipients)}\r\n")
        key = box.add(envelope.encode("utf-8") + raw)
        os.chmod(self.path / "new" / key, 0o600)  # mailbox creates 0666 & umask
        return key

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        key = await asyncio.to_thread(self._add, mail_from, recipients, raw)
        return SendResult(code=250, message=f"stored as {key}")
