"""SMTP with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write.

Connecting, the greeting, EHLO, STARTTLS and AUTH stay with aiosmtplib (the synchronisation
points, and the security-sensitive part); when the last EHLO reply lists PIPELINING the
connection is taken over by ``_ReplyProtocol`` (``transport.set_protocol``), which keeps
every reply it reads, in order, so a write of several commands is answered reply by reply.
A server without PIPELINING, or ``[transport.smtp] pipelining = "off"``, gets the
one-command-at-a-time ``SMTPTransport``.

The semantics are ``SMTPTransport``'s (see ``base.Transport``): per-recipient replies,
recipient-limit splitting with ``partial`` and ``checkpoint``, per-phase timeouts,
``outcome_pending`` exactly while the final "." is unanswered, the crash points. The body is
never written before the 354 was read; a 354 with no recipient accepted gets a lone "."
(its reply ignored), another reply to DATA a RSET. A reply-count mismatch or an unexpected
503 turns pipelining off for the connection: the transaction is reset and sent again one
command at a time (nothing was delivered: no 354 was answered with data), or, if the
server did answer 354, the connection is dropped unused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse

from .. import replies
from ..config import SmtpConfig
from ..errors import PermanentDeliveryError
from ..faults import crash_point
from .base import SendResult
from .smtp import (
    _DATA_BLOCK,
    _IDLE_CHECK_SECONDS,
    _NOT_SENT,
    _OUTCOME_UNKNOWN,
    SMTPTransport,
    _later_refusal,
    _Progress,
    dot_stuffed,
    encode_addresses,
)

__all__ = ("PipeliningTransport",)

logger = logging.getLogger("ess_async.transports.pipelining")

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_MAX_LINE = 8192  # a reply line longer than this is garbage (RFC 5321: 512)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def _within(future: asyncio.Future[None], timeout: float) -> None:
    """Wait for ``future``, raising TimeoutError after ``timeout`` seconds: a plain timer
    on the future (three waits per message: cheaper than ``asyncio.timeout``'s context)."""
    timer = asyncio.get_running_loop().call_later(timeout, _expire, future)
    try:
        await future
    finally:
        timer.cancel()


class _Lost(ConnectionError):
    """The connection is gone (or unusable: a garbled reply)."""


class _Refused(Exception):
    """A reply that stops the transaction (``phase`` is where); like SMTPResponseException."""

    def __init__(self, code: int, message: str, phase: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.phase = phase


class _Desync(Exception):
    """Pipelining went wrong on this connection (a reply-count mismatch, an unexpected
    503). ``in_data``: the server answered DATA with 354, so it expects the message."""

    def __init__(self, why: str, in_data: bool) -> None:
        super().__init__(why)
        self.in_data = in_data


class _ReplyProtocol(asyncio.Protocol):
    """Keeps every complete reply received, in order; nothing is dropped."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.replies: deque[SMTPResponse] = deque()
        self._buffer = bytearray()
        self._lines: list[str] = []  # the lines so far of a multi-line reply
        self._code = -1
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self.lost: BaseException | None = None
        self.garbled = False

    # -- asyncio.Protocol --
    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end + 1])
            start = end + 1
            try:
                code = int(line[:3])
                if not 100 <= code < 600 or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                    raise ValueError
            except ValueError:
                self._garbage(f"malformed reply line: {line[:80]!r}")
                return
            if self._lines and code != self._code:
                self._garbage("multi-line reply with mixed codes")
                return
            self._code = code
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                self.replies.append(SMTPResponse(code, "\n".join(self._lines)))
                self._lines = []
        del buffer[:start]
        if len(buffer) > _MAX_LINE or len(self._lines) > 1000:
            self._garbage("reply too long")
            return
        if self.replies:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = exc or ConnectionResetError("connection closed by the server")
        self._wake()
        self._resume()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._resume()

    # -- helpers --
    def _garbage(self, why: str) -> None:
        self.garbled = True
        if self.lost is None:
            self.lost = _Lost(why)
        self.transport.abort()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise _Lost(f"connection lost: {self.lost}")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) while the socket's buffer is full."""
        if self._paused and self.lost is None:
            self._drain = asyncio.get_running_loop().create_future()
            await _within(self._drain, timeout)
        if self.lost is not None:
            raise _Lost(f"connection lost: {self.lost}")

    async def read(self, timeout: float) -> SMTPResponse:
        """The next reply, waiting up to ``timeout`` for it."""
        if not self.replies:
            if self.lost is not None:
                raise _Lost(f"connection lost: {self.lost}")
            self._waiter = asyncio.get_running_loop().create_future()
            await _within(self._waiter, timeout)
            if not self.replies:
                raise _Lost(f"connection lost: {self.lost}")
        return self.replies.popleft()


class _Connection:
    """A connection taken over from aiosmtplib after EHLO (and STARTTLS, AUTH)."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        # Any loop's transport (uvloop's are not asyncio.Transport subclasses).
        transport = cast(asyncio.Transport, smtp.transport)
        self.extensions = dict(smtp.esmtp_extensions)
        # Detached: aiosmtplib no longer reads, writes or closes this connection.
        smtp.transport = None
        smtp.protocol = None
        self.protocol = _ReplyProtocol(transport)
        transport.set_protocol(self.protocol)
        self.pipelining = True  # off for this connection once the server broke it

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    def abort(self) -> None:
        self.protocol.transport.abort()


class PipeliningTransport(SMTPTransport):
    """``SMTPTransport`` that pipelines each transaction when the server offers it."""

    def __init__(self, config: SmtpConfig) -> None:
        super().__init__(config)
        self._conn: _Connection | None = None

    async def _pipelined(self) -> _Connection | None:
        """The connection to pipeline on, or None when ``SMTPTransport.send`` must do the
        send (pipelining off, or not offered: ``self._smtp`` is then open)."""
        if self._recycle:
            await self.close()
        conn = self._conn
        if conn is not None:
            if conn.protocol.usable:
                if time.monotonic() - self._last_used < _IDLE_CHECK_SECONDS:
                    return conn
                try:
                    conn.protocol.write(b"NOOP\r\n")
                    reply = await conn.protocol.read(self.config.command_timeout)
                    if reply.code == 250 and not conn.protocol.replies:
                        return conn
                except (OSError, _Lost):
                    pass
                except BaseException:
                    self._abort()
                    raise
            self._abort()
        if self.config.pipelining == "off" or (
                self._smtp is not None and self._smtp.is_connected):
            return None
        smtp = await self._connection()
        self._last_used = time.monotonic()
        try:
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()
        except Exception:
            return None  # SMTPTransport.send tries again (HELO) and reports the failure
        except BaseException:
            self._abort()
            raise
        if not smtp.supports_extension("pipelining"):
            return None
        buffered = smtp.protocol is not None and bool(smtp.protocol._buffer)
        if buffered:
            return None  # unread data after EHLO: not a connection to pipeline on
        self._smtp = None  # the connection is this class's from here on
        self._conn = _Connection(smtp)
        self._sent_on_connection = 0
        return self._conn

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        self.outcome_pending = False
        self.partial = None
        sender, encoded = encode_addresses(mail_from, recipients, smtputf8)
        for address in (sender, *encoded.values()):
            if _CONTROL.search(address):
                # As aiosmtplib refuses them, but before anything is written.
                raise ValueError(f"control character in address {address!r}")
        conn = await self._pipelined()
        if conn is None:
            return await super().send(mail_from, recipients, raw, smtputf8=smtputf8)
        return await self._send(conn, sender, encoded, raw, smtputf8)

    async def _send(self, conn: _Connection, sender: bytes, encoded: dict[str, bytes],
                    raw: bytes, smtputf8: bool) -> SendResult:
        options = [b"SIZE=%d" % len(raw)] if conn.supports("size") else []
        if smtputf8:
            if not conn.supports("smtputf8"):
                raise PermanentDeliveryError(
                    "the server does not support SMTPUTF8, which this message's "
                    "UTF-8 addresses need", phase="MAIL")
            options += [b"SMTPUTF8", b"BODY=8BITMIME"]
        mail = b" ".join([b"MAIL FROM:<" + sender + b">", *options]) + b"\r\n"
        progress = _Progress(untried=deque(dict.fromkeys(encoded)))
        phase = "MAIL"
        failure: SMTPResponse | None = None  # a refused end of data
        try:
            while progress.untried:
                phase = "MAIL"
                if conn.pipelining:
                    try:
                        failure = await self._transaction(conn, mail, progress, encoded, raw)
                    except _Desync as exc:
                        logger.warning("%s:%s: pipelining turned off for this connection: %s",
                                       self.config.host, self.config.port, exc)
                        conn.pipelining = False
                        if exc.in_data:
                            # The server waits for a message: only dropping the
                            # connection ends that transaction undelivered.
                            raise _Lost(f"pipelining failed ({exc}); "
                                        "connection dropped before any data") from None
                        await self._lockstep(conn, b"RSET\r\n", "RSET")
                        if conn.protocol.replies:
                            raise _Lost("replies out of step after RSET") from None
                        continue  # the same recipients again, one command at a time
                else:
                    failure = await self._transaction(conn, mail, progress, encoded, raw)
                phase = "DATA"
                if failure is not None:
                    break
        except PermanentDeliveryError:
            raise
        except _Refused as exc:
            phase = exc.phase
            if exc.code == 421 or exc.code < 0:
                self._abort()
            else:
                await self._reset_conn()
            if progress.accepted is not None:
                return self._finished(progress, _later_refusal(exc.code, exc.message, phase))
            raise self._error(exc.code, exc.message, phase) from None
        except OSError as exc:  # _Lost too; and timeouts
            return self._lost(progress, self._phase, repr(exc), unknown=self.outcome_pending)
        except Exception as exc:
            return self._unexpected(progress, exc)
        except BaseException:
            self._abort()  # cancelled: outcome_pending and partial say where it stopped
            raise
        return self._completed(progress, failure)

    _phase = "MAIL"  # the step whose reply is awaited, for "connection lost during ..."

    async def _lockstep(self, conn: _Connection, command: bytes, phase: str) -> SMTPResponse:
        self._phase = phase
        conn.protocol.write(command)
        return await conn.protocol.read(self.config.command_timeout)

    async def _transaction(self, conn: _Connection, mail: bytes, progress: _Progress,
                           encoded: dict[str, bytes], raw: bytes) -> SMTPResponse | None:
        """One transaction for ``progress.untried`` (as many as the server takes): MAIL,
        RCPT..., DATA in one write when pipelining, else one at a time. Returns a refused
        final reply (the transaction is over), or None (delivered, or nobody accepted)."""
        protocol = conn.protocol
        timeout = self.config.command_timeout
        pipelining = conn.pipelining
        group = list(progress.untried)
        if pipelining:
            protocol.write(b"".join([mail, *(b"RCPT TO:<" + encoded[r] + b">\r\n"
                                             for r in group), b"DATA\r\n"]))
            # Fires once DATA is under way (at the first wait for the server), as in
            # SMTPTransport; here DATA went out with the envelope.
            asyncio.get_running_loop().call_soon(crash_point, "during_data")
            await protocol.drain(timeout)
        else:
            protocol.write(mail)
        self._phase = "MAIL"
        reply = await protocol.read(timeout)
        if reply.code != 250:
            if pipelining and reply.code != 421:  # a 421 closes: no more replies come
                # Every RCPT and the DATA were refused too (503) unless the server is
                # broken; read them all before saying so.
                last = await self._skip(conn, len(group) + 1)
                if last is not None and last.code == 354:
                    raise _Desync("354 after a refused MAIL", in_data=True)
                if reply.code == 503 or protocol.replies:  # nested MAIL: out of step
                    raise _Desync(f"{reply.code} {reply.message} to MAIL", in_data=False)
            raise _Refused(reply.code, reply.message, "MAIL")
        crash_point("after_mail_from")
        # RCPT: every reply read (when pipelining, all of them are on their way).
        self._phase = "RCPT"
        accepted: list[str] = []
        limited: list[str] = []  # the server's recipient limit: for a later transaction
        first_limit_at: int | None = None
        limit_reply = (452, "")
        pushed: tuple[int, str] | None = None  # lockstep: push-back defers the rest
        stop: _Refused | None = None  # a reply that ends the attempt (421, 530, garbled)
        desync: str | None = None
        for index, rcpt in enumerate(group):
            if stop is not None and not pipelining:
                break
            if not pipelining:
                protocol.write(b"RCPT TO:<" + encoded[rcpt] + b">\r\n")
            reply = await protocol.read(timeout)
            code, text = reply.code, reply.message
            if stop is not None or desync is not None:
                continue  # the replies of a group already given up are only read
            if code in (250, 251):
                accepted.append(rcpt)
                continue
            kind = replies.classify(code, text, "RCPT")
            if code == 503 and pipelining:
                desync = f"503 to RCPT after a 250 to MAIL: {text}"
            elif code == 421 or kind is replies.ReplyKind.CLIENT_POLICY:
                stop = _Refused(code, text, "RCPT")
            elif kind is replies.ReplyKind.RECIPIENT_LIMIT:
                if first_limit_at is None:
                    first_limit_at, limit_reply = index, (code, text)
                limited.append(rcpt)
                if not pipelining:
                    break  # the rest go in the next transaction
            elif kind is replies.ReplyKind.PUSHBACK and not pipelining:
                # As SMTPTransport: the server wants less of us, the rest wait.
                pushed = (452 if code >= 500 else code, text)
                progress.refused[rcpt] = pushed
                break
            else:
                progress.refused[rcpt] = (code, text)
        if pipelining:
            self._phase = "DATA"
            data_reply = await protocol.read(timeout)
            if protocol.replies:
                desync = desync or f"{len(protocol.replies)} more replies than commands"
            if desync is not None:
                for rcpt in group:  # nothing of this group stands: all of it again
                    progress.refused.pop(rcpt, None)
                raise _Desync(desync, in_data=data_reply.code == 354)
            if data_reply.code == 503 and accepted:
                for rcpt in group:
                    progress.refused.pop(rcpt, None)
                raise _Desync(f"503 to DATA with recipients accepted: {data_reply.message}",
                              in_data=False)
        else:
            data_reply = None
        if stop is not None:
            if data_reply is not None and data_reply.code == 354:
                raise _Lost(f"{stop.code} {stop.message} at RCPT; the connection is "
                            "dropped before any data")
            raise stop
        # Sort the group: accepted ones in this transaction, the limited ones later.
        taken = set(accepted) | set(limited) | set(progress.refused)
        untried = progress.untried
        rest = [rcpt for rcpt in untried if rcpt not in taken]  # lockstep: not reached
        if pushed is not None:
            progress.refused.update((rcpt, pushed) for rcpt in rest)
            rest = []
        if limited and not accepted and first_limit_at == 0:
            # The limit at the transaction's first RCPT: no transaction gets further now.
            code, text = limit_reply
            refusal = (452 if code >= 500 else code, text)
            progress.refused.update((rcpt, refusal) for rcpt in (*limited, *rest))
            limited, rest = [], []
        untried.clear()
        untried.extend(limited)
        untried.extend(rest)
        progress.batch = accepted
        if not pipelining:
            if not accepted:
                await self._lockstep(conn, b"RSET\r\n", "RSET")
                return None
            self._phase = "DATA"
            asyncio.get_running_loop().call_soon(crash_point, "during_data")
            data_reply = await self._lockstep(conn, b"DATA\r\n", "DATA")
        assert data_reply is not None
        if not accepted:
            if data_reply.code == 354:
                protocol.write(b".\r\n")  # nobody to deliver to: a lone "."
                await protocol.read(timeout)  # its reply is ignored
            else:
                await self._lockstep(conn, b"RSET\r\n", "RSET")
            return None
        if data_reply.code != 354:
            failure = _Refused(data_reply.code, data_reply.message, "DATA")
            raise failure
        return await self._message_data(conn, progress, raw)

    async def _skip(self, conn: _Connection, count: int) -> SMTPResponse | None:
        """Read and drop ``count`` replies; the last one."""
        last = None
        for _ in range(count):
            last = await conn.protocol.read(self.config.command_timeout)
        return last

    async def _message_data(self, conn: _Connection, progress: _Progress,
                    raw: bytes) -> SMTPResponse | None:
        """The message data after the 354, then its final reply. Returns None when the
        transaction was accepted, else the refusal."""
        cfg = self.config
        protocol = conn.protocol
        unknown = None
        if progress.accepted is not None:
            unknown = progress.result((451, _OUTCOME_UNKNOWN))
            unknown.refused.update((rcpt, (451, _NOT_SENT)) for rcpt in progress.untried)
            self.partial = progress.result((451, _NOT_SENT))
        data = dot_stuffed(raw)
        self._phase = "DATA"
        if len(data) <= _DATA_BLOCK:
            # One write with the final ".": the outcome is unknown from this write on
            # (with a full socket buffer that is early, never late). No await between
            # the write and the read below.
            self.outcome_pending = True
            if unknown is not None:
                self.partial = unknown
            protocol.write(data + b".\r\n")
        else:
            for start in range(0, len(data), _DATA_BLOCK):
                protocol.write(data[start:start + _DATA_BLOCK])
                await protocol.drain(cfg.data_timeout)
            # The server can have the whole message from here on. No await between the
            # write and the read below.
            self.outcome_pending = True
            if unknown is not None:
                self.partial = unknown
            protocol.write(b".\r\n")
        reply = await protocol.read(cfg.final_reply_timeout)
        self.outcome_pending = False
        self._last_used = time.monotonic()
        if not 200 <= reply.code < 300:
            return reply
        progress.delivered += progress.batch
        progress.batch = []
        progress.accepted = reply
        self.partial = progress.result((451, _NOT_SENT))
        if progress.untried and self.checkpoint is not None:
            await self.checkpoint(self.partial)
            crash_point("between_transactions")
        return None

    async def _reset_conn(self) -> None:
        conn = self._conn
        if conn is None or not conn.protocol.usable:
            self._abort()
            return
        try:
            reply = await self._lockstep(conn, b"RSET\r\n", "RSET")
            if reply.code != 250 or conn.protocol.replies:
                self._abort()
        except (OSError, _Lost):
            self._abort()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        super()._abort()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._recycle = False
            if conn.protocol.usable:
                try:
                    conn.protocol.write(b"QUIT\r\n")
                    await conn.protocol.read(2)
                except (OSError, _Lost):
                    pass
                finally:
                    conn.protocol.transport.close()
            else:
                conn.abort()
        await super().close()
