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
from collections import deque
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import normalize_message_line_endings

from .. import replies
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


# Synthesised refusals (code, reply) for recipients a later transaction did not reach:
# the message was delivered to the earlier ones, so send() returns and these are retried.
_NOT_SENT = "4.5.3 not sent yet: an earlier transaction took the other recipients"
_OUTCOME_UNKNOWN = ("4.4.2 outcome unknown: the connection was lost (or send was stopped) "
                    "after this transaction's message data was sent; the server may have it")


def _error_from_code(code: int, message: str, phase: str | None = None,
                     ) -> TemporaryDeliveryError | PermanentDeliveryError:
    kind = replies.classify(code, message, phase)
    if kind is replies.ReplyKind.CLIENT_POLICY:
        # A configuration problem, not the message's: never failed, the destination is
        # backed off instead.
        hint = replies.client_policy_hint(message)
        return TemporaryDeliveryError(
            f"the relay refuses this client ({code} {message}): {hint}; messages stay "
            "deferred until the configuration is fixed",
            code=code, phase=phase, destination=True)
    if 500 <= code < 600:
        return PermanentDeliveryError(message, code=code, phase=phase)
    return TemporaryDeliveryError(message, code=code, phase=phase,
                                  pushback=kind is replies.ReplyKind.PUSHBACK)


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
            phase="RCPT",
            pushback=any(replies.is_pushback(c, t, "RCPT") for c, t in refused.values()))
    return PermanentDeliveryError(f"all recipients refused: {detail}", code=max(codes),
                                  refused=refused, phase="RCPT")


def _later_refusal(code: int, message: str, phase: str) -> tuple[int, str]:
    """The refusal recorded for recipients a later transaction did not deliver to: the
    reply's own, or a 451 for a garbled reply or one about the client (never a 5xx that
    would fail them for a configuration problem)."""
    if not 400 <= code < 600 or replies.classify(
            code, message, phase) is replies.ReplyKind.CLIENT_POLICY:
        return (451, f"{code} {message}" if code >= 0 else message)
    return (code, message)


