"""Push-back and destination backoff: one throttle shared by all senders of a transport.

When the server pushes back (421, rate-limit replies, refused connections) the number of
concurrent sends is halved and everyone pauses, instead of every sender hammering it;
each run of successes then earns one slot back. When the destination cannot be reached
at all (connect, TLS, greeting), everyone pauses without halving. A burst of push-backs
(several senders told at once) is one event. While paused, one sender at a time probes
the relay (after the first pause, then at most every ``max_probe_interval``): a probe
that succeeds lifts the pause at once, so an outage costs no more than that interval.
``max_per_second`` caps the rate.
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
    pause and for a free slot); the dispatcher reports ``success()``, ``push_back()`` or
    ``destination_down()``."""

    def __init__(self, max_concurrency: int, *, max_per_second: float = 0.0,
                 min_pause: float = 1.0, max_pause: float = 30.0, recover_after: int = 10,
                 coalesce: float = 1.0, max_probe_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_concurrency = max_concurrency
        self.limit = max_concurrency
        self.max_per_second = max_per_second
        self.min_pause = min_pause
        self.max_pause = max_pause
        self.recover_after = recover_after
        self.coalesce = coalesce
        self.max_probe_interval = max_probe_interval
        self.clock = clock
        self.active = 0
        self.paused_until = 0.0
        self.events = 0  # push-back and destination events (bursts counted once)
        self._pause = min_pause
        self._last_event = -float("inf")
        self._next_probe = 0.0
        self._probe: asyncio.Task[object] | None = None  # the sender probing right now
        self._successes = 0
        self._next_slot = 0.0  # rate cap: the earliest time the next send may start
        self._changed = asyncio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        while True:
            now = self.clock()
            if now < self.paused_until:
                if self._probe is None and now >= self._next_probe:
                    self._probe = asyncio.current_task()
                    break  # this sender tests the relay for everyone
                until = self.paused_until if self._probe else min(self.paused_until,
                                                                  self._next_probe)
                timeout: float | None = until - now
            elif self.active < self.limit:
                break
            else:
                timeout = None
            # A pause ends by time, a slot by a release: wait for whichever comes.
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        self.active += 1
        if self.max_per_second > 0:
            start = max(self.clock(), self._next_slot)
            self._next_slot = start + 1.0 / self.max_per_second
            delay = start - self.clock()
            if delay > 0:
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    self.release()
                    raise

    def release(self) -> None:
        self.active -= 1
        if self._probe is not None and self._probe is asyncio.current_task():
            self._probe = None
            self._next_probe = self.clock() + min(self._pause, self.max_probe_interval)
        self._wake()

    @property
    def paused(self) -> bool:
        return self.clock() < self.paused_until

    def success(self) -> None:
        if self._probe is not None and self._probe is asyncio.current_task():
            self.paused_until = 0.0  # the probe got through: the relay works again
            self._wake()
        self._successes += 1
        if self._successes >= self.recover_after:
            self._successes = 0
            self._pause = self.min_pause
            if self.limit < self.max_concurrency:
                self.limit += 1
                self._wake()

    def push_back(self) -> None:
        """The server asked for less: halve concurrency and pause everyone."""
        self._event(halve=True)

    def destination_down(self) -> None:
        """The relay cannot be reached or refuses this client: pause everyone; probe."""
        self._event(halve=False)

    def _event(self, *, halve: bool) -> None:
        now = self.clock()
        self._successes = 0
        if now - self._last_event < self.coalesce:
            return  # the same burst: several senders told at once
        self._last_event = now
        self.events += 1
        if halve:
            self.limit = max(1, self.limit // 2)
        self.paused_until = max(self.paused_until, now + self._pause)
        self._next_probe = now + min(self._pause, self.max_probe_interval)
        self._pause = min(self.max_pause, self._pause * 2)
        self._wake()

    async def __aenter__(self) -> Throttle:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
