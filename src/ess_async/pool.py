"""The connection pool: transports (one connection each) that the senders borrow.

Senders do not own connections. A sender borrows a transport for one message and gives
it back; the most recently used one is lent first, so a quiet period leaves few
connections warm, and ``reap`` closes those unused for ``idle_timeout``. A transport
given back while more are open than the throttle now allows is closed at once: the
number of open connections never exceeds ``max_connections`` (or ``spawn``), idle ones
included, so idle connections never hold a relay's connection slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .transports import Transport

__all__ = ("TransportPool",)

logger = logging.getLogger("ess_async.pool")


class TransportPool:
    """``borrow`` / ``give_back`` around each send; ``reap`` now and then; ``close``."""

    def __init__(self, factory: Callable[[], Transport], *, idle_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = factory
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._idle: list[tuple[float, Transport]] = []  # (given back at, transport); LIFO
        self.borrowed = 0
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open(self) -> int:
        """Transports lent out, idle (an idle one may hold a connection) or closing."""
        return self.borrowed + len(self._idle) + len(self._closing)

    async def borrow(self, *, limit: int) -> Transport:
        """An idle transport, or a new one once fewer than ``limit`` are open (a
        connection still closing counts: the relay counts it until it is gone)."""
        if self._idle:
            self.borrowed += 1
            return self._idle.pop()[1]
        while self._closing and self.open >= limit:
            await asyncio.wait(list(self._closing), return_when=asyncio.FIRST_COMPLETED)
            if self._idle:
                self.borrowed += 1
                return self._idle.pop()[1]
        self.borrowed += 1
        return self._factory()

    def give_back(self, transport: Transport, *, limit: int) -> None:
        """Return ``transport``; it is closed instead if ``limit`` are open without it."""
        self.borrowed -= 1
        if self.open >= limit + len(self._closing):
            self._close_soon(transport)
        else:
            self._idle.append((self.clock(), transport))
        self.trim(limit)

    def trim(self, limit: int) -> None:
        """Close idle transports (the least recently used first) until at most ``limit``
        are open: after a push-back, idle connections must not keep the relay's slots."""
        while self._idle and self.open - len(self._closing) > limit:
            self._close_soon(self._idle.pop(0)[1])

    def reap(self) -> int:
        """Close the transports idle for ``idle_timeout`` or more; how many were."""
        cutoff = self.clock() - self.idle_timeout
        stale = [t for at, t in self._idle if at <= cutoff]
        self._idle = [(at, t) for at, t in self._idle if at > cutoff]
        for transport in stale:
            self._close_soon(transport)
        return len(stale)

    def _close_soon(self, transport: Transport) -> None:
        task = asyncio.ensure_future(self._close_one(transport))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_one(transport: Transport) -> None:
        try:
            await asyncio.wait_for(transport.close(), 5)
        except Exception as exc:  # closing is best effort: the server times us out anyway
            logger.debug("closing a connection: %r", exc)

    async def close(self) -> None:
        """Close every idle transport and wait for closes under way."""
        idle, self._idle = self._idle, []
        for _, transport in idle:
            self._close_soon(transport)
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._closing, return_exceptions=True)
