"""Issue 9 items 2 and 3: what a relay's replies mean beyond their code. Policy replies
about the client (530 STARTTLS or authentication required, 5.7.x at MAIL) defer instead of
failing, loudly naming the setting; the common rate-limit and connection-limit wordings
are push-back. Each wording is checked against a real aiosmtpd scripted with the relay's
exact reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from ess_async import Manager
from ess_async.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from ess_async.replies import ReplyKind, classify
from ess_async.spool import decode_record
from ess_async.transports.smtp import SMTPTransport

from .conftest import SMTPServer, free_port, make_config
from .test_tls_auth import PASSWORD, authenticator, server_context


def raw(subject: str) -> bytes:
    return f"From: sender@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


@pytest.fixture
async def transport_for() -> AsyncIterator[Callable[..., SMTPTransport]]:
    made: list[SMTPTransport] = []

    def make(port: int, **values: object) -> SMTPTransport:
        config = make_config(port, transport={"smtp": {"port": port, **values}})
        made.append(transport := SMTPTransport(config.transport.smtp))
        return transport

    yield make
    for transport in made:
        await transport.close()


@pytest.fixture
def servers() -> Iterator[list[SMTPServer]]:
    started: list[SMTPServer] = []
    yield started
    for server in started:
        server.stop()


def script(server: SMTPServer, phase: str, reply: str) -> None:
    """Answer ``reply`` to the next MAIL, to RCPT of a@example.com, or at the end of the
    next message's data."""
    handler = server.handler
    if phase == "MAIL":
        handler.mail_replies.append(reply)
    elif phase == "RCPT":
        handler.rcpt_replies["a@example.com"] = [reply]
    else:
        handler.data_replies.append(reply)


def records(workspace: Path, *states: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for state in states
            for p in sorted((workspace / state).rglob("*.json"))]


# -- Item 3: push-back wordings ------------------------------------------------------------

PUSHBACK_REPLIES = [
    "450 4.7.1 Error: too much mail from 127.0.0.1",  # Postfix message rate limit
    "421 4.7.0 Error: too many connections from 127.0.0.1",  # Postfix connection limit
    "450 4.7.1 Error: too many recipients from 127.0.0.1",  # Postfix recipient rate limit
    "452 4.7.1 Error: too many messages from 127.0.0.1",
    "452 too many messages in this connection",
    "451 ratelimit exceeded",  # Exim
    "451 rate limit exceeded, try again later",  # Exim
    "451 Sender rate overlimit - 120.0 / 1h / per_rcpt",  # Exim ratelimit ACL
    "421 Too many concurrent SMTP connections; please try again later.",  # Exim
    "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77714)",  # Microsoft
    "421 4.7.0 Temporary System Problem. Try again later (10)",  # Microsoft / Google
    "421 4.7.0 Try again later, closing connection.",  # Google
    "450 4.7.28 Our system has detected an unusual rate of unsolicited mail originating "
    "from your IP address. To protect our users, mail has been temporarily rate limited.",
    "451 4.7.1 Please slow down",
    "450 4.7.0 Throttled: try again later",
    "421 4.3.2 Connection rate limit exceeded.",  # Sendmail
    "451 4.4.5 System congestion, too many connections",
]

NOT_PUSHBACK_REPLIES = [
    # Item 1's recipient limit: more transactions, not a slower client.
    "452 4.5.3 Error: too many recipients",
    # A rate about one recipient's mailbox (Google): that recipient alone waits.
    "450 4.2.1 The user you are trying to contact is receiving mail at a rate that "
    "prevents additional messages from being delivered.",
    "450 4.2.1 mailbox busy",
    "452 4.2.2 over quota",
    "451 4.3.0 Error: queue file write error",
    "450 4.7.1 <a@example.com>: Recipient address rejected: Greylisted, try again later",
]


