"""SMTP transport on aiosmtplib: one persistent connection, reopened when it drops."""

from __future__ import annotations

import logging
import ssl
import time

import aiosmtplib

from ..config import SmtpConfig
from ..errors import PermanentDeliveryError, TemporaryDeliveryError
from .base import SendResult, Transport

__all__ = ("SMTPTransport",)

logger = logging.getLogger("ess_async.transports.smtp")

# A connection idle this long is checked with NOOP first: servers drop idle clients, and
# finding out in the middle of a transaction would leave its outcome unclear.
_IDLE_CHECK_SECONDS = 10.0


def _error_from_code(code: int, message: str) -> TemporaryDeliveryError | PermanentDeliveryError:
    if 500 <= code < 600:
        return PermanentDeliveryError(message, code=code)
    return TemporaryDeliveryError(message, code=code)


class SMTPTransport(Transport):
    """Deliver over SMTP. TLS certificates are verified unless a CA file says otherwise."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0

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
                                         code=exc.code) from None
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise TemporaryDeliveryError(f"connect: {exc.message}", code=exc.code) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise TemporaryDeliveryError(
                f"cannot connect to {self.config.host}:{self.config.port}: {exc}") from None
        self._smtp = smtp
        return smtp

    async def send(self, mail_from: str, recipients: list[str], raw: bytes) -> SendResult:
        smtp = await self._connection()
        try:
            refused, reply = await smtp.sendmail(mail_from, recipients, raw)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            code = min(codes) if any(c < 500 for c in codes) else max(codes)
            raise _error_from_code(code, f"all recipients refused: {detail}") from None
        except aiosmtplib.SMTPResponseException as exc:
            # sendmail already sent RSET; the connection stays usable.
            raise _error_from_code(exc.code, exc.message) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise TemporaryDeliveryError(f"connection lost: {exc}") from None
        self._last_used = time.monotonic()
        head, _, text = reply.partition(" ")
        return SendResult(
            code=int(head) if head.isdigit() else 250,
            message=text if head.isdigit() else reply,
            refused={rcpt: (r.code, r.message) for rcpt, r in refused.items()},
        )

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if smtp.is_connected:
            try:
                await smtp.quit(timeout=2)
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
