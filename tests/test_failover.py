"""Issue 14 part 3: several relays, failover in order, and back to the first when it
recovers; tested with two real aiosmtpd servers, one stopped mid-run."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ess_async import ConfigError, Manager
from ess_async.config import parse_config
from ess_async.transports import FailoverTransport, create_transport

from .conftest import SMTPServer, make_config


@pytest.fixture
def backup_server() -> Iterator[SMTPServer]:
    server = SMTPServer()
    server.start()
    yield server
    server.stop()


def failover_config(primary: int, backup: int, **server: object) -> object:
    return make_config(primary, retry={"min_backoff": 0.1, "max_backoff": 0.2},
                       server=dict(server), transport={
                           "failover": ["primary", "backup"], "failback_after": 0.5,
                           "smtp": {"host": "127.0.0.1", "connect_timeout": 5,
                                    "primary": {"port": primary},
                                    "backup": {"port": backup}}})


def test_named_relays_inherit_and_must_exist() -> None:
    """Issue 14 part 3: [transport.smtp.NAME] relays inherit the keys of [transport.smtp]
    they do not set; a failover list naming an unknown relay is a ConfigError."""
    config = parse_config({"transport": {
        "failover": ["a", "b"],
        "smtp": {"host": "relay.example.com", "tls": "starttls",
                 "a": {"port": 587}, "b": {"host": "backup.example.com"}}}})
    relays = config.transport.smtp.relays
    assert (relays["a"].host, relays["a"].port, relays["a"].tls) == (
        "relay.example.com", 587, "starttls")
    assert (relays["b"].host, relays["b"].port) == ("backup.example.com", 25)
    transport = create_transport(config.transport, Path("."))
    assert isinstance(transport, FailoverTransport)
    assert [name for name, _ in transport.relays] == ["a", "b"]
    with pytest.raises(ConfigError) as info:
        parse_config({"transport": {"failover": ["a", "c"], "smtp": {"a": {"port": 1}}}})
    assert info.value.key == "transport.failover"
    with pytest.raises(ConfigError) as info:
        parse_config({"transport": {"smtp": {"a": {"prot": 1}}}})
    assert "prot" in info.value.key


async def test_failover_and_back(tmp_path: Path, smtp_server: SMTPServer,
                                 backup_server: SMTPServer) -> None:
    """Issue 14 part 3: the primary stops mid-run: sending moves to the backup, nothing is
    lost or sent twice; once the primary is back, sending returns to it."""
    config = failover_config(smtp_server.port, backup_server.port)
    async with Manager(tmp_path / "ws", spawn=2, config=config) as manager:

        async def send(prefix: str, count: int) -> None:
            paths = [await manager.create_work(to="a@example.com", subject=f"{prefix}{i}")
                     for i in range(count)]
            for path in paths:
                assert (await manager.wait(path, timeout=30)).state == "passed"

        await send("a", 10)
        assert len(smtp_server.handler.messages) == 10
        smtp_server.stop()
        await send("b", 10)
        assert len(backup_server.handler.messages) >= 10
        smtp_server.start()
        await asyncio.sleep(0.6)  # failback_after has passed: the primary comes first
        before = len(smtp_server.handler.messages)
        await send("c", 10)
        assert len(smtp_server.handler.messages) > before
    received = Counter(smtp_server.handler.subjects() + backup_server.handler.subjects())
    expected = {f"{p}{i}" for p in "abc" for i in range(10)}
    assert set(received) == expected  # nothing lost
    assert max(received.values()) == 1  # nothing sent twice


async def test_a_message_picks_its_relay(tmp_path: Path, smtp_server: SMTPServer,
                                         backup_server: SMTPServer) -> None:
    """Issue 14 part 3: create_work(transport="marketing") sends through that relay alone;
    other messages take the default route; an unknown name is a MessageError naming
    ``transport`` and writes nothing."""
    from ess_async import Client, MessageError

    config = make_config(smtp_server.port, transport={"smtp": {
        "host": "127.0.0.1", "port": smtp_server.port,
        "marketing": {"port": backup_server.port}}})
    ws = tmp_path / "ws"
    client = Client(ws, config=config)
    client.create_work(to="a@example.com", subject="news", transport="marketing")
    client.create_work(to="a@example.com", subject="receipt")
    client.create_work(to="a@example.com", subject="receipt 2", transport="default")
    with pytest.raises(MessageError) as info:
        client.create_work(to="a@example.com", subject="x", transport="nope")
    assert info.value.field == "transport"
    assert (await Manager(ws, config=config).process_workload()).passed == 3
    assert backup_server.handler.subjects() == ["news"]
    assert sorted(smtp_server.handler.subjects()) == ["receipt", "receipt 2"]
    plain = make_config(smtp_server.port)
    with pytest.raises(MessageError) as info:
        Client(tmp_path / "other", config=plain).create_work(
            to="a@example.com", subject="x", transport="marketing")
    assert info.value.field == "transport"
    assert not (tmp_path / "other" / "queued").exists() or \
        list((tmp_path / "other" / "queued").iterdir()) == []
