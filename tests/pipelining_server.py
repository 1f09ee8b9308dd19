"""A loopback SMTP server that advertises PIPELINING (RFC 2920), for issue 11 item 1.

It answers commands in the order they arrive, however they were grouped, records the exact
byte chunks it received, and checks the one rule a pipelining client must never break: no
message data before the 354. The 354 is sent ``data_delay`` seconds after DATA arrives;
any byte received meanwhile is a violation (``violations``).

Scripting: ``mail_replies`` (one per MAIL, then 250), ``rcpt_replies`` (address -> reply),
``rcpt_limit`` (a 452 4.5.3 beyond it), ``data_replies`` (one per DATA command, then 354),
``final_replies`` (one per end of data, then 250; ``"DROP"`` reads the data, keeps the
message and hangs up without a reply; ``"HOLD"`` never answers), ``close_on_data`` (hang up
when DATA arrives), ``reject_pipelined`` (a server that breaks pipelining: every RCPT and
DATA that arrived in the same chunk as their MAIL get 503).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Message:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class _Session:
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    mode: str = "command"  # command | wait354 | data
    data: bytearray = field(default_factory=bytearray)
    mail_in_chunk: bool = False


class PipeliningServer:
    def __init__(self, *, extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10240000",
                                                         "8BITMIME", "SMTPUTF8")) -> None:
        self.extensions = extensions
        self.port = 0
        self.chunks: list[bytes] = []  # every chunk received, as received
        self.commands: list[str] = []  # every command line, in order
        self.messages: list[Message] = []
        self.violations: list[str] = []
        self.connections = 0
        self.quits = 0
        self.mail_replies: deque[str] = deque()
        self.rcpt_replies: dict[str, str] = {}
        self.rcpt_limit = 0
        self.data_replies: deque[str] = deque()
        self.final_replies: deque[str] = deque()
        self.close_on_data = False
        self.reject_pipelined = False
        self.data_delay = 0.02
        self.final_seen = asyncio.Event()  # an end of data arrived
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.Transport] = []

    async def __aenter__(self) -> PipeliningServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Protocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in self._transports:
            transport.abort()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    def subjects(self) -> list[str]:
        out = []
        for message in self.messages:
            for line in message.data.split(b"\r\n"):
                if line.startswith(b"Subject: "):
                    out.append(line[9:].decode())
        return out


class _Protocol(asyncio.Protocol):
    def __init__(self, server: PipeliningServer) -> None:
        self.server = server
        self.session = _Session()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._transports.append(transport)
        self.server.connections += 1
        transport.write(b"220 pipelining test server ESMTP\r\n")

    def reply(self, text: str) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(text.encode() + b"\r\n")

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.chunks.append(bytes(data))
        if self.session.mode == "wait354":
            server.violations.append(f"{len(data)} bytes before the 354: {data[:60]!r}")
        self.buffer += data
        self.session.mail_in_chunk = False
        self._process()

    def _process(self) -> None:
        session = self.session
        while self.transport is not None and not self.transport.is_closing():
            if session.mode == "wait354":
                return
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 2]
            if session.mode == "data":
                if line == b".":
                    self._end_of_data()
                else:
                    session.data += (line[1:] if line.startswith(b".") else line) + b"\r\n"
                continue
            self._command(line.decode("utf-8", "surrogateescape"))

    def _command(self, line: str) -> None:
        server, session = self.server, self.session
        server.commands.append(line)
        verb = line[:4].upper()
        pipelined_group = session.mail_in_chunk and server.reject_pipelined
        if verb in ("EHLO", "HELO"):
            lines = ["pipelining.test", *server.extensions]
            self.reply("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")
        elif verb == "MAIL":
            if session.mail_from is not None:
                self.reply("503 5.5.1 Error: nested MAIL command")
                return
            reply = server.mail_replies.popleft() if server.mail_replies else "250 2.1.0 Ok"
            if reply.startswith("250"):
                session.mail_from = line.split("<", 1)[1].split(">", 1)[0]
                session.mail_in_chunk = True
            self.reply(reply)
            if reply.startswith("421"):  # closing, as servers do: no more replies
                self.transport.close()
        elif verb == "RCPT":
            address = line.split("<", 1)[1].split(">", 1)[0]
            if session.mail_from is None or pipelined_group:
                self.reply("503 5.5.1 Error: need MAIL command")
            elif server.rcpt_limit and len(session.rcpts) >= server.rcpt_limit:
                self.reply("452 4.5.3 Error: too many recipients")
            elif address in server.rcpt_replies:
                self.reply(server.rcpt_replies[address])
            else:
                session.rcpts.append(address)
                self.reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if server.close_on_data:
                assert self.transport is not None
                self.transport.close()
                return
            if session.mail_from is None or pipelined_group:
                self.reply("503 5.5.1 Error: need RCPT command")
                return
            reply = server.data_replies.popleft() if server.data_replies else "354 go ahead"
            if not reply.startswith("354"):
                self.reply(reply)
                return
            session.mode = "wait354"
            asyncio.get_running_loop().call_later(server.data_delay, self._go_ahead, reply)
        elif verb == "RSET":
            self.session = _Session()
            self.reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            server.quits += 1
            self.reply("221 2.0.0 Bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply("502 5.5.2 Error: command not recognized")

    def _go_ahead(self, reply: str) -> None:
        self.session.mode = "data"
        self.reply(reply)
        self._process()

    def _end_of_data(self) -> None:
        server, session = self.server, self.session
        server.final_seen.set()
        reply = server.final_replies.popleft() if server.final_replies else "250 2.0.0 Ok"
        if reply != "HOLD" and (reply.startswith("250") or reply == "DROP") and session.rcpts:
            assert session.mail_from is not None
            server.messages.append(Message(session.mail_from, list(session.rcpts),
                                           bytes(session.data)))
        self.session = _Session()
        if reply == "DROP":
            assert self.transport is not None
            self.transport.close()
        elif reply != "HOLD":
            self.reply(reply)
