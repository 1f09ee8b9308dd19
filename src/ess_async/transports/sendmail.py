"""Pipe each message to a sendmail-compatible program (Email::Sender::Server's default).

The command line is ``[transport.sendmail] path`` and ``args`` (``{from}`` replaced by the
envelope sender), then the recipients. The message goes to the program's standard input
with LF line ends, as local mail programs expect (Postfix's sendmail and sendmail itself
read lines; msmtp and nullmailer accept both). Exit status 0 is accepted; 75
(EX_TEMPFAIL) and death by a signal are temporary (retried); any other status is
permanent, with what the program wrote on stderr (else stdout) as the reply. A program
still running after ``timeout`` seconds is killed with its process group (temporary; the
outcome is unknown once it had the whole message). A program that cannot be started
(missing, not executable) is the configuration's fault, not the message's: the message
waits, uncharged, as for an SMTP relay that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence

from ..config import SendmailConfig
from ..errors import PermanentDeliveryError, TemporaryDeliveryError
from .base import SendResult, Transport

__all__ = ("EX_TEMPFAIL", "LOOP_ENV", "SendmailTransport")

EX_TEMPFAIL = 75
#: Set in the program's environment: ``ess-sendmail`` refuses to queue when it sees it,
#: so a sendmail transport pointed at ess-sendmail itself cannot loop forever.
LOOP_ENV = "ESS_ASYNC_SENDMAIL_TRANSPORT"
_REPLY_LIMIT = 2000  # characters of the program's output kept as the reply


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: children die with it
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def _read_capped(stream: asyncio.StreamReader | None) -> bytes:
    """Everything until EOF (so the program never blocks on a full pipe), keeping the
    start."""
    if stream is None:
        return b""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < 4 * _REPLY_LIMIT:
            kept += chunk[:4 * _REPLY_LIMIT - len(kept)]
    return bytes(kept)


def _text(data: bytes) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    return text[:_REPLY_LIMIT]


class SendmailTransport(Transport):
    """One program run per message; each sender runs at most one at a time, so ``spawn``
    bounds how many run at once."""

    def __init__(self, config: SendmailConfig) -> None:
        self.config = config

    def command(self, mail_from: str, recipients: Sequence[str]) -> list[str]:
        args = [arg.replace("{from}", mail_from) for arg in self.config.args]
        return [self.config.path, *args, *recipients]

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        self.outcome_pending = False
        self.partial = None
        if "--" not in self.config.args and any(r.startswith("-") for r in recipients):
            # Without "--" such a recipient would be read as an option of the program.
            raise PermanentDeliveryError(
                "a recipient starts with '-' and transport.sendmail.args has no '--'",
                code=553, phase="RCPT")
        argv = self.command(mail_from, recipients)
        env = {**os.environ, LOOP_ENV: "1"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise TemporaryDeliveryError(
                f"cannot run {self.config.path}: {exc.strerror or exc}", phase="CONNECT",
                destination=True) from None
        data = raw.replace(b"\r\n", b"\n")
        had_all = False
        try:
            try:
                async with asyncio.timeout(self.config.timeout):
                    status, out, err = await self._run(proc, data)
                had_all = self.outcome_pending
            except TimeoutError:
                _kill(proc)
                await proc.wait()
                unknown, self.outcome_pending = self.outcome_pending, False
                raise TemporaryDeliveryError(
                    f"{self.config.path} did not exit within {self.config.timeout:g}s "
                    "(killed)", phase="DATA", outcome_unknown=unknown) from None
        except BaseException:
            # Cancelled (a stop whose grace ran out) or failed: no orphan. outcome_pending
            # stays as it is: the sender reads it to know whether the program had it all.
            _kill(proc)
            raise
        self.outcome_pending = False
        reply = _text(err) or _text(out)
        name = os.path.basename(self.config.path)
        if status == 0:
            return SendResult(code=250, message=reply or f"accepted by {name}")
        if status < 0:
            try:
                sig = signal.Signals(-status).name
            except ValueError:
                sig = f"signal {-status}"
            raise TemporaryDeliveryError(f"{name} killed by {sig}" + (
                f": {reply}" if reply else ""), phase="DATA", outcome_unknown=had_all)
        detail = f"{name} exited with status {status}" + (f": {reply}" if reply else "")
        if status == EX_TEMPFAIL:
            raise TemporaryDeliveryError(detail, phase="DATA")
        raise PermanentDeliveryError(detail, phase="DATA")

    async def _run(self, proc: asyncio.subprocess.Process,
                   data: bytes) -> tuple[int, bytes, bytes]:
        readers = asyncio.gather(_read_capped(proc.stdout), _read_capped(proc.stderr))
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(data)
                await proc.stdin.drain()
                proc.stdin.close()
                self.outcome_pending = True  # the program has the whole message
                await proc.stdin.wait_closed()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it exited (or closed its input) early: its status says why
            out, err = await readers
        except BaseException:
            readers.cancel()
            raise
        status = await proc.wait()
        return status, out, err