def dot_stuffed(raw: bytes) -> bytes:
    """``raw`` as DATA carries it: every line ending CRLF and every line that starts with
    "." doubled, as aiosmtplib's ``data()`` does (``normalize_message_line_endings``,
    ``PERIOD_REGEX``). Spooled messages end their lines in CRLF already: three counts in
    C tell, and a plain replace stuffs the dots, instead of two regex passes."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf or not raw.endswith(b"\r\n"):
        raw = normalize_message_line_endings(raw)
    data = raw.replace(b"\n.", b"\n..")  # after CRLF, a line's start follows a "\n"
    return b"." + data if data.startswith(b".") else data


@dataclass
class _Progress:
    """Where a send is among its transactions (more than one when the server limits the
    recipients per transaction)."""

    untried: deque[str]  # no RCPT sent for them yet in an open transaction
    batch: list[str] = field(default_factory=list)  # accepted at RCPT, transaction open
    delivered: list[str] = field(default_factory=list)  # in an accepted transaction
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)  # their own refusal
    accepted: SMTPResponse | None = None  # the last accepted transaction's final reply

    def result(self, rest: tuple[int, str] | None = None) -> SendResult:
        """The message so far: recipients of the open transaction and those not tried yet
        are refused with ``rest``."""
        assert self.accepted is not None
        refused = dict(self.refused)
        if rest is not None:
            refused.update((rcpt, rest) for rcpt in (*self.batch, *self.untried))
        return SendResult(code=self.accepted.code, message=self.accepted.message,
                          refused=refused)


def encode_addresses(mail_from: str, recipients: list[str],
                     smtputf8: bool) -> tuple[bytes, dict[str, bytes]]:
    """The envelope as bytes, encoded before MAIL FROM so that a bad address never leaves
    a transaction open: UTF-8 only for an SMTPUTF8 message, else ASCII."""
    encoding = "utf-8" if smtputf8 else "ascii"
    try:
        return (mail_from.encode(encoding),
                {rcpt: rcpt.encode(encoding) for rcpt in recipients})
    except UnicodeEncodeError:
        raise PermanentDeliveryError(
            "an address is not ASCII, but the message is not marked smtputf8",
            phase="MAIL") from None


class SMTPTransport(Transport):
    """Deliver over SMTP. TLS certificates are verified unless a CA file says otherwise."""

    def __init__(self, config: SmtpConfig) -> None:
        check_plaintext_auth(config)
        self.config = config
        self.outcome_pending = False
        self.partial: SendResult | None = None
        self._smtp: aiosmtplib.SMTP | None = None
        self._policy_logged = False  # a CLIENT_POLICY reply was logged on this connection
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
        # Every failure here is the relay's or this client's configuration, not the
        # message's (``destination``): the sender backs off the destination instead of
        # charging the message an attempt.
        try:
            await smtp.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            # Bad credentials will not fix themselves, but the queue must not be
            # emptied into failed/ by a configuration mistake: defer instead.
            raise TemporaryDeliveryError(
                f"authentication failed: {exc.message} (check [transport.smtp] username "
                "and password_env)", code=exc.code, phase="CONNECT",
                destination=True) from None
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise TemporaryDeliveryError(
                exc.message, code=exc.code, phase="CONNECT", destination=True,
                pushback=replies.is_pushback(exc.code, exc.message, "CONNECT")) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            refused = isinstance(exc, ConnectionRefusedError) or isinstance(
                exc.__cause__, ConnectionRefusedError) or "refused" in str(exc).lower()
            raise TemporaryDeliveryError(
                f"cannot connect to {self.config.host}:{self.config.port}: {exc}",
                pushback=refused, phase="CONNECT", destination=True) from None
        self._smtp = smtp
        self._sent_on_connection = 0
        self._recycle = False
        self._policy_logged = False
        return smtp

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        self.outcome_pending = False
        self.partial = None
        sender, encoded = encode_addresses(mail_from, recipients, smtputf8)
        smtp = await self._connection()
        phase = "MAIL"
        progress = _Progress(untried=deque(dict.fromkeys(recipients)))
        failure: SMTPResponse | None = None  # a refused end of data
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
            # One transaction per round; more when the server limits the recipients per
            # transaction (RFC 5321 section 4.5.3.1.10), all on this connection.
            while progress.untried:
                phase = "MAIL"
                reply = await smtp.execute_command(
                    b"MAIL", b"FROM:<" + sender + b">",
                    *(option.encode("ascii") for option in options), timeout=timeout)
                if reply.code != 250:
                    raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
                crash_point("after_mail_from")
                phase = "RCPT"
                await self._recipients(smtp, progress, encoded)
                if not progress.batch:
                    await smtp.rset(timeout=timeout)  # nobody accepted in this one
                    continue
                phase = "DATA"
                # Once an earlier transaction was accepted, a stop while waiting for this
                # one's final reply leaves this batch outcome unknown, the rest not sent.
                unknown = None
                if progress.accepted is not None:
                    unknown = progress.result((451, _OUTCOME_UNKNOWN))
                    unknown.refused.update(
                        (rcpt, (451, _NOT_SENT)) for rcpt in progress.untried)
                    self.partial = progress.result((451, _NOT_SENT))
                response = await self._data(smtp, raw, unknown)
                self._last_used = time.monotonic()
                if not 200 <= response.code < 300:
                    failure = response  # the final reply ends the transaction: no RSET
                    break
                progress.delivered += progress.batch
                progress.batch = []
                progress.accepted = response
                self.partial = progress.result((451, _NOT_SENT))
                if progress.untried and self.checkpoint is not None:
                    await self.checkpoint(self.partial)  # durable before the next one
                    crash_point("between_transactions")
        except PermanentDeliveryError:
            raise  # no SMTPUTF8: found before MAIL FROM, nothing to undo
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code < 0 and self.outcome_pending:
                # An unreadable reply to the end of the data: the server read the whole
                # message and said something we cannot parse. Outcome unknown.
                return self._lost(progress, "DATA", f"unreadable reply {exc.message!r}",
                                  unknown=True)
            if exc.code == 421 or exc.code < 0:
                self._abort()  # 421: the server is closing it; < 0: a garbled reply
            else:
                await self._reset()
            if progress.accepted is not None:
                return self._finished(progress, _later_refusal(exc.code, exc.message, phase))
            raise self._error(exc.code, exc.message, phase) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Lost or timed out after the end of the data: the server may have it.
            return self._lost(progress, phase, str(exc), unknown=self.outcome_pending)
        except Exception as exc:
            # Unexpected (a hostile record, a bug): the connection is dropped at once.
            return self._unexpected(progress, exc)
        except BaseException:
            # Cancelled: the transaction may be open or a reply unread, so the connection
            # is dropped at once, never left for the next message to meet (503 nested
            # MAIL). ``outcome_pending`` still says whether the end of the data went out,
            # ``partial`` what earlier transactions delivered.
            self._abort()
            raise
        return self._completed(progress, failure)

    def _completed(self, progress: _Progress, failure: SMTPResponse | None) -> SendResult:
        """The end of a send whose transactions all got their final reply (``failure``:
        the last one's, if it refused). Nothing is awaited from here on: a 250 read is a
        250 returned."""
        self._last_used = time.monotonic()
        if failure is not None:
            if failure.code == 421:
                self._abort()  # the server is closing this connection
            if progress.accepted is not None:
                return self._finished(
                    progress, _later_refusal(failure.code, failure.message, "DATA"))
            raise self._error(failure.code, failure.message, "DATA")
        if progress.accepted is None:
            raise _refused_error(progress.refused)
        self._sent_on_connection += 1
        limit = self.config.max_messages_per_connection
        if limit and self._sent_on_connection >= limit:
            self._recycle = True  # closed at the next send() or close()
        return self._finished(progress, None)

    def _lost(self, progress: _Progress, phase: str, detail: str, *,
              unknown: bool) -> SendResult:
        """The connection broke (or a reply could not be read) during ``phase``; with
        ``unknown`` the server may have the open transaction's message. The result if an
        earlier transaction was accepted; else raises TemporaryDeliveryError."""
        self._abort()
        why = f"connection lost during {phase}: {detail}"
        if progress.accepted is None:
            raise TemporaryDeliveryError(why, outcome_unknown=unknown, phase=phase)
        if unknown:  # the outcome-unknown window of a later transaction
            progress.refused.update(
                (rcpt, (451, _OUTCOME_UNKNOWN)) for rcpt in progress.batch)
            progress.batch = []
            return self._finished(progress, (451, _NOT_SENT))
        return self._finished(progress, (451, f"4.4.2 not sent: {why}"))

    def _unexpected(self, progress: _Progress, exc: Exception) -> SendResult:
        """An unexpected error mid-send: re-raised, unless an earlier transaction was
        accepted (that delivery must be recorded: the rest are not sent)."""
        self._abort()
        if progress.accepted is None:
            raise exc
        logger.exception("unexpected error after a transaction was accepted")
        return self._finished(progress, (451, f"4.3.0 not sent: internal error {exc!r}"))

    def _finished(self, progress: _Progress, rest: tuple[int, str] | None) -> SendResult:
        """The result of a send that delivered to at least one transaction's recipients;
        ``rest``: the refusal of those left (a later transaction failed)."""
        result = progress.result(rest)
        self.partial = result
        self.outcome_pending = False  # what is unknown is in ``refused`` now
        if rest is not None:
            logger.warning("delivered to %d recipient(s); %d left for later: %s %s",
                           len(progress.delivered), len(result.refused), *rest)
        return result

    async def _recipients(self, smtp: aiosmtplib.SMTP, progress: _Progress,
                          encoded: dict[str, bytes]) -> None:
        """RCPT for ``progress.untried`` in the open transaction, until the server's
        recipient limit. Refusals of a recipient go to ``progress.refused``."""
        untried = progress.untried
        tried = 0  # recipients this transaction has answered for
        while untried:
            reply = await smtp.execute_command(
                b"RCPT", b"TO:<" + encoded[untried[0]] + b">",
                timeout=self.config.command_timeout)
            code, text = reply.code, reply.message
            if code in (250, 251):
                progress.batch.append(untried.popleft())
                tried += 1
                continue
            kind = replies.classify(code, text, "RCPT")
            if code < 0 or code == 421 or kind is replies.ReplyKind.CLIENT_POLICY:
                # Not about this recipient (a garbled reply, the server closing, 530):
                # the whole attempt stops here.
                raise aiosmtplib.SMTPResponseException(code, text)
            if kind is replies.ReplyKind.RECIPIENT_LIMIT and tried:
                return  # the rest go in the next transaction
            if kind in (replies.ReplyKind.RECIPIENT_LIMIT, replies.ReplyKind.PUSHBACK):
                # The limit at a transaction's first RCPT (no transaction gets further
                # now), or the server wants less of us: the rest wait for the retry
                # schedule (a 552 "too many recipients" is temporary, RFC 5321 4.5.3.1.10).
                refusal = (452 if code >= 500 else code, text)
                progress.refused.update((rcpt, refusal) for rcpt in untried)
                untried.clear()
                return
            progress.refused[untried.popleft()] = (code, text)
            tried += 1

    def _error(self, code: int, message: str,
               phase: str) -> TemporaryDeliveryError | PermanentDeliveryError:
        error = _error_from_code(code, message, phase)
        if error.destination and not self._policy_logged:
            self._policy_logged = True  # once per connection
            logger.error("%s:%s at %s: %s", self.config.host, self.config.port, phase,
                         error.message)
        return error

    async def _data(self, smtp: aiosmtplib.SMTP, raw: bytes,
                    unknown: SendResult | None = None) -> SMTPResponse:
        """DATA in three phases, each with its timeout: the 354, the message data, the
        final reply. ``outcome_pending`` is set just before the end of the data is written
        and cleared once its reply is read; ``unknown`` (if given) is ``partial`` meanwhile."""
        cfg = self.config
        # The crash fires once DATA is under way (at its first wait for the server).
        asyncio.get_running_loop().call_soon(crash_point, "during_data")
        reply = await smtp.execute_command(b"DATA", timeout=cfg.command_timeout)
        if reply.code != 354:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        data = dot_stuffed(raw)
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
        if unknown is not None:
            self.partial = unknown
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
