"""The SMTP transport's protocol edges (issue 8): every exception inside a transaction
leaves the connection clean, per-phase timeouts, the DATA split (what is outcome unknown
and what is not), ``outcome_pending`` under cancellation, and connection recycling that
never stands between a final 250 and the caller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ess_async import Manager
from ess_async.config import SmtpConfig, parse_config
from ess_async.errors import PermanentDeliveryError, TemporaryDeliveryError
from ess_async.transports.smtp import SMTPTransport

from .conftest import SMTPServer, make_config


def smtp_config(port: int, **values: object) -> SmtpConfig:
    return make_config(port, transport={"smtp": {"port": port, **values}}).transport.smtp


def raw(subject: str) -> bytes:
    return f"From: sender@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


@pytest.fixture
async def transport_for() -> AsyncIterator[Callable[..., SMTPTransport]]:
    made: list[SMTPTransport] = []

    def make(port: int, **values: object) -> SMTPTransport:
        made.append(transport := SMTPTransport(smtp_config(port, **values)))
        return transport

    yield make
    for transport in made:
        await transport.close()


# -- Item 9: an exception inside a transaction ---------------------------------------------

@pytest.mark.parametrize(("bad", "error"), [
    # Not ASCII, and the record says no smtputf8: refused before MAIL FROM.
    ("j\u00fcrgen@example.com", PermanentDeliveryError),
    # A control character, which aiosmtplib refuses in the middle of the transaction
    # (an unexpected exception: it propagates once the connection is dropped).
    ("a\x01b@example.com", ValueError),
])
async def test_hostile_record_does_not_fail_the_next_message(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport],
        bad: str, error: type[Exception]) -> None:
    """Issue 8 item 9: an exception raised inside a transaction (after MAIL FROM) leaves
    the connection reset or closed, so the next, innocent message on the same transport is
    delivered instead of meeting 503 nested MAIL and failing permanently."""
    transport = transport_for(smtp_server.port)
    with pytest.raises(error):
        await transport.send("sender@example.com", ["ok@example.com", bad], raw("hostile"),
                             smtputf8=False)
    result = await transport.send("sender@example.com", ["next@example.com"], raw("innocent"))
    assert result.code == 250
    assert smtp_server.handler.subjects() == ["innocent"]
    assert smtp_server.handler.messages[0].rcpt_tos == ["next@example.com"]


# -- Item 11: per-phase timeouts -----------------------------------------------------------

async def test_final_reply_may_take_longer_than_a_command(tmp_path: Path,
                                                          smtp_server: SMTPServer) -> None:
    """Issue 8 item 11: a server taking longer over the reply to the final "." than the
    command timeout allows (but within final_reply_timeout) delivers the message once and
    it is recorded passed, where one timeout for everything made it outcome unknown and
    sent it again."""
    smtp_server.handler.delays["DATA"] = 1.0
    config = make_config(smtp_server.port, transport={"smtp": {
        "port": smtp_server.port, "connect_timeout": 5, "command_timeout": 0.3,
        "final_reply_timeout": 5}})
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="slow final reply")
    summary = await manager.process_workload()
    assert summary.passed == 1 and summary.deferred == 0
    assert smtp_server.handler.subjects() == ["slow final reply"]
    assert manager.status()["passed"] == 1


def test_timeout_keys_and_legacy_timeout() -> None:
    """Issue 8 item 11: the per-phase timeouts have RFC 5321 defaults; the old single
    ``timeout`` only stands in for connect_timeout and command_timeout, never for the
    final reply (an explicit per-phase key wins)."""
    defaults = SmtpConfig()
    assert (defaults.connect_timeout, defaults.command_timeout, defaults.data_timeout,
            defaults.final_reply_timeout) == (30, 300, 180, 600)
    legacy = parse_config({"transport": {"smtp": {"timeout": 10, "command_timeout": 60}}})
    smtp = legacy.transport.smtp
    assert (smtp.connect_timeout, smtp.command_timeout, smtp.data_timeout,
            smtp.final_reply_timeout) == (10, 60, 180, 600)
    for key in ("timeout", "connect_timeout", "command_timeout", "data_timeout",
                "final_reply_timeout"):
        with pytest.raises(ValueError, match=f"transport.smtp.{key}: must be positive"):
            parse_config({"transport": {"smtp": {key: 0}}})


# -- A scripted server for what aiosmtpd will not do ---------------------------------------

class ScriptedServer:
    """A loopback SMTP server answering every command with 250 except DATA, where
    ``on_data`` decides: "close" hangs up instead of answering, "stop_reading" answers 354
    and then reads nothing more."""

    def __init__(self, on_data: str) -> None:
        self.on_data = on_data
        self.port = 0
        self._server: asyncio.Server | None = None
        self._done = asyncio.Event()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._done.set()
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 scripted\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-scripted\r\n250 8BITMIME\r\n")
                elif verb == b"DATA" and self.on_data == "close":
                    return
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await self._done.wait()
                    return
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_connection_lost_before_354_is_not_outcome_unknown(
        transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 8 item 12: a connection lost in answer to the DATA command (before the 354,
    so no message data was sent) is a plain temporary failure, not outcome unknown."""
    async with ScriptedServer("close") as server:
        transport = transport_for(server.port)
        with pytest.raises(TemporaryDeliveryError) as caught:
            await transport.send("sender@example.com", ["a@example.com"], raw("m"))
    assert caught.value.phase == "DATA"
    assert caught.value.outcome_unknown is False
    assert transport.outcome_pending is False


