"""Issue 9 items 4-6: connection slots, idle connections, push-back bursts and a relay
that is down. A loopback proxy in front of a real aiosmtpd plays Postfix's
``smtpd_client_connection_count_limit`` (``421 4.7.0 Error: too many connections``) or
a relay that is down (every connection greeted with 421, as Postfix is when it cannot
serve), and counts every connection it sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ess_async import Client, Manager
from ess_async.spool import decode_record

from .conftest import SMTPServer, make_config

TOO_MANY = b"421 4.7.0 Error: too many connections from 127.0.0.1\r\n"
DOWN = b"421 4.3.2 Service currently unavailable\r\n"


class RelayProxy:
    """Forwards connections to ``backend_port`` while fewer than ``limit`` are open
    (0 = no limit); ``down`` greets every connection with 421 instead."""

    def __init__(self, backend_port: int, *, limit: int = 0) -> None:
        self.backend_port = backend_port
        self.limit = limit
        self.down = False
        self.active = 0
        self.peak = 0
        self.connections = 0  # every connection seen
        self.rejected = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RelayProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.down or (self.limit and self.active >= self.limit):
            self.rejected += 1
            writer.write(DOWN if self.down else TOO_MANY)
            await writer.drain()
            writer.close()
            return
        self.active += 1
        self.peak = max(self.peak, self.active)
        pipes: list[asyncio.Future[None]] = []
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.backend_port)
            pipes = [asyncio.ensure_future(_pipe(reader, up_writer)),
                     asyncio.ensure_future(_pipe(up_reader, writer))]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            writer.close()
        finally:
            self.active -= 1  # the client hung up (or the server did): the slot is free
        await asyncio.gather(*pipes, return_exceptions=True)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()


@pytest.fixture
async def relay(smtp_server: SMTPServer) -> AsyncIterator[RelayProxy]:
    async with RelayProxy(smtp_server.port, limit=2) as proxy:
        yield proxy


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


async def test_connection_limit_of_two_costs_no_attempts(
        tmp_path: Path, smtp_server: SMTPServer, relay: RelayProxy) -> None:
    """Issue 9 item 4: a relay that allows two connections per client and 200 messages
    through eight senders with max_connections = 2: the pool never opens a third
    connection, so every message passes on its first attempt (the old code kept idle
    connections per sender, and 421s were charged to messages)."""
    ws = tmp_path / "ws"
    config = make_config(relay.port, transport={"smtp": {"port": relay.port,
                                                         "max_connections": 2}})
    client = Client(ws, config=config)
    paths = [client.create_work(to="a@example.com", subject=f"m{i}") for i in range(200)]
    async with Manager(ws, spawn=8, config=config) as manager:
        for path in paths:
            assert (await manager.wait(path, timeout=60)).state == "passed"
    assert relay.peak <= 2
    assert {r["attempts"] for r in records(ws, "passed")} == {1}
    assert sorted(smtp_server.handler.subjects()) == sorted(f"m{i}" for i in range(200))


async def test_idle_connections_are_closed(tmp_path: Path, smtp_server: SMTPServer,
                                           relay: RelayProxy) -> None:
    """Issue 9 item 4: a connection unused for idle_timeout is closed while serving, so
    it does not hold one of the relay's slots (the old code kept it open until stop)."""
    config = make_config(relay.port, transport={"smtp": {"port": relay.port,
                                                         "idle_timeout": 0.2}})
    async with Manager(tmp_path / "ws", spawn=4, config=config) as manager:
        paths = [await manager.create_work(to="a@example.com", subject=f"m{i}")
                 for i in range(8)]
        for path in paths:
            await manager.wait(path, timeout=20)
        async with asyncio.timeout(10):
            while relay.active:
                await asyncio.sleep(0.05)
        assert manager._run is not None and manager._run.pool.open == 0


async def test_421_at_connect_is_not_charged(tmp_path: Path, smtp_server: SMTPServer,
                                             relay: RelayProxy) -> None:
    """Issue 9 item 4: with eight senders against a two-connection relay and no
    max_connections, the 421s at connect are push-back: they halve concurrency and
    never count as an attempt of the message."""
    ws = tmp_path / "ws"
    config = make_config(relay.port)
    client = Client(ws, config=config)
    paths = [client.create_work(to="a@example.com", subject=f"m{i}") for i in range(40)]
    async with Manager(ws, spawn=8, config=config) as manager:
        for path in paths:
            assert (await manager.wait(path, timeout=60)).state == "passed"
        assert manager._run is not None
        assert manager._run.dispatcher.throttle.events >= 1
    assert relay.rejected >= 1  # the relay did refuse connections
    assert {r["attempts"] for r in records(ws, "passed")} == {1}


async def test_an_outage_costs_waiting_messages_no_attempt(
        tmp_path: Path, smtp_server: SMTPServer, relay: RelayProxy) -> None:
    """Issue 9 item 6: while the relay is down, 40 messages wait without being charged
    an attempt, and one probe at a time tests the relay (the old code made a connection
    per message and deferred each on its own); once it is back, all go out at once."""
    ws = tmp_path / "ws"
    relay.limit = 0
    relay.down = True
    config = make_config(relay.port, retry={"min_backoff": 600, "max_backoff": 600})
    client = Client(ws, config=config)
    paths = [client.create_work(to="a@example.com", subject=f"m{i}") for i in range(40)]
    async with Manager(ws, spawn=8, config=config) as manager:
        async with asyncio.timeout(20):
            while relay.connections < 2:  # the first failure, then a probe
                await asyncio.sleep(0.05)
        seen_while_down = relay.connections
        relay.down = False
        for path in paths:  # min_backoff is 10 minutes: only uncharged messages go now
            assert (await manager.wait(path, timeout=30)).state == "passed"
    assert seen_while_down < 16  # one burst of at most spawn, then probes one at a time
    assert {r["attempts"] for r in records(ws, "passed")} == {1}


async def test_stop_during_a_later_transaction_keeps_the_earlier_delivery(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 9 item 1 with issue 8 item 3: a message split by a recipient limit is stopped
    at the grace deadline while its second transaction's final reply is pending. It is
    recorded as delivered to the first batch and deferred for the rest (never requeued
    whole, which would send it to the first batch again)."""
    handler = smtp_server.handler
    handler.rcpt_limit = 2
    handler.hold.add("DATA")
    handler.hold_after["DATA"] = 1  # the first final reply is given, the second held
    ws = tmp_path / "ws"
    to = [f"r{i}@example.com" for i in range(5)]
    config = make_config(smtp_server.port, server={"grace": 0.2})
    async with Manager(ws, spawn=1, config=config) as manager:
        path = await manager.create_work(to=to, subject="split")
        assert await asyncio.to_thread(handler.held.wait, 20)
    handler.release.set()
    (record,) = records(ws, "deferred")
    assert record["id"] == path.stem
    assert record["delivered_to"] == to[:2]
    assert sorted(record["recipients"]) == to[2:]
    assert records(ws, "queued") == records(ws, "active") == []
