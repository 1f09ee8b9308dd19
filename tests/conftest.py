"""Shared fixtures: a real aiosmtpd server on loopback whose replies a test can script."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from ess_async.config import Config, parse_config
from ess_async.lock import lock_holder

from .pgserver import PgServer, pg_available


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class RecordingHandler:
    """Records accepted messages. Scripting: ``data_replies`` (consumed one per DATA;
    ``"DROP"`` keeps the message but closes the connection before replying, so the client
    cannot know), ``rcpt_replies`` (address -> reply, every time; a list is consumed one
    reply per RCPT of that address)."""

    messages: list[Received] = field(default_factory=list)
    data_replies: deque[str] = field(default_factory=deque)
    rcpt_replies: dict[str, str | list[str]] = field(default_factory=dict)
    peers: list[tuple[str, int]] = field(default_factory=list)  # client address per DATA
    quits: list[tuple[str, int]] = field(default_factory=list)  # client address per QUIT
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Slow replies: ``hold`` names commands ("RCPT", "DATA": the final reply) that set
    # ``held`` and get no reply until ``release`` is set; ``delays`` maps a command to
    # seconds slept before its reply.
    hold: set[str] = field(default_factory=set)
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    delays: dict[str, float] = field(default_factory=dict)
    # ``hold_after``: how many of a held command go through before the hold starts.
    hold_after: dict[str, int] = field(default_factory=dict)
    # Issue 9: ``mail_replies`` are consumed one per MAIL (then "250 OK"; a 250 starts
    # the transaction); ``rcpt_limit`` > 0 answers ``rcpt_limit_reply`` to RCPTs beyond
    # it in one transaction, as Postfix's smtpd_recipient_limit does; ``transactions``
    # counts the MAIL commands accepted.
    mail_replies: deque[str] = field(default_factory=deque)
    rcpt_limit: int = 0
    rcpt_limit_reply: str = "452 4.5.3 Error: too many recipients"
    transactions: int = 0

    async def _pause(self, command: str) -> None:
        if self.hold_after.get(command, 0) > 0:
            self.hold_after[command] -= 1
        elif command in self.hold:
            self.held.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        if self.delays.get(command):
            await asyncio.sleep(self.delays[command])

    async def handle_QUIT(self, server, session, envelope):
        self.quits.append(session.peer)
        return "221 Bye"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self.mail_replies.popleft() if self.mail_replies else "250 OK"
        if not reply.startswith("250"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.transactions += 1
        return reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        await self._pause("RCPT")
        if self.rcpt_limit and len(envelope.rcpt_tos) >= self.rcpt_limit:
            return self.rcpt_limit_reply
        scripted = self.rcpt_replies.get(address)
        if isinstance(scripted, list):
            scripted = scripted.pop(0) if scripted else None
        if scripted:
            return scripted
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        await self._pause("DATA")
        with self.lock:
            self.peers.append(session.peer)
            reply = self.data_replies.popleft() if self.data_replies else "250 OK accepted"
            if reply.startswith("250") or reply == "DROP":
                self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                              bytes(envelope.original_content or b"")))
        if reply == "DROP":
            server.transport.close()
            return "250 never seen"
        return reply

    def subjects(self) -> list[str]:
        with self.lock:
            return [str(m.message["Subject"]) for m in self.messages]

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.messages)} of {count} messages")
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SMTPServer:
    """An aiosmtpd server on 127.0.0.1 that can be stopped and started on the same port."""

    def __init__(self, **server_kwargs: object) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        self.server_kwargs = server_kwargs  # passed to aiosmtpd's SMTP, e.g. enable_SMTPUTF8
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                      decode_data=False, **self.server_kwargs)
        self._controller.start()

    def stop(self) -> None:
        self.handler.release.set()  # no held reply keeps the server from stopping
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def smtp_server() -> Iterator[SMTPServer]:
    server = SMTPServer()
    server.start()
    yield server
    server.stop()


def make_config(port: int, **sections: dict[str, object]) -> Config:
    """A config pointing at ``port`` with test-friendly retry timing."""
    data: dict[str, object] = {
        "message": {"from": "sender@example.com"},
        "retry": {"min_backoff": 1, "max_backoff": 2},
        "server": {"grace": 5},
        "transport": {"smtp": {"host": "127.0.0.1", "port": port, "timeout": 10}},
    }
    for name, values in sections.items():
        base = data.setdefault(name, {})
        assert isinstance(base, dict)
        base.update(values)
    return parse_config(data)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this one's, without what would steer it
    (crash points, a workspace, a log level, a password, a store URL), plus ``extra``."""
    env = dict(os.environ)
    for name in ("ESS_TEST_CRASH_AT", "ESS_TEST_WORKER_CRASH_AT", "ESS_DATA", "ESS_LOG_LEVEL",
                 "ESS_SMTP_PASSWORD", "ESS_STORE_URL"):
        env.pop(name, None)
    env.update(extra)
    return env


class Server:
    """A ``serve`` subprocess whose stdout and stderr go to files."""

    def __init__(self, ws: Path, name: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.ws = ws
        self.out = ws.parent / f"{name}.out"
        self.err = ws.parent / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ess_async", "--log-level", "INFO", "serve",
                 "--workspace", str(ws), *extra],
                stdout=out, stderr=err, env=cli_env() if env is None else env,
                cwd=ws.parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.err.read_text(errors="replace") + self.out.read_text(errors="replace")

    def wait_serving(self, timeout: float = 30) -> None:
        """Until it holds the workspace lock (its scan and watcher start right after)."""
        wait_until(lambda: lock_holder(self.ws) == self.pid or self.proc.poll() is not None,
                   timeout, "serve to take the workspace lock")
        assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.log()}"

    def terminate_and_wait(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve did not exit within {timeout}s:\n{self.log()}") from None


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    """Start serve processes; any still running at the end is killed and reaped."""
    started: list[Server] = []

    def start(ws: Path, *extra: str, name: str = "serve",
              env: dict[str, str] | None = None) -> Server:
        server = Server(ws, f"{name}{len(started)}", *extra, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(timeout=30)


def wait_until(predicate: Callable[[], bool], timeout: float = 30,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def write_config(workspace: Path, port: int, extra: str = "") -> Path:
    workspace.mkdir(parents=True, exist_ok=True)
    path = workspace / "config.toml"
    path.write_text(
        f'[message]\nfrom = "sender@example.com"\n\n[retry]\nmin_backoff = 1\nmax_backoff = 2\n'
        f'\n[server]\ngrace = 5\n\n[transport.smtp]\nhost = "127.0.0.1"\nport = {port}\n'
        f"timeout = 10\n{extra}"
    )
    return path


class FakeClock:
    """An injectable wall clock for retry timing."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- PostgreSQL (issue 12): one throwaway cluster per session, a fresh database per test --


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A private PostgreSQL server on 127.0.0.1 for the whole session. Skipped where
    there is none to start, but a failure in CI (``CI=true``): a database test never
    skips there."""
    reason = pg_available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests never skip in CI: {reason}")
        pytest.skip(reason)
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a new, empty database of its own for this test."""
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the server is marked ``postgres`` (``-m "not postgres"``)."""
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
