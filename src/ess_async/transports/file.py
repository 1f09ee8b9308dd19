"""Development transport: write each message, as it would be sent, to an ``.eml`` file."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from ..errors import TemporaryDeliveryError
from ..spool import fsync_dir, write_new
from .base import SendResult, Transport

__all__ = ("FileTransport",)


class FileTransport(Transport):
    """Write each message to ``<path>/<time>-<random>.eml`` (folder 0700, files 0600):
    the bytes that would go to the server (CRLF line ends), written atomically (a hidden
    temporary file, fsynced, renamed into place), so a reader never sees half a message.
    The names sort in delivery order. The envelope is in the spool record, whose reply
    names the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, raw: bytes) -> Path:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.eml"
        target = self.path / name
        tmp = self.path / f".{name}.tmp"
        write_new(tmp, raw)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path)
        return target

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        try:
            target = await asyncio.to_thread(self._write, raw)
        except OSError as exc:  # the folder, not the message: wait, uncharged
            raise TemporaryDeliveryError(f"cannot write to {self.path}: {exc.strerror or exc}",
                                         destination=True) from None
        return SendResult(code=250, message=f"written to {target}")
