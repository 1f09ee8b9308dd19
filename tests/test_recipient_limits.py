"""Issue 9 item 1: a server's limit on recipients per transaction (Postfix's
smtpd_recipient_limit answering "452 4.5.3 Error: too many recipients") is not a failure of
those recipients: the rest go in further transactions on the same connection at once
(RFC 5321 section 4.5.3.1.10), and what earlier transactions delivered is never lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ess_async import Manager
from ess_async.errors import TemporaryDeliveryError
from ess_async.spool import decode_record
from ess_async.transports.smtp import SMTPTransport

from .conftest import FakeClock, SMTPServer, make_config


def raw(subject: str) -> bytes:
    return f"From: sender@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def rcpts(count: int, start: int = 0) -> list[str]:
    return [f"r{i:02d}@example.com" for i in range(start, start + count)]


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


@pytest.fixture
async def transport_for() -> AsyncIterator[Callable[[int], SMTPTransport]]:
    made: list[SMTPTransport] = []

    def make(port: int) -> SMTPTransport:
        config = make_config(port).transport.smtp
        made.append(transport := SMTPTransport(config))
        return transport

    yield make
    for transport in made:
        await transport.close()


async def test_25_recipients_through_a_limit_of_10(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    """Issue 9 item 1: one message to 25 recipients through Postfix's limit of 10 is
    delivered once to each in exactly three transactions on one connection, in one pass
    (recorded passed, one attempt, no retry wait), where it used to deliver 10 and leave
    15 waiting for the retry schedule."""
    handler = smtp_server.handler
    handler.rcpt_limit = 10
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), spawn=1)
    to = rcpts(25)
    await manager.create_work(to=to, subject="to 25")
    started = time.monotonic()
    summary = await manager.process_workload()
    elapsed = time.monotonic() - started
    assert (summary.passed, summary.deferred, summary.failed) == (1, 0, 0)
    assert [m.rcpt_tos for m in handler.messages] == [to[:10], to[10:20], to[20:]]
    assert handler.transactions == 3
    assert len(set(handler.peers)) == 1  # one connection
    (record,) = records(tmp_path / "ws", "passed")
    assert sorted(record["delivered_to"]) == sorted(to)
    assert record["refused"] == {} and record["attempts"] == 1
    assert elapsed < 5  # it used to take a retry wait (minutes by default)


@pytest.mark.parametrize("limit_reply", [
    "452 4.5.3 Error: too many recipients",  # Postfix
    "452 too many recipients",  # Exim
    "452 4.5.3 Too many recipients",  # Sendmail, Exchange
    "451 4.5.3 Too many recipients, try again",
    "552 5.5.3 Too many recipients",  # RFC 821's code: temporary (RFC 5321 4.5.3.1.10)
])
async def test_limit_wordings(smtp_server: SMTPServer,
                              transport_for: Callable[[int], SMTPTransport],
                              limit_reply: str) -> None:
    """Issue 9 item 1: each common "too many recipients" reply splits the message into
    transactions; nobody is refused and each recipient gets it once."""
    handler = smtp_server.handler
    handler.rcpt_limit, handler.rcpt_limit_reply = 2, limit_reply
    transport = transport_for(smtp_server.port)
    to = rcpts(5)
    result = await transport.send("sender@example.com", to, raw("split"))
    assert result.code == 250 and result.refused == {}
    assert [m.rcpt_tos for m in handler.messages] == [to[:2], to[2:4], to[4:]]
    assert transport.partial == result and transport.outcome_pending is False


async def test_real_refusals_within_batches_are_kept(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: only real per-recipient replies are in ``refused`` (a 550 and a
    450 among recipients spread over several transactions), never the limit's 452."""
    handler = smtp_server.handler
    handler.rcpt_limit = 3
    to = rcpts(9)
    handler.rcpt_replies[to[1]] = "550 5.1.1 no such user"
    handler.rcpt_replies[to[5]] = "450 4.2.1 mailbox busy"
    transport = transport_for(smtp_server.port)
    result = await transport.send("sender@example.com", to, raw("mixed"))
    assert result.refused == {to[1]: (550, "5.1.1 no such user"),
                              to[5]: (450, "4.2.1 mailbox busy")}
    delivered = [r for m in handler.messages for r in m.rcpt_tos]
    assert sorted(delivered) == sorted(set(to) - {to[1], to[5]})  # each once
    assert len(set(handler.peers)) == 1


