"""Spool watcher: turns files that other processes drop into ``queued/`` into work items."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import Change, awatch

from .spool import ID_PATTERN

__all__ = ("preload", "watch_queued")

logger = logging.getLogger("ess_async.watcher")


def _is_new_message(change: Change, path: str) -> bool:
    name = Path(path).name
    return change != Change.deleted and name.endswith(".json") and bool(
        ID_PATTERN.match(name[:-5]))


def preload() -> None:
    """Import what ``awatch`` imports on its first step (anyio's asyncio backend, tens of
    milliseconds on a busy machine): run in a thread before serving, so that import does
    not hold the event loop while senders are already at work."""
    with contextlib.suppress(ImportError):
        import anyio._backends._asyncio
        import anyio.to_thread  # noqa: F401


async def watch_queued(folder: Path, on_ids: Callable[[list[str]], Awaitable[None]],
                       stop_event: asyncio.Event,
                       on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Call ``on_ids`` with the ids of messages that appear in ``folder`` until stopped.

    ``on_ready`` runs once the watch is in place, so a scan from there on misses nothing
    that arrived before. Events can still be missed (a kernel queue overflow), so callers
    also rescan now and then.
    """
    async for changes in awatch(folder, watch_filter=_is_new_message, debounce=200, step=10,
                                stop_event=stop_event, recursive=False, rust_timeout=1000,
                                yield_on_timeout=True):
        if on_ready is not None:
            ready, on_ready = on_ready, None
            await ready()
        if changes:
            ids = sorted({Path(path).name[:-5] for _, path in changes})
            logger.debug("watcher: %d new message(s)", len(ids))
            await on_ids(ids)
