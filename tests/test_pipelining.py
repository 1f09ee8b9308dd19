"""Issue 11 item 1: a pipelining SMTP sender (RFC 2920). MAIL, every RCPT and DATA in one
write when the server offers PIPELINING, with every guarantee of the one-command-at-a-time
transport: per-recipient replies, recipient-limit splitting, the outcome-unknown window,
cancellation, and never the body before the 354.

The scripted ``PipeliningServer`` checks the wire; the aiosmtpd tests of
test_smtp_protocol.py and test_recipient_limits.py run again here against an aiosmtpd
that advertises PIPELINING (it reads pipelined commands in order), with this transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ess_async.config import SmtpConfig
from ess_async.errors import PermanentDeliveryError, TemporaryDeliveryError
from ess_async.transports import PipeliningTransport, SMTPTransport, create_transport
from ess_async.transports.base import SendResult

from . import test_crash as crash
from . import test_recipient_limits as limits
from . import test_smtp_protocol as protocol
from .conftest import RecordingHandler, SMTPServer, make_config
from .pipelining_server import PipeliningServer

FROM = "sender@example.com"


def smtp_config(port: int, **values: object) -> SmtpConfig:
    return make_config(port, transport={"smtp": {"port": port, **values}}).transport.smtp


def raw(subject: str, body: bytes = b"body\r\n") -> bytes:
    return f"From: {FROM}\r\nSubject: {subject}\r\n\r\n".encode() + body


@pytest.fixture
async def server() -> AsyncIterator[PipeliningServer]:
    async with PipeliningServer() as srv:
        yield srv


@pytest.fixture
async def transport_for() -> AsyncIterator[Callable[..., PipeliningTransport]]:
    made: list[PipeliningTransport] = []

    def make(port: int, **values: object) -> PipeliningTransport:
        made.append(transport := PipeliningTransport(smtp_config(port, **values)))
        return transport

    yield make
    for transport in made:
        await transport.close()


# -- The wire ------------------------------------------------------------------------------

async def test_envelope_goes_in_one_write(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: MAIL + RCPT x n + DATA reach the server in one write (one chunk),
    the body only after the 354; each message delivered once. (SMTPTransport sends one
    command per write: this fails with it.)"""
    transport = transport_for(server.port)
    to = ["a@example.com", "b@example.com", "c@example.com"]
    for n in range(3):
        result = await transport.send(FROM, to, raw(f"m{n}"))
        assert result == SendResult(250, "2.0.0 Ok", {})
    envelope = (b"MAIL FROM:<sender@example.com> SIZE=%d\r\n" % len(raw("m0"))
                + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in to) + b"DATA\r\n")
    assert server.chunks.count(envelope) == 3
    assert server.violations == []
    assert server.subjects() == ["m0", "m1", "m2"]
    assert all(m.rcpt_tos == to for m in server.messages)
    assert server.connections == 1