async def test_limit_at_the_first_rcpt_ends_the_send(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: a transaction whose first RCPT meets the limit cannot get further:
    the rest are refused with that 4xx (retried later), instead of looping forever."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    to = rcpts(4)
    handler.rcpt_replies[to[2]] = "452 4.5.3 Error: too many recipients"
    transport = transport_for(smtp_server.port)
    result = await transport.send("sender@example.com", to, raw("stuck"))
    assert result.refused == {to[2]: (452, "4.5.3 Error: too many recipients"),
                              to[3]: (452, "4.5.3 Error: too many recipients")}
    assert [m.rcpt_tos for m in handler.messages] == [to[:2]]


async def test_later_transaction_refused_returns_what_was_delivered(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 9 item 1: when a later transaction fails (451 at its end of data) after an
    earlier one was accepted, the message is recorded as delivered to the first batch and
    deferred for the others alone, who get it once at the next attempt."""
    clock = FakeClock()
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.data_replies.extend(["250 2.0.0 Ok: queued as A", "451 4.3.0 Error: queue file"])
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock,
                      spawn=1)
    to = rcpts(5)
    await manager.create_work(to=to, subject="later fails")
    assert (await manager.process_workload()).deferred == 1
    (record,) = records(tmp_path / "ws", "deferred")
    assert record["delivered_to"] == to[:2]
    assert record["recipients"] == to[2:]
    assert [m.rcpt_tos for m in handler.messages] == [to[:2]]
    clock.advance(10)
    assert (await manager.process_workload()).passed == 1
    assert [m.rcpt_tos for m in handler.messages] == [to[:2], to[2:4], to[4:]]
    (record,) = records(tmp_path / "ws", "passed")
    assert sorted(record["delivered_to"]) == sorted(to)


async def test_later_transaction_5xx_is_recorded(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: a 5xx end-of-data reply to a later transaction refuses its
    recipients (and those not reached) with that reply; the send still returns the
    earlier transaction's acceptance."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.data_replies.extend(["250 2.0.0 Ok: queued as A", "554 5.7.1 content rejected"])
    transport = transport_for(smtp_server.port)
    to = rcpts(5)
    result = await transport.send("sender@example.com", to, raw("later 5xx"))
    assert (result.code, result.message) == (250, "2.0.0 Ok: queued as A")
    assert result.refused == dict.fromkeys(to[2:], (554, "5.7.1 content rejected"))


async def test_connection_lost_after_later_data_is_outcome_unknown_for_that_batch(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: the connection lost after a later transaction's data was sent (the
    outcome-unknown window) returns the earlier acceptance; that batch's recipients are
    refused with a 4xx saying outcome unknown, those not reached with a plain 4xx."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.data_replies.extend(["250 OK", "DROP"])
    transport = transport_for(smtp_server.port)
    to = rcpts(5)
    result = await transport.send("sender@example.com", to, raw("lost"))
    assert result.code == 250
    assert set(result.refused) == set(to[2:])
    assert all(code == 451 for code, _ in result.refused.values())
    assert all("outcome unknown" in result.refused[r][1] for r in to[2:4])
    assert "outcome unknown" not in result.refused[to[4]][1]
    assert transport.outcome_pending is False
    # The transport works again for the next message.
    assert (await transport.send("sender@example.com", ["x@example.com"], raw("next"))).code \
        == 250


async def test_connection_lost_at_a_later_mail_is_not_sent(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: a later transaction cut off at MAIL (421) leaves the rest not sent
    (a 4xx each, retried later), and the earlier acceptance is returned."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    transport = transport_for(smtp_server.port)
    to = rcpts(3)
    first = await transport.send("sender@example.com", ["warm@example.com"], raw("warm"))
    assert first.code == 250
    handler.mail_replies.extend(["250 OK", "421 4.7.0 Error: too many connections"])
    result = await transport.send("sender@example.com", to, raw("cut"))
    assert result.refused == {to[2]: (421, "4.7.0 Error: too many connections")}


async def test_cancel_during_a_later_transaction_keeps_the_earlier_delivery(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: cancelled while waiting for a later transaction's final reply, the
    transport still says what was delivered (``partial``: the first batch), with that
    batch outcome unknown and the rest not sent, all 4xx; ``outcome_pending`` is True.
    The next send starts with ``partial`` None."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.hold.add("DATA")
    handler.hold_after["DATA"] = 1  # the first final reply is given, the second held
    transport = transport_for(smtp_server.port)
    to = rcpts(5)
    task = asyncio.ensure_future(transport.send("sender@example.com", to, raw("cut off")))
    assert await asyncio.to_thread(handler.held.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.outcome_pending is True
    partial = transport.partial
    assert partial is not None and partial.code == 250
    assert set(partial.refused) == set(to[2:])  # delivered to the first two
    assert all(code == 451 for code, _ in partial.refused.values())
    assert all("outcome unknown" in partial.refused[r][1] for r in to[2:4])
    assert "not sent" in partial.refused[to[4]][1]
    handler.hold.clear()
    handler.release.set()
    handler.rcpt_limit = 0
    result = await transport.send("sender@example.com", ["b@example.com"], raw("next"))
    assert result.code == 250 and transport.partial == result


async def test_cancel_before_a_later_data_keeps_the_earlier_delivery(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: cancelled during a later transaction's RCPTs, ``partial`` has the
    first batch delivered and everyone else "not sent" (``outcome_pending`` False)."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.hold.add("RCPT")
    handler.hold_after["RCPT"] = 3  # two accepted, one refused by the limit, then held
    transport = transport_for(smtp_server.port)
    to = rcpts(5)
    task = asyncio.ensure_future(transport.send("sender@example.com", to, raw("cut off")))
    assert await asyncio.to_thread(handler.held.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.outcome_pending is False
    partial = transport.partial
    assert partial is not None
    assert partial.refused == dict.fromkeys(to[2:], partial.refused[to[2]])
    assert "not sent" in partial.refused[to[2]][1]


async def test_nothing_accepted_still_raises(
        smtp_server: SMTPServer, transport_for: Callable[[int], SMTPTransport]) -> None:
    """Issue 9 item 1: when no transaction is accepted (the first one's data refused),
    send raises as before and ``partial`` stays None."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.data_replies.append("451 4.3.0 try later")
    transport = transport_for(smtp_server.port)
    with pytest.raises(TemporaryDeliveryError):
        await transport.send("sender@example.com", rcpts(5), raw("none"))
    assert transport.partial is None
    assert handler.messages == []