@pytest.mark.parametrize("phase", ["MAIL", "RCPT", "DATA"])
@pytest.mark.parametrize("reply", PUSHBACK_REPLIES)
async def test_pushback_wordings(smtp_server: SMTPServer,
                                 transport_for: Callable[..., SMTPTransport],
                                 reply: str, phase: str) -> None:
    """Issue 9 item 3: each common relay rate-limit or connection-limit reply, at MAIL, RCPT
    or the end of the data, is push-back (the senders slow down), not just 421 and "too
    many"; nothing is delivered and the next message goes through."""
    script(smtp_server, phase, reply)
    transport = transport_for(smtp_server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send("sender@example.com", ["a@example.com"], raw("pushed back"))
    assert caught.value.pushback is True
    assert caught.value.destination is False
    assert caught.value.code == int(reply[:3])
    assert smtp_server.handler.messages == []
    result = await transport.send("sender@example.com", ["b@example.com"], raw("next"))
    assert result.code == 250


@pytest.mark.parametrize("reply", NOT_PUSHBACK_REPLIES)
async def test_not_pushback_at_rcpt(smtp_server: SMTPServer,
                                    transport_for: Callable[..., SMTPTransport],
                                    reply: str) -> None:
    """Issue 9 item 3: temporary replies about one recipient (its mailbox's rate, quota,
    greylisting) or about the recipient limit are not push-back: that recipient is
    deferred alone while the others get the message."""
    handler = smtp_server.handler
    handler.rcpt_replies["a@example.com"] = [reply]
    transport = transport_for(smtp_server.port)
    result = await transport.send("sender@example.com", ["b@example.com", "a@example.com"],
                                  raw("one deferred"))
    if classify(int(reply[:3]), reply[4:], "RCPT") is ReplyKind.RECIPIENT_LIMIT:
        # a@ met the limit: it went in a second transaction (the reply is consumed).
        assert result.refused == {}
        assert [m.rcpt_tos for m in handler.messages] == [["b@example.com"],
                                                          ["a@example.com"]]
    else:
        assert result.refused == {"a@example.com": (int(reply[:3]), reply[4:])}
        assert [m.rcpt_tos for m in handler.messages] == [["b@example.com"]]
    handler.rcpt_replies["a@example.com"] = [reply]
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send("sender@example.com", ["a@example.com"], raw("only one"))
    assert caught.value.pushback is False


def test_pushback_table() -> None:
    """Issue 9 item 3: the table in one place (ess_async.replies) classifies the wordings
    the same way at every step, and keeps the recipient limit and per-mailbox rates
    apart from push-back."""
    for reply in PUSHBACK_REPLIES:
        for phase in ("CONNECT", "MAIL", "RCPT", "DATA"):
            assert classify(int(reply[:3]), reply[4:], phase) is ReplyKind.PUSHBACK, reply
    assert classify(452, "4.5.3 Error: too many recipients", "RCPT") is \
        ReplyKind.RECIPIENT_LIMIT
    assert classify(452, "too many recipients", "RCPT") is ReplyKind.RECIPIENT_LIMIT
    assert classify(450, NOT_PUSHBACK_REPLIES[1][4:], "RCPT") is ReplyKind.RECIPIENT
    for reply in NOT_PUSHBACK_REPLIES:
        assert classify(int(reply[:3]), reply[4:], "RCPT") is not ReplyKind.PUSHBACK


async def test_too_much_mail_slows_the_senders(tmp_path: Path,
                                               smtp_server: SMTPServer) -> None:
    """Issue 9 item 3: Postfix's smtpd_client_message_rate_limit reply ("450 4.7.1 Error:
    too much mail from 127.0.0.1") makes the Manager slow down (fewer concurrent sends),
    where it used to keep sending at full speed."""
    handler = smtp_server.handler
    handler.mail_replies.append("450 4.7.1 Error: too much mail from 127.0.0.1")
    async with Manager(tmp_path / "ws", spawn=4, config=make_config(smtp_server.port)) \
            as manager:
        run = manager._run
        assert run is not None
        throttle = run.dispatcher.throttle
        assert throttle.limit == 4
        paths = [await manager.create_work(to="a@example.com", subject=f"m{i}")
                 for i in range(6)]
        for path in paths:
            await manager.wait(path, timeout=30)
        # One push-back halved the concurrency; 6 successes do not earn it back.
        assert throttle.limit < 4
    assert sorted(handler.subjects()) == sorted(f"m{i}" for i in range(6))


# -- Item 2: policy replies about the client -----------------------------------------------

CLIENT_POLICY_REPLIES = [
    ("530 5.7.0 Must issue a STARTTLS command first", "[transport.smtp] tls"),  # Postfix
    ("530 Must issue a STARTTLS command first", "[transport.smtp] tls"),  # aiosmtpd
    ("530 5.7.0 Authentication required", "[transport.smtp] username"),
    ("530 5.7.57 Client not authenticated to send mail during MAIL FROM",  # Microsoft
     "[transport.smtp] username"),
    ("553 5.7.1 <sender@example.com>: Sender address rejected: not logged in",  # Postfix
     "[transport.smtp] username"),
    ("550 5.7.1 Relay access denied", "relays for this host"),
    ("554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied",
     "relays for this host"),
    ("450 4.7.1 Client host rejected: cannot find your hostname, [127.0.0.1]",
     "relays for this host"),
]


@pytest.mark.parametrize(("reply", "names"), CLIENT_POLICY_REPLIES)
async def test_client_policy_at_mail_is_a_destination_failure(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport],
        reply: str, names: str) -> None:
    """Issue 9 item 2: a 530 or 5.7.x policy reply to MAIL that concerns the client (TLS
    or authentication required, relaying denied to this host) is a temporary,
    destination-level failure whose message names the setting to fix, never a
    permanent failure of the message."""
    smtp_server.handler.mail_replies.append(reply)
    transport = transport_for(smtp_server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send("sender@example.com", ["a@example.com"], raw("policy"))
    error = caught.value
    assert (error.destination, error.phase, error.code) == (True, "MAIL", int(reply[:3]))
    assert error.temporary is True and error.pushback is False
    assert names in error.message and reply[4:] in error.message


async def test_starttls_required_leaves_messages_queued(
        tmp_path: Path, smtp_server: SMTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9 item 2: with tls = "none" against a relay that requires TLS (Postfix's "530
    5.7.0 Must issue a STARTTLS command first"), no message goes to failed/; they stay
    deferred (or queued) with an error naming [transport.smtp] tls, logged at ERROR once
    for the connection."""
    handler = smtp_server.handler
    handler.mail_replies.extend(["530 5.7.0 Must issue a STARTTLS command first"] * 10)
    manager = Manager(tmp_path / "ws", spawn=1, config=make_config(smtp_server.port))
    for i in range(3):
        await manager.create_work(to="a@example.com", subject=f"m{i}")
    with caplog.at_level(logging.ERROR, logger="ess_async.transports.smtp"):
        summary = await manager.process_workload()
    assert summary.failed == 0 and summary.passed == 0
    ws = tmp_path / "ws"
    assert records(ws, "failed") == []
    waiting = records(ws, "deferred", "queued")
    assert len(waiting) == 3
    # Deferred with the error, or put back uncharged while the destination is backed off.
    errors = [r["last_error"]["message"] for r in waiting if r.get("last_error")]
    assert all("[transport.smtp] tls" in e for e in errors)
    logged = [r for r in caplog.records if r.name == "ess_async.transports.smtp"
              and r.levelno == logging.ERROR]
    assert len(logged) == 1 and "[transport.smtp] tls" in logged[0].getMessage()
    assert handler.messages == []


async def test_policy_error_logged_once_per_connection(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport],
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9 item 2: the loud ERROR is logged once per connection, not per message."""
    smtp_server.handler.mail_replies.extend(["530 5.7.0 Authentication required"] * 3)
    transport = transport_for(smtp_server.port)
    with caplog.at_level(logging.ERROR, logger="ess_async.transports.smtp"):
        for _ in range(2):
            with pytest.raises(TemporaryDeliveryError):
                await transport.send("sender@example.com", ["a@example.com"], raw("x"))
        assert len(caplog.records) == 1
        await transport.close()
        with pytest.raises(TemporaryDeliveryError):
            await transport.send("sender@example.com", ["a@example.com"], raw("x"))
        assert len(caplog.records) == 2
    assert all("[transport.smtp] username" in r.getMessage() for r in caplog.records)


async def test_real_starttls_and_auth_requirements(
        servers: list[SMTPServer], transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 9 item 2: aiosmtpd's own require_starttls and auth_required replies (530 at
    MAIL) are destination-level failures naming the setting."""
    ca = trustme.CA()
    servers.append(tls := SMTPServer(tls_context=server_context(ca, "127.0.0.1"),
                                     require_starttls=True))
    servers.append(auth := SMTPServer(authenticator=authenticator, auth_required=True))
    for server in servers:
        server.start()
    for server, names in ((tls, "[transport.smtp] tls"), (auth, "[transport.smtp] username")):
        transport = transport_for(server.port)
        with pytest.raises(TemporaryDeliveryError) as caught:
            await transport.send("sender@example.com", ["a@example.com"], raw("x"))
        assert caught.value.destination is True and caught.value.code == 530
        assert names in caught.value.message
        assert server.handler.messages == []


@pytest.mark.parametrize(("phase", "reply"), [
    # About the envelope sender (a message may set it), not the client: the message's.
    ("MAIL", "554 5.7.1 <sender@example.com>: Sender address rejected: Access denied"),
    # At RCPT, 5.7.1 refuses that recipient (Postfix's reject_unauth_destination).
    ("RCPT", "554 5.7.1 <a@example.com>: Relay access denied"),
    # Content policy at the end of the data.
    ("DATA", "550 5.7.1 Message rejected as spam"),
])
async def test_message_level_policy_replies_still_fail(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport],
        phase: str, reply: str) -> None:
    """Issue 9 item 2, the other side: 5.7.x replies about the message, its sender or a
    recipient are still permanent failures of the message, not of the destination."""
    script(smtp_server, phase, reply)
    transport = transport_for(smtp_server.port)
    with pytest.raises(PermanentDeliveryError) as caught:
        await transport.send("sender@example.com", ["a@example.com"], raw("x"))
    assert caught.value.destination is False and caught.value.phase == phase


async def test_relay_denied_at_rcpt_refuses_that_recipient(
        smtp_server: SMTPServer, transport_for: Callable[..., SMTPTransport]) -> None:
    """Issue 9 item 2: "Relay access denied" at RCPT refuses that recipient only."""
    smtp_server.handler.rcpt_replies["a@example.com"] = \
        "554 5.7.1 <a@example.com>: Relay access denied"
    transport = transport_for(smtp_server.port)
    result = await transport.send("sender@example.com", ["a@example.com", "b@example.com"],
                                  raw("x"))
    assert result.refused == {"a@example.com": (554, "5.7.1 <a@example.com>: Relay access "
                                                     "denied")}
    assert smtp_server.handler.messages[0].rcpt_tos == ["b@example.com"]


# -- Connection-level failures are destination failures -----------------------------------

async def greeting_server(greeting: bytes) -> asyncio.Server:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


async def test_connect_failures_are_destination_failures(
        smtp_server: SMTPServer, servers: list[SMTPServer],
        transport_for: Callable[..., SMTPTransport],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 items 2 and 4-6: failures before any transaction (refused connection, a
    421 greeting, STARTTLS not offered, bad credentials) are marked ``destination``
    (phase CONNECT), so the sender backs off the relay instead of charging the message;
    Postfix's 421 "too many connections" greeting is push-back as well."""
    errors: list[DeliveryError] = []

    async def attempt(transport: SMTPTransport) -> None:
        with pytest.raises(TemporaryDeliveryError) as caught:
            await transport.send("sender@example.com", ["a@example.com"], raw("x"))
        errors.append(caught.value)

    await attempt(transport_for(free_port()))  # nothing listening
    server = await greeting_server(
        b"421 4.7.0 mail.example.com Error: too many connections from 127.0.0.1\r\n")
    try:
        await attempt(transport_for(server.sockets[0].getsockname()[1]))
    finally:
        server.close()
        await server.wait_closed()
    await attempt(transport_for(smtp_server.port, tls="starttls"))  # STARTTLS not offered
    servers.append(auth := SMTPServer(authenticator=authenticator, auth_require_tls=False))
    auth.start()
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong-" + PASSWORD)
    await attempt(transport_for(auth.port, username="app", password_env="TEST_SMTP_PASSWORD",
                                allow_plaintext_auth=True))
    assert [(e.destination, e.phase) for e in errors] == [(True, "CONNECT")] * 4
    assert errors[1].pushback is True and errors[1].code == 421
    assert "authentication failed" in errors[3].message
    assert smtp_server.handler.messages == [] and auth.handler.messages == []
