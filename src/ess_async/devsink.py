"""A tiny loopback SMTP sink for development, demos and benchmarks.

It accepts every message and keeps only a count (and optionally the raw messages); it is
not a mail server and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ("DevSink",)

logger = logging.getLogger("ess_async.devsink")


class DevSink:
    """``async with DevSink() as sink:`` serves on ``sink.port``; ``sink.count`` grows."""

    def __init__(self, *, port: int = 0, keep: bool = False) -> None:
        self.port = port
        self.keep = keep
        self.count = 0
        self.messages: list[bytes] = []
        self.received = asyncio.Event()  # set after every message
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", self.port,
                                                  limit=64 * 1024 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> DevSink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ess-devsink ready\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-ess-devsink\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 end with .\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.count += 1
                    if self.keep:
                        self.messages.append(data[:-5])
                    self.received.set()
                    writer.write(b"250 OK queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 OK\r\n")
                else:
                    writer.write(b"502 command not implemented\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
