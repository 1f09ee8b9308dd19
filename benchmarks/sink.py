"""A fast loopback SMTP sink for the benchmarks, run as its own process.

``python benchmarks/sink.py`` prints ``PORT CONTROL_PORT`` and serves until killed. It
listens on 127.0.0.1 only and accepts every message (pipelining-friendly: it answers each
command as it parses it) and records when each message's final dot arrived
(CLOCK_MONOTONIC, shared by all processes on the machine). The control port answers one
line per command:

- ``COUNT``: messages received since the last ``RESET``;
- ``STATS``: JSON ``{"count", "distinct", "first", "last"}`` (distinct subjects, so a
  duplicate shows as ``distinct < count``; arrival times of the first and last message);
- ``WAIT N TIMEOUT``: answers once N messages have arrived (or TIMEOUT seconds passed)
  with STATS plus ``"at"``, the arrival time of the N-th message (null if it has not);
- ``TIMES``: JSON subject -> arrival time;
- ``RESET``: forget everything counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

SUBJECT = b"\r\nSubject: "


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.times: dict[str, float] = {}
        self.arrivals: list[float] = []
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    def arrived(self, subject: str | None) -> None:
        now = time.monotonic()
        self.count += 1
        self.arrivals.append(now)
        if subject is not None:
            self.times[subject] = now
        if self.waiters:
            ready = [w for w in self.waiters if w[0] <= self.count]
            self.waiters = [w for w in self.waiters if w[0] > self.count]
            for _, future in ready:
                if not future.done():
                    future.set_result(None)

    def stats(self) -> dict[str, object]:
        return {"count": self.count, "distinct": len(self.times),
                "first": self.arrivals[0] if self.arrivals else None,
                "last": self.arrivals[-1] if self.arrivals else None}

    def reset(self) -> None:
        self.count = 0
        self.times.clear()
        self.arrivals.clear()


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
                start = message.find(SUBJECT)
                subject = None
                if start >= 0:
                    stop = message.find(b"\r\n", start + len(SUBJECT))
                    subject = message[start + len(SUBJECT):stop].decode("ascii", "replace")
                self.sink.arrived(subject)
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
        elif command == b"STATS":
            writer.write(json.dumps(sink.stats()).encode() + b"\n")
        elif command.startswith(b"WAIT "):
            _, n_text, timeout_text = command.split()
            n = int(n_text)
            if sink.count < n:
                future = asyncio.get_running_loop().create_future()
                sink.waiters.append((n, future))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(future, float(timeout_text))
            reply = {**sink.stats(), "at": sink.arrivals[n - 1] if sink.count >= n else None}
            writer.write(json.dumps(reply).encode() + b"\n")
        elif command == b"RESET":
            sink.reset()
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
