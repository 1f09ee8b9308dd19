"""Group commit: what concurrent callers submit is written together, and each caller is
answered once its own item is durable (the spool's enqueue, the PostgreSQL store's
enqueue, acceptances and settles)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ("Batcher",)

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await batcher.submit(item)`` returns ``item``'s result once ``write`` has written
    the batch it went in. While one batch is being written the next one gathers.

    ``write(items)`` returns one result per item, or an exception for an item alone; an
    exception it raises fails every item of its batch."""

    def __init__(self, write: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]
                 ) -> None:
        self.write = write
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Future[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self.write([item for item, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise  # cancelled: the callers were told
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # its caller was cancelled
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def drain(self) -> None:
        """Wait for the batches being written (a no-op from within a write, which
        would otherwise wait for itself)."""
        if self._flusher is not None and self._flusher is not asyncio.current_task():
            await asyncio.gather(self._flusher, return_exceptions=True)
