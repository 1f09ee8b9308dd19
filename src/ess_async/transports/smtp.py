"""SMTP transport on aiosmtplib: one persistent connection, reopened when it drops."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aiosmtplib

from ..config import SmtpConfig
from ..errors import PermanentDeliveryError, TemporaryDeliveryError
from ..faults import crash_point
from .base import SendResult, Transport

__all__ = ("SMTPTransport",)

logger = logging.getLogger("ess_async.transports.smtp")

# A connection idle this long is checked with NOOP first: servers drop idle clients, and
# finding out in the middle of a transaction would leave its outcome unclear.
_IDLE_CHECK_SECONDS = 10.0


def _is_pushback(code: int, message: str) -> bool:
    """421 (closing), and 451/452 saying "too many": the server wants fewer of us."""
    return code == 421 or (code in (450, 451, 452) and "too many" in message.lower())


def _error_from_code(code: int, message: str, phase: str | None = None,
                     ) -> TemporaryDeliveryError | PermanentDeliveryError:
    if 500 <= code < 600:
        return PermanentDeliveryError(message, code=code, phase=phase)
    return TemporaryDeliveryError(message, code=code, phase=phase,
                                  pushback=_is_pushback(code, message))


def _refused_error(
    refused: dict[str, tuple[int, str]],
) -> TemporaryDeliveryError | PermanentDeliveryError:
    """Every recipient was refused: temporary if any of them may succeed later."""
    detail = "; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in refused.items())
    codes = [code for code, _ in refused.values()]
    temporary = [code for code in codes if code < 500]
    if temporary:
        return TemporaryDeliveryError(
            f"all recipients refused: {detail}", code=min(temporary), refused=refused,
            phase="RCPT", pushback=any(_is_pushback(c, t) for c, t in refused.values()))
    return PermanentDeliveryError(f"all recipients refused: {detail}", code=max(codes),
                                  refused=refused, phase="RCPT")


class SMTPTransport(Transport):
    """Deliver over SMTP. TLS certificates are verified unless a CA file says otherwise."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self._sent_on_connection = 0

    def _client(self) -> aiosmtplib.SMTP:
        cfg = self.config
        context = None
        if cfg.tls != "none":
            context = ssl.create_default_context(cafile=cfg.tls_ca_file or None)
        return aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            username=cfg.username or None,
            password=cfg.password() if cfg.username else None,
            local_hostname=cfg.local_hostname or None,
            timeout=cfg.timeout,
            use_tls=cfg.tls == "tls",
            start_tls=cfg.tls == "starttls",
            tls_context=context,
        )

    async def _connection(self) -> aiosmtplib.SMTP:
        smtp = self._smtp
        if smtp is not None and smtp.is_connected:
            if time.monotonic() - self._last_used < _IDLE_CHECK_SECONDS:
                return smtp
            try:
                await smtp.noop()
                return smtp
            except (aiosmtplib.SMTPException, OSError):
                await self.close()
        smtp = self._client()
        try:
            await smtp.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Bad credentials will not fix themselves, but the queue must not be
            # emptied into failed/ by a configuration mistake: defer instead.
            raise TemporaryDeliveryError(f"authentication failed: {exc.message}",
                                         code=exc.code, phase="CONNECT") from None
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise TemporaryDeliveryError(exc.message, code=exc.code, phase="CONNECT",
                                         pushback=_is_pushback(exc.code, exc.message)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            refused = isinstance(exc, ConnectionRefusedError) or isinstance(
                exc.__cause__, ConnectionRefusedError) or "refused" in str(exc).lower()
            raise TemporaryDeliveryError(
                f"cannot connect to {self.config.host}:{self.config.port}: {exc}",
                pushback=refused, phase="CONNECT") from None
        self._smtp = smtp
        self._sent_on_connection = 0
        return smtp

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        smtp = await self._connection()
        phase = "MAIL"
        try:
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()  # an old server without ESMTP
            options = [f"SIZE={len(raw)}"] if smtp.supports_extension("size") else []
            encoding = "ascii"
            if smtputf8:
                if not smtp.supports_extension("smtputf8"):
                    raise PermanentDeliveryError(
                        "the server does not support SMTPUTF8, which this message's "
                        "UTF-8 addresses need", phase="MAIL")
                options += ["SMTPUTF8", "BODY=8BITMIME"]
                encoding = "utf-8"
            # Addresses were validated when queued and again when read from the spool
            # (no CR, LF, < or >), so the commands are sent as they are.
            reply = await smtp.execute_command(
                b"MAIL", b"FROM:<" + mail_from.encode(encoding) + b">",
                *(option.encode("ascii") for option in options))
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
            crash_point("after_mail_from")
            phase = "RCPT"
            refused: dict[str, tuple[int, str]] = {}
            for rcpt in recipients:
                reply = await smtp.execute_command(
                    b"RCPT", b"TO:<" + rcpt.encode(encoding) + b">")
                if reply.code not in (250, 251):
                    refused[rcpt] = (reply.code, reply.message)
            if len(refused) == len(recipients):
                await smtp.rset()
                response = None
            else:
                phase = "DATA"
                # The crash fires once DATA is under way (at its first wait for the server).
                asyncio.get_running_loop().call_soon(crash_point, "during_data")
                response = await smtp.data(raw)
        except aiosmtplib.SMTPResponseException as exc:
            error = _error_from_code(exc.code, exc.message, phase)
            if exc.code == 421:
                await self.close()  # 421: the server is closing this connection
            else:
                await self._reset()
            raise error from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise TemporaryDeliveryError(
                f"connection lost during {phase}: {exc}",
                # Lost during DATA: the server may have accepted the message.
                outcome_unknown=phase == "DATA", phase=phase) from None
        self._last_used = time.monotonic()
        if response is None:
            raise _refused_error(refused)
        self._sent_on_connection += 1
        limit = self.config.max_messages_per_connection
        if limit and self._sent_on_connection >= limit:
            await self.close()
        return SendResult(code=response.code, message=response.message, refused=refused)

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                await self.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if smtp.is_connected:
            try:
                await smtp.quit(timeout=2)
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
