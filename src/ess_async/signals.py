"""SIGTERM and SIGINT start a graceful stop of a delivery run (serve, process)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

__all__ = ("stop_on_signals",)


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], object], *, enabled: bool = True) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT call ``stop`` (where the loop can install
    handlers: the main thread of a Unix process); the handlers are removed on exit."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, stop)
                    installed.append(sig)
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