async def test_body_never_before_354(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: with a slow 354 (and a large body written in blocks), not one byte
    of the message arrives before the server said 354."""
    server.data_delay = 0.2
    transport = transport_for(server.port)
    big = raw("big", b"x" * 76 + b"\r\n") + (b"y" * 76 + b"\r\n") * 3000
    await transport.send(FROM, ["a@example.com"], big)
    await transport.send(FROM, ["a@example.com"], raw("small"))
    assert server.violations == []
    assert server.subjects() == ["big", "small"]
    assert len(server.messages[0].data) == len(big)


async def test_options_size_smtputf8(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: SIZE= always (the server offers SIZE); SMTPUTF8 and
    BODY=8BITMIME for a UTF-8 message."""
    transport = transport_for(server.port)
    message = "Subject: \u00fc\r\n\r\nb\r\n".encode()
    await transport.send(FROM, ["j\u00fcrgen@example.com"], message, smtputf8=True)
    assert server.commands[1] == (f"MAIL FROM:<{FROM}> SIZE={len(message)} SMTPUTF8 "
                                  "BODY=8BITMIME")
    assert server.messages[0].rcpt_tos == ["j\u00fcrgen@example.com"]


async def test_dot_stuffing(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: lines starting with "." are stuffed (the server gets them back
    as they were), bare LF become CRLF, and a lone "." line does not end the data."""
    transport = transport_for(server.port)
    body = b".first\r\n.\r\nmiddle\n..two\r\nlast"
    await transport.send(FROM, ["a@example.com"], raw("dots", body))
    assert server.messages[0].data == raw("dots", b".first\r\n.\r\nmiddle\r\n..two\r\nlast\r\n")


# -- Per-recipient replies, DATA -----------------------------------------------------------

async def test_per_recipient_outcomes(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: each recipient's reply in the pipelined group is its own: 2xx
    delivered, 4xx and 5xx in ``refused`` with their reply."""
    server.rcpt_replies = {"b@example.com": "450 4.2.1 mailbox busy",
                           "c@example.com": "550 5.1.1 no such user"}
    transport = transport_for(server.port)
    result = await transport.send(FROM, ["a@example.com", "b@example.com", "c@example.com",
                                         "d@example.com"], raw("some"))
    assert result.refused == {"b@example.com": (450, "4.2.1 mailbox busy"),
                              "c@example.com": (550, "5.1.1 no such user")}
    assert server.messages[0].rcpt_tos == ["a@example.com", "d@example.com"]


async def test_all_refused_gets_a_lone_dot_after_354(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: nobody accepted and the DATA answered 354: a lone "." (its reply
    ignored), nothing delivered, the error says who was refused; the next message is
    delivered on the same connection."""
    server.rcpt_replies = {"a@example.com": "550 5.1.1 no such user",
                           "b@example.com": "451 4.3.0 try later"}
    transport = transport_for(server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send(FROM, ["a@example.com", "b@example.com"], raw("none"))
    assert caught.value.refused == {"a@example.com": (550, "5.1.1 no such user"),
                                    "b@example.com": (451, "4.3.0 try later")}
    assert b".\r\n" in server.chunks
    assert server.messages == []
    server.rcpt_replies = {}
    assert (await transport.send(FROM, ["c@example.com"], raw("next"))).code == 250
    assert server.subjects() == ["next"] and server.connections == 1


async def test_all_refused_and_data_refused_resets(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: nobody accepted and DATA refused: RSET, a permanent error."""
    server.rcpt_replies = {"a@example.com": "550 5.1.1 no such user"}
    server.data_replies.append("554 5.5.1 Error: no valid recipients")
    transport = transport_for(server.port)
    with pytest.raises(PermanentDeliveryError):
        await transport.send(FROM, ["a@example.com"], raw("none"))
    assert server.commands[-1] == "RSET"
    server.rcpt_replies = {}
    assert (await transport.send(FROM, ["c@example.com"], raw("next"))).code == 250


async def test_data_reply_other_than_354_is_a_data_failure(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: a reply other than 354 to DATA (recipients accepted) is a DATA
    failure; no body is sent; the transaction is reset for the next message."""
    server.data_replies.append("554 5.7.1 you are not welcome")
    transport = transport_for(server.port)
    with pytest.raises(PermanentDeliveryError) as caught:
        await transport.send(FROM, ["a@example.com"], raw("refused"))
    assert (caught.value.code, caught.value.phase) == (554, "DATA")
    assert server.commands[-1] == "RSET"
    assert (await transport.send(FROM, ["c@example.com"], raw("next"))).code == 250
    assert server.subjects() == ["next"]


async def test_client_policy_at_mail_is_a_destination_error(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: 550 5.7.1 at MAIL (the RCPTs and DATA then get 503) is about the
    client: destination=True, never the message's failure."""
    server.mail_replies.append("550 5.7.1 Relay access denied")
    transport = transport_for(server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send(FROM, ["a@example.com", "b@example.com"], raw("denied"))
    assert caught.value.destination is True and caught.value.phase == "MAIL"
    assert (await transport.send(FROM, ["c@example.com"], raw("next"))).code == 250


async def test_recipient_limit_splits_with_checkpoints(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: 25 recipients through a limit of 10: three pipelined transactions
    on one connection, each delivered once, ``checkpoint`` awaited after the first two."""
    server.rcpt_limit = 10
    transport = transport_for(server.port)
    seen: list[SendResult] = []

    async def checkpoint(partial: SendResult) -> None:
        seen.append(partial)

    transport.checkpoint = checkpoint
    to = [f"r{i:02d}@example.com" for i in range(25)]
    result = await transport.send(FROM, to, raw("to 25"))
    assert result.refused == {}
    assert [m.rcpt_tos for m in server.messages] == [to[:10], to[10:20], to[20:]]
    assert [len(p.refused) for p in seen] == [15, 5]
    assert server.connections == 1 and server.violations == []


# -- Lost connections, cancellation --------------------------------------------------------

async def test_connection_lost_after_the_dot_is_outcome_unknown(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: the connection lost after the final "." was written and before
    its reply: outcome unknown (the server has the message here)."""
    server.final_replies.append("DROP")
    transport = transport_for(server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send(FROM, ["a@example.com"], raw("dropped"))
    assert caught.value.outcome_unknown is True and caught.value.phase == "DATA"
    assert transport.outcome_pending is True
    assert (await transport.send(FROM, ["a@example.com"], raw("next"))).code == 250
    assert transport.outcome_pending is False


async def test_connection_lost_before_the_data_is_not_outcome_unknown(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: the connection lost in answer to the pipelined group (before the
    354): a plain temporary failure, not outcome unknown."""
    server.close_on_data = True
    transport = transport_for(server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send(FROM, ["a@example.com"], raw("lost"))
    assert caught.value.outcome_unknown is False
    assert transport.outcome_pending is False


async def test_cancel_waiting_for_the_final_reply_leaves_outcome_pending(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: cancelled while the final reply is awaited: ``outcome_pending``
    True; the connection is dropped and the next send works."""
    server.final_replies.append("HOLD")
    transport = transport_for(server.port)
    task = asyncio.ensure_future(transport.send(FROM, ["a@example.com"], raw("held")))
    await asyncio.wait_for(server.final_seen.wait(), 10)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.outcome_pending is True and transport.partial is None
    assert (await transport.send(FROM, ["b@example.com"], raw("next"))).code == 250
    assert server.connections == 2


async def test_cancel_waiting_for_354_leaves_nothing_pending(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: cancelled while the replies to the group are awaited (the 354 is
    slow): nothing can have been delivered, ``outcome_pending`` False, and the half-open
    transaction is not left for the next message."""
    server.data_delay = 5
    transport = transport_for(server.port)
    task = asyncio.ensure_future(transport.send(FROM, ["a@example.com"], raw("never")))
    for _ in range(500):
        if "DATA" in server.commands:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.outcome_pending is False and transport.partial is None
    server.data_delay = 0.01
    assert (await transport.send(FROM, ["b@example.com"], raw("next"))).code == 250
    assert server.subjects() == ["next"] and server.violations == []


# -- Fallbacks -----------------------------------------------------------------------------

async def test_broken_pipelining_falls_back_without_sending_twice(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport],
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11 item 1: a server that advertises PIPELINING and answers a pipelined group
    with 503s: pipelining is turned off for that connection, the transaction is reset and
    sent again one command at a time; the message is delivered exactly once."""
    server.reject_pipelined = True
    transport = transport_for(server.port)
    with caplog.at_level(logging.WARNING):
        result = await transport.send(FROM, ["a@example.com", "b@example.com"], raw("once"))
    assert result == SendResult(250, "2.0.0 Ok", {})
    assert "pipelining turned off" in caplog.text
    assert server.subjects() == ["once"] and server.violations == []
    assert (await transport.send(FROM, ["c@example.com"], raw("again"))).code == 250
    assert server.subjects() == ["once", "again"] and server.connections == 1
    # The second message went one command at a time.
    envelope = [c for c in server.chunks if c.startswith((b"MAIL", b"RCPT", b"DATA"))]
    assert envelope[-3:] == [b"MAIL FROM:<sender@example.com> SIZE=%d\r\n" % len(raw("again")),
                             b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n"]


async def test_no_pipelining_offered_means_one_command_at_a_time(
        transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: a server without PIPELINING in its EHLO gets SMTPTransport's
    one command per write."""
    async with PipeliningServer(extensions=("SIZE 1000000", "8BITMIME")) as server:
        transport = transport_for(server.port)
        assert (await transport.send(FROM, ["a@example.com", "b@example.com"],
                                     raw("lockstep"))).code == 250
    envelope = [c for c in server.chunks if c.startswith((b"MAIL", b"RCPT", b"DATA"))]
    assert len(envelope) == 4 and all(c.count(b"\r\n") == 1 for c in envelope)
    assert server.subjects() == ["lockstep"]


def test_config_key_selects_the_transport(tmp_path: Path) -> None:
    """Issue 11 item 1: ``[transport.smtp] pipelining`` is "auto" by default (the
    pipelining transport), "off" gives SMTPTransport; anything else is a ConfigError."""
    assert SmtpConfig().pipelining == "auto"
    auto = make_config(25).transport
    assert type(create_transport(auto, tmp_path)) is PipeliningTransport
    off = make_config(25, transport={"smtp": {"pipelining": "off"}}).transport
    assert type(create_transport(off, tmp_path)) is SMTPTransport
    with pytest.raises(ValueError, match="pipelining"):
        make_config(25, transport={"smtp": {"pipelining": "yes"}})


# -- The existing aiosmtpd tests, on the pipelined path -------------------------------------

@dataclass
class PipeliningHandler(RecordingHandler):
    """aiosmtpd's handler, advertising PIPELINING (aiosmtpd reads pipelined commands in
    order; it never checks them)."""

    ehlos: int = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.ehlos += 1
        return [responses[0], "250-PIPELINING", *responses[1:]]


@pytest.fixture
def smtp_server() -> Iterator[SMTPServer]:
    """Overrides conftest's: the same aiosmtpd server, offering PIPELINING."""
    server = SMTPServer()
    server.handler = PipeliningHandler()
    server.start()
    yield server
    server.stop()


async def test_aiosmtpd_with_pipelining_takes_the_pipelined_path(
        smtp_server: SMTPServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1: against the PIPELINING-advertising aiosmtpd the transport really
    pipelines (its connection is taken over), so the tests reused below test that path."""
    transport = transport_for(smtp_server.port)
    assert (await transport.send(FROM, ["a@example.com"], raw("x"))).code == 250
    assert transport._conn is not None and transport._smtp is None


async def test_limit_at_a_later_groups_first_rcpt(
        smtp_server: SMTPServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1 (test_limit_at_the_first_rcpt_ends_the_send, pipelined): a
    recipient that always meets the limit is refused with that 4xx; the others of its
    group had their own RCPT in the same write, so one accepted there is delivered (once)
    where the one-at-a-time path stopped at the limit and deferred it. No loop."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    to = [f"r{i:02d}@example.com" for i in range(4)]
    handler.rcpt_replies[to[2]] = "452 4.5.3 Error: too many recipients"
    transport = transport_for(smtp_server.port)
    result = await transport.send(FROM, to, raw("stuck"))
    assert result.refused == {to[2]: (452, "4.5.3 Error: too many recipients")}
    assert [m.rcpt_tos for m in handler.messages] == [to[:2], to[3:]]


# Reused as they are (their ``smtp_server`` and ``transport_for`` fixtures resolve to the
# ones above): per-phase timeouts, cancellation, recycling, hostile records, and the
# recipient-limit semantics.
test_reused_hostile_record = protocol.test_hostile_record_does_not_fail_the_next_message
test_reused_cancel_final_reply = \
    protocol.test_cancel_while_waiting_for_final_reply_leaves_outcome_pending
test_reused_cancel_before_data = protocol.test_cancel_before_the_data_leaves_no_outcome_pending
test_reused_recycled = protocol.test_recycled_connection_closes_after_returning
test_reused_limit_wordings = limits.test_limit_wordings
test_reused_refusals_in_batches = limits.test_real_refusals_within_batches_are_kept
test_reused_later_refused = limits.test_later_transaction_refused_returns_what_was_delivered
test_reused_later_5xx = limits.test_later_transaction_5xx_is_recorded
test_reused_lost_after_later_data = \
    limits.test_connection_lost_after_later_data_is_outcome_unknown_for_that_batch
test_reused_lost_at_later_mail = limits.test_connection_lost_at_a_later_mail_is_not_sent
test_reused_cancel_later = limits.test_cancel_during_a_later_transaction_keeps_the_earlier_delivery
test_reused_nothing_accepted = limits.test_nothing_accepted_still_raises
# Processes killed at each crash point (after_mail_from, during_data, after_250, ...) with
# the pipelined path in use: nothing lost, no duplicate but after_250's one.
test_reused_crash_while_delivering = crash.test_crash_while_delivering


async def test_421_at_a_pipelined_mail_is_push_back(
        server: PipeliningServer, transport_for: Callable[..., PipeliningTransport]) -> None:
    """Issue 11 item 1 / issue 9 item 4 (review): a 421 to a pipelined MAIL, the server
    then closing, is push-back at MAIL (uncharged), as one command at a time; it was lost
    as "connection lost during MAIL" and charged as an attempt."""
    server.mail_replies.append("421 4.7.0 Try again later, closing connection")
    transport = transport_for(server.port)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await transport.send(FROM, ["a@example.com"], raw("pushed back"))
    assert (caught.value.code, caught.value.pushback, caught.value.phase) == (421, True, "MAIL")
    assert (await transport.send(FROM, ["b@example.com"], raw("next"))).code == 250
