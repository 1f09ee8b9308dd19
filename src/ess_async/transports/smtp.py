"""SMTP transport on aiosmtplib: one persistent connection, reopened when it drops.

Each phase has its own timeout (``[transport.smtp]``): connecting and the greeting, EHLO,
STARTTLS and AUTH (``connect_timeout``); each command's reply (``command_timeout``); each
block of the message data (``data_timeout``); and the reply to the end of the data
(``final_reply_timeout``, 10 minutes by default as RFC 5321 section 4.5.3.2.6 allows).
DATA is split so that only a failure after the end of the data was written is *outcome
unknown* (``outcome_pending``), and nothing is awaited between that reply and returning.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from ..config import SmtpConfig, check_plaintext_auth
from ..errors import PermanentDeliveryError, TemporaryDeliveryError
from ..faults import crash_point
from .base import SendResult, Transport

__all__ = ("SMTPTransport",)

logger = logging.getLogger("ess_async.transports.smtp")

# A connection idle this long is checked with NOOP first: servers drop idle clients, and
# finding out in the middle of a transaction would leave its outcome unclear.
_IDLE_CHECK_SECONDS = 10.0
# The message data is written in blocks this big; each must be taken within data_timeout.
_DATA_BLOCK = 64 * 1024


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
        check_plaintext_auth(config)
        self.config = config
        self.outcome_pending = False
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self._sent_on_connection = 0
        # max_messages_per_connection reached: close before the next send, never between
        # a final reply and returning it.
        self._recycle = False

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
            # The default of every command not given its own timeout below: the
            # greeting, EHLO/HELO, STARTTLS and AUTH.
            timeout=cfg.connect_timeout,
            use_tls=cfg.tls == "tls",
            start_tls=cfg.tls == "starttls",
            tls_context=context,
        )

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._recycle:
            await self.close()
        smtp = self._smtp
        if smtp is not None and smtp.is_connected:
            if time.monotonic() - self._last_used < _IDLE_CHECK_SECONDS:
                return smtp
            try:
                await smtp.noop(timeout=self.config.command_timeout)
                return smtp
            except (aiosmtplib.SMTPException, OSError):
                await self.close()
            except BaseException:
                self._abort()  # cancelled with the NOOP's reply unread
                raise
        smtp = self._client()
        try:
            await smtp.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
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
        self._recycle = False
        return smtp

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        self.outcome_pending = False
        encoding = "utf-8" if smtputf8 else "ascii"
        try:
            # Encoded before MAIL FROM, so a bad address never leaves a transaction open.
            sender = mail_from.encode(encoding)
            rcpts = [rcpt.encode(encoding) for rcpt in recipients]
        except UnicodeEncodeError:
            raise PermanentDeliveryError(
                "an address is not ASCII, but the message is not marked smtputf8",
                phase="MAIL") from None
        smtp = await self._connection()
        phase = "MAIL"
        refused: dict[str, tuple[int, str]] = {}
        try:
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()  # an old server without ESMTP
            options = [f"SIZE={len(raw)}"] if smtp.supports_extension("size") else []
            if smtputf8:
                if not smtp.supports_extension("smtputf8"):
                    raise PermanentDeliveryError(
                        "the server does not support SMTPUTF8, which this message's "
                        "UTF-8 addresses need", phase="MAIL")
                options += ["SMTPUTF8", "BODY=8BITMIME"]
            # Addresses were validated when queued and again when read from the spool
            # (no CR, LF, < or >), so the commands are sent as they are.
            timeout = self.config.command_timeout
            reply = await smtp.execute_command(
                b"MAIL", b"FROM:<" + sender + b">",
                *(option.encode("ascii") for option in options), timeout=timeout)
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
            crash_point("after_mail_from")
            phase = "RCPT"
            for rcpt, encoded in zip(recipients, rcpts, strict=True):
                reply = await smtp.execute_command(b"RCPT", b"TO:<" + encoded + b">",
                                                   timeout=timeout)
                if reply.code not in (250, 251):
                    refused[rcpt] = (reply.code, reply.message)
            if len(refused) == len(recipients):
                await smtp.rset(timeout=timeout)
                response = None
            else:
                phase = "DATA"
                response = await self._data(smtp, raw)
        except PermanentDeliveryError:
            raise  # no SMTPUTF8: found before MAIL FROM, nothing to undo
        except aiosmtplib.SMTPResponseException as exc:
            error = _error_from_code(exc.code, exc.message, phase)
            if exc.code == 421 or exc.code < 0:
                self._abort()  # 421: the server is closing it; < 0: a garbled reply
            else:
                await self._reset()
            raise error from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Lost or timed out after the end of the data: the server may have it.
            unknown = self.outcome_pending
            self._abort()
            raise TemporaryDeliveryError(f"connection lost during {phase}: {exc}",
                                         outcome_unknown=unknown, phase=phase) from None
        except BaseException:
            # Cancelled, or anything unexpected (a hostile record, a bug): the transaction
            # may be open or a reply unread, so the connection is dropped at once, never
            # left for the next message to meet (503 nested MAIL). ``outcome_pending``
            # still says whether the end of the data went out.
            self._abort()
            raise
        # Nothing is awaited from here on: a 250 read is a 250 returned.
        self._last_used = time.monotonic()
        if response is None:
            raise _refused_error(refused)
        if not 200 <= response.code < 300:
            # The final reply ends the transaction: no RSET needed.
            if response.code == 421:
                self._abort()  # the server is closing this connection
            raise _error_from_code(response.code, response.message, "DATA")
        self._sent_on_connection += 1
        limit = self.config.max_messages_per_connection
        if limit and self._sent_on_connection >= limit:
            self._recycle = True  # closed at the next send() or close()
        return SendResult(code=response.code, message=response.message, refused=refused)

    async def _data(self, smtp: aiosmtplib.SMTP, raw: bytes) -> aiosmtplib.SMTPResponse:
        """DATA in three phases, each with its timeout: the 354, the message data, the
        final reply. ``outcome_pending`` is set just before the end of the data is written
        and cleared once its reply is read."""
        cfg = self.config
        # The crash fires once DATA is under way (at its first wait for the server).
        asyncio.get_running_loop().call_soon(crash_point, "during_data")
        reply = await smtp.execute_command(b"DATA", timeout=cfg.command_timeout)
        if reply.code != 354:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        # Dot-stuffed and CRLF-normalised as aiosmtplib's own data() does it.
        data = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw))
        # As aiosmtplib does: a reply the server sends early (a rejection while the data
        # is still coming) is kept for the read below, not dropped.
        protocol._response_pending = True
        for start in range(0, len(data), _DATA_BLOCK):
            protocol.write(data[start:start + _DATA_BLOCK])
            async with asyncio.timeout(cfg.data_timeout):
                await protocol._drain_helper()  # waits only while the socket is full
        # The server can have the whole message from here on: outcome unknown until its
        # reply is read. No await between the write and the read below.
        self.outcome_pending = True
        protocol.write(b".\r\n")
        response = await protocol.read_response(timeout=cfg.final_reply_timeout)
        self.outcome_pending = False
        return response

    async def _reset(self) -> None:
        """RSET an open transaction; drop the connection if even that fails."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.rset(timeout=self.config.command_timeout)
        except (aiosmtplib.SMTPException, OSError):
            self._abort()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Drop the connection now, without QUIT (its state is unknown)."""
        smtp, self._smtp = self._smtp, None
        self._recycle = False
        if smtp is not None:
            smtp.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        self._recycle = False
        if smtp is None:
            return
        if smtp.is_connected:
            try:
                await smtp.quit(timeout=2)
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
            except BaseException:
                smtp.close()
                raise
