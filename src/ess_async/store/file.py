"""The file store: the spool folders of one workspace (one host).

Enqueueing is ``enqueue.GroupCommit`` (one sync for concurrent callers, idempotent
ones one at a time under the keys lock); the queue operations are ``ops.QueueOps``, run
in a thread. ``enqueue`` returns the spool path (ESS's contract), and every method also
takes an id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..enqueue import Enqueuer, GroupCommit, Prepared
from ..errors import MessageNotFound
from ..ops import RETRYABLE, MessageBusy, MessageInfo, MessageStateError, QueueOps
from ..outcome import Outcome, message_id
from ..spool import FINAL_STATES, CorruptRecord
from .base import MessageRef, Store

__all__ = ("FileStore",)

_TRIES = 5  # look-ups of a message that keeps moving between two folders


class FileStore(Store):
    """Messages in the spool folders of ``workspace``.

    ``clock`` gives "now" for ages, ``release`` and ``purge``; ``max_size`` bounds record
    reads (default: ``[server] max_message_size`` from the workspace's config).
    """

    kind = "file"

    def __init__(self, workspace: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time,
                 max_size: int | None = None) -> None:
        self.ops = QueueOps(workspace, clock=clock, max_size=max_size)
        self.workspace = self.ops.workspace
        self.spool = self.ops.spool
        self.clock = clock
        self._commit = GroupCommit(Enqueuer(self.spool))
        self._ensured = False
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def __repr__(self) -> str:
        return f"FileStore({str(self.workspace)!r})"

    async def open(self) -> None:
        self._ensure()

    def _ensure(self) -> None:
        if not self._ensured:
            self.spool.ensure()
            self._ensured = True

    # -- enqueueing --------------------------------------------------------------------

    async def enqueue(self, prepared: Prepared) -> MessageRef:
        """The spool path; for a repeated idempotency key, the first message's."""
        self._ensure()
        return await self._commit.commit(prepared)

    # -- reading -----------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        return await asyncio.to_thread(self.spool.counts)

    async def find(self, message: str | os.PathLike[str]) -> tuple[str, dict[str, Any] | None]:
        msg_id = message_id(message)
        return await asyncio.to_thread(self._find, msg_id)

    def _find(self, msg_id: str) -> tuple[str, dict[str, Any] | None]:
        for _ in range(_TRIES):  # a message moving between two folders: look again
            found = self.spool.find(msg_id)
            if found is None:
                continue
            state, path = found
            if state == "corrupt":
                return state, None
            try:
                record = self.spool.read(path)
            except FileNotFoundError:
                continue
            except CorruptRecord as exc:  # the server quarantines it when it meets it
                raise MessageStateError(msg_id, state, "read",
                                        f"its file is unreadable: {exc.reason}") from None
            record["state"] = state
            return state, record
        if self.spool.find(msg_id) is None:
            raise MessageNotFound(msg_id)
        raise MessageBusy(msg_id, "moving between folders", "find")

    def wake(self, msg_ids: Iterable[str]) -> None:
        """Wake the waiters of ``msg_ids`` (their messages just ended) at once, instead of
        at their next poll."""
        for msg_id in msg_ids:
            for event in self._waiters.get(msg_id, ()):
                event.set()

    async def wait(self, message: str | os.PathLike[str], *,
                   timeout: float | None = None) -> Outcome:
        msg_id = message_id(str(message))
        event = asyncio.Event()  # one per caller: two waits on one id are both woken
        self._waiters.setdefault(msg_id, set()).add(event)
        delay = 0.005
        misses = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    found = self.spool.find(msg_id)
                    if found is None:
                        misses += 1  # it may be between two folders: look again first
                        if misses > 3:
                            raise MessageNotFound(msg_id)
                    elif found[0] in FINAL_STATES:
                        return self._outcome(*found)
                    else:
                        misses = 0
                    # Woken at once by ``wake``, or by polling for other processes.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), delay)
                    delay = min(delay * 2, 0.5)
        finally:
            events = self._waiters.get(msg_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[msg_id]

    def _outcome(self, state: str, path: Path) -> Outcome:
        if state == "corrupt":
            return Outcome(id=path.stem, state=state, path=path)
        return Outcome.from_record(state, path, self.spool.read(path))

    async def list(self, states: Iterable[str] | str | None = None,
                   limit: int | None = None) -> list[MessageInfo]:
        return await asyncio.to_thread(self.ops.list, states, limit)

    async def show(self, message: str | os.PathLike[str], *,
                   raw: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self.ops.show, message, raw=raw)

    # -- operations --------------------------------------------------------------------

    async def retry(self, message: str | os.PathLike[str]) -> MessageRef:
        return await asyncio.to_thread(self.ops.retry, message)

    async def retry_all(self, states: Iterable[str] | str = RETRYABLE) -> int:
        return await asyncio.to_thread(self.ops.retry_all, states)

    async def hold(self, message: str | os.PathLike[str]) -> MessageRef:
        return await asyncio.to_thread(self.ops.hold, message)

    async def release(self, message: str | os.PathLike[str]) -> MessageRef:
        return await asyncio.to_thread(self.ops.release, message)

    async def delete(self, message: str | os.PathLike[str]) -> str:
        return await asyncio.to_thread(self.ops.delete, message)

    async def purge(self, state: str, older_than: float | None = None, *,
                    keep: int = 0) -> int:
        return await asyncio.to_thread(self.ops.purge, state, older_than, keep=keep)
