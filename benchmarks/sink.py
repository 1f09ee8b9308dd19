"""A fast loopback SMTP sink for the benchmarks, run as its own process.

``python benchmarks/sink.py`` prints ``PORT CONTROL_PORT`` and serves until killed. It
accepts every message (pipelining-friendly: it answers each command as it parses it) and
records when each message's final dot arrived (CLOCK_MONOTONIC, shared by all processes
on the machine). The control port answers ``COUNT``, ``TIMES`` (JSON: subject -> time)
and ``RESET``.
"""

from __future__ import annotations

import asyncio
import json
import time

SUBJECT = b"\r\nSubject: "


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.times: dict[str, float] = {}


class SMTPSession(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buffer = bytearray()
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 bench-sink\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                message = bytes(self.buffer[:end])
                del self.buffer[:end + 5]
                self.in_data = False
                self.sink.count += 1
                start = message.find(SUBJECT)
                if start >= 0:
                    stop = message.find(b"\r\n", start + len(SUBJECT))
                    subject = message[start + len(SUBJECT):stop].decode("ascii", "replace")
                    self.sink.times[subject] = time.monotonic()
                out.append(b"250 OK\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                           b"250 SIZE 104857600\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))  # type: ignore[attr-defined]
                self.transport.close()
                return
            else:
                out.append(b"250 OK\r\n")
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


async def control(sink: Sink, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        command = line.strip().upper()
        if command == b"COUNT":
            writer.write(f"{sink.count}\n".encode())
        elif command == b"TIMES":
            writer.write(json.dumps(sink.times).encode() + b"\n")
        elif command == b"RESET":
            sink.count = 0
            sink.times.clear()
            writer.write(b"ok\n")
        await writer.drain()
    writer.close()


async def main() -> None:
    sink = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTPSession(sink), "127.0.0.1", 0, backlog=512)
    ctl = await asyncio.start_server(lambda r, w: control(sink, r, w), "127.0.0.1", 0,
                                     limit=1 << 26)
    port = server.sockets[0].getsockname()[1]
    ctl_port = ctl.sockets[0].getsockname()[1]
    print(port, ctl_port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
