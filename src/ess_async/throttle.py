"""Push-back: one throttle shared by all senders of a transport.

When the server pushes back (421, "too many", refused connections) the number of
concurrent sends is halved and everyone pauses, instead of every sender hammering it;
each run of successes then earns one slot back. ``max_per_second`` caps the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ("Throttle",)


class Throttle:
    """``async with throttle:`` around claiming and sending one message (it waits out a
    pause and for a free slot); the dispatcher reports ``success()`` or ``push_back()``."""

    def __init__(self, max_concurrency: int, *, max_per_second: float = 0.0,
                 min_pause: float = 1.0, max_pause: float = 30.0, recover_after: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_concurrency = max_concurrency
        self.limit = max_concurrency
        self.max_per_second = max_per_second
        self.min_pause = min_pause
        self.max_pause = max_pause
        self.recover_after = recover_after
        self.clock = clock
        self.active = 0
        self.paused_until = 0.0
        self._pause = min_pause
        self._successes = 0
        self._next_slot = 0.0  # rate cap: the earliest time the next send may start
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            while True:
                now = self.clock()
                wait = max(self.paused_until - now, 0.0)
                if wait == 0.0 and self.active < self.limit:
                    break
                # A pause ends by time, a slot by a release: wait for whichever comes.
                timeout = wait if wait > 0 else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
            self.active += 1
            if self.max_per_second > 0:
                start = max(self.clock(), self._next_slot)
                self._next_slot = start + 1.0 / self.max_per_second
                delay = start - self.clock()
            else:
                delay = 0.0
        if delay > 0:
            await asyncio.sleep(delay)

    async def release(self) -> None:
        async with self._changed:
            self.active -= 1
            self._changed.notify_all()

    @property
    def paused(self) -> bool:
        return self.clock() < self.paused_until

    def success(self) -> None:
        self._successes += 1
        if self._successes >= self.recover_after:
            self._successes = 0
            self._pause = self.min_pause
            if self.limit < self.max_concurrency:
                self.limit += 1

    def push_back(self) -> None:
        """The server asked for less: halve concurrency and pause everyone."""
        self._successes = 0
        self.limit = max(1, self.limit // 2)
        self.paused_until = max(self.paused_until, self.clock() + self._pause)
        self._pause = min(self.max_pause, self._pause * 2)

    async def __aenter__(self) -> Throttle:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.release()