async def test_data_timeout_before_the_end_of_data_is_not_outcome_unknown(
        transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 8 item 11: writing the message data has its own timeout (data_timeout), and
    a server that stops taking the data before its end was written cannot have the
    message: a temporary failure, not outcome unknown."""
    async with ScriptedServer("stop_reading") as server:
        transport = transport_for(server.port, data_timeout=0.5, final_reply_timeout=600)
        # More than the loopback socket buffers hold, so the writes must wait.
        big = raw("big") + (b"x" * 76 + b"\r\n") * (32 * 1024 * 1024 // 78)
        with pytest.raises(TemporaryDeliveryError) as caught:
            await asyncio.wait_for(
                transport.send("sender@example.com", ["a@example.com"], big), 60)
    assert caught.value.phase == "DATA"
    assert caught.value.outcome_unknown is False


# -- outcome_pending under cancellation (item 3a) ------------------------------------------

async def cancel_when_held(smtp_server: SMTPServer, send: Awaitable[object]) -> None:
    task = asyncio.ensure_future(send)
    held = await asyncio.to_thread(smtp_server.handler.held.wait, 30)
    assert held, "the server never got the held command"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_while_waiting_for_final_reply_leaves_outcome_pending(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 8 item 3(a): a send cancelled while waiting for the reply to the final "."
    says so (``outcome_pending`` stays True), so the sender records the message as outcome
    unknown instead of requeueing it as never sent; the connection is dropped, and the
    transport works again for the next message."""
    smtp_server.handler.hold.add("DATA")
    transport = transport_for(smtp_server.port)
    await cancel_when_held(smtp_server, transport.send(
        "sender@example.com", ["a@example.com"], raw("cut off")))
    assert transport.outcome_pending is True
    smtp_server.handler.hold.clear()
    smtp_server.handler.release.set()
    result = await transport.send("sender@example.com", ["b@example.com"], raw("next"))
    assert result.code == 250
    assert transport.outcome_pending is False  # reset by each send
    assert "next" in smtp_server.handler.subjects()


async def test_cancel_before_the_data_leaves_no_outcome_pending(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 8 item 3(a), the other side: cancelled while waiting for a RCPT reply,
    nothing can have been delivered (``outcome_pending`` False), and the half-open
    transaction is not left for the next message."""
    smtp_server.handler.hold.add("RCPT")
    transport = transport_for(smtp_server.port)
    await cancel_when_held(smtp_server, transport.send(
        "sender@example.com", ["a@example.com"], raw("never")))
    assert transport.outcome_pending is False
    smtp_server.handler.hold.clear()
    smtp_server.handler.release.set()
    result = await transport.send("sender@example.com", ["b@example.com"], raw("next"))
    assert result.code == 250
    assert smtp_server.handler.subjects() == ["next"]


# -- Item 3(b): recycling a connection never delays the 250 ---------------------------------

async def test_recycled_connection_closes_after_returning(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 8 item 3(b): with max_messages_per_connection, send() returns the final 250
    without sending QUIT first (a cancel there lost the 250); the connection is closed at
    the next send, which uses a new one."""
    handler = smtp_server.handler
    transport = transport_for(smtp_server.port, max_messages_per_connection=1)
    assert (await transport.send("sender@example.com", ["a@example.com"], raw("1"))).code == 250
    assert handler.quits == []  # returned before any QUIT
    assert (await transport.send("sender@example.com", ["b@example.com"], raw("2"))).code == 250
    assert handler.quits == handler.peers[:1]  # the first connection, closed by the second send
    assert len(set(handler.peers)) == 2
    await transport.close()
    assert handler.quits == handler.peers


async def _garbled_final_server(received: list[bytes],
                                writers: list[asyncio.StreamWriter]) -> asyncio.Server:
    """A server that reads a whole message and answers its end of data with garbage."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"220 raw ESMTP\r\n")
        data: list[bytes] | None = None
        while line := await reader.readline():
            if data is not None:
                if line == b".\r\n":
                    received.append(b"".join(data))
                    data = None
                    writer.write(b"XYZ garbled\r\n")
                else:
                    data.append(line)
            elif line[:4].upper() in (b"EHLO", b"HELO"):
                writer.write(b"250-raw\r\n250 SIZE 1000000\r\n")
            elif line[:4].upper() == b"DATA":
                data = []
                writer.write(b"354 go\r\n")
            elif line[:4].upper() == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


async def test_garbled_reply_to_the_end_of_data_is_outcome_unknown() -> None:
    """Issue 8 item 11 (review): the server read the whole message and answered its end of
    data with something unparseable: outcome unknown (the old code made it a plain retry,
    resent with no mark and the normal backoff)."""
    received: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []
    server = await _garbled_final_server(received, writers)
    port = server.sockets[0].getsockname()[1]
    transport = SMTPTransport(make_config(port, transport={"smtp": {
        "port": port, "pipelining": "off"}}).transport.smtp)
    try:
        with pytest.raises(TemporaryDeliveryError) as info:
            await transport.send("a@example.com", ["b@example.com"],
                                 b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n")
    finally:
        await transport.close()
        server.close()
        for writer in writers:  # the server's side of the connection, too
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()
    assert len(received) == 1
    assert info.value.outcome_unknown is True
