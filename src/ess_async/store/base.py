"""The Store contract: where messages live, whatever holds them.

A ``Store`` is what ``Manager``, ``Client``, the queue operations and the CLI use to
enqueue, find, count, list, wait for and operate on messages. Two stores implement it:
``FileStore`` (the spool folders of one workspace: one host) and ``PostgresStore`` (one
database shared by a fleet of hosts). Records are the same dicts in both (see
``spool.new_record``); a message is named by its id, or by what ``enqueue`` returned
(the file store returns the spool path, ESS's contract; PostgreSQL the id).

Delivery claims are a store's own business (the file store's renames and journal in
``sender``, PostgreSQL's leases in ``store.pgdeliver``); both run the one delivery
policy of ``delivery.Delivery``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..enqueue import Prepared
from ..ops import MessageInfo
from ..outcome import Outcome

__all__ = ("MessageRef", "Store")

MessageRef = Path | str  # what enqueue returns: a spool path (file store) or an id


class Store(ABC):
    """Where the messages of one outbox live (see the module docstring)."""

    kind: str = ""  # "file" or "postgres": status --json reports it

    async def open(self) -> None:  # noqa: B027 - optional: connect, check the schema
        """Make the store ready (connect, check the schema); idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release what ``open`` took."""

    # -- enqueueing --------------------------------------------------------------------

    @abstractmethod
    async def enqueue(self, prepared: Prepared) -> MessageRef:
        """Write a validated message; it is durable when this returns. A repeated
        idempotency key returns the first message's reference while it is stored."""

    # -- reading -----------------------------------------------------------------------

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """How many messages are in each state (every state named, zeros included)."""

    @abstractmethod
    async def find(self, message: str | os.PathLike[str]) -> tuple[str, dict[str, Any] | None]:
        """The message's state and record (None for a quarantined one); raises
        MessageNotFound."""

    @abstractmethod
    async def wait(self, message: str | os.PathLike[str], *,
                   timeout: float | None = None) -> Outcome:
        """Wait until the message is passed, failed or quarantined; raises TimeoutError
        or MessageNotFound."""

    @abstractmethod
    async def list(self, states: Iterable[str] | str | None = None,
                   limit: int | None = None) -> list[MessageInfo]:
        """Messages in ``states`` (default: all), oldest first, at most ``limit``."""

    @abstractmethod
    async def show(self, message: str | os.PathLike[str], *,
                   raw: bool = False) -> dict[str, Any]:
        """The record with its ``state``; ``raw_size`` instead of the text unless ``raw``."""

    # -- operations (mailq / postsuper) ------------------------------------------------

    @abstractmethod
    async def retry(self, message: str | os.PathLike[str]) -> MessageRef:
        """Send a deferred or failed message again now."""

    @abstractmethod
    async def retry_all(self, states: Iterable[str] | str = ("deferred", "failed")) -> int:
        """Retry every message in ``states``; how many were."""

    @abstractmethod
    async def hold(self, message: str | os.PathLike[str]) -> MessageRef:
        """Park a queued, scheduled or deferred message: never sent until released."""

    @abstractmethod
    async def release(self, message: str | os.PathLike[str]) -> MessageRef:
        """Put a held message back (scheduled if its send_at is ahead, else queued)."""

    @abstractmethod
    async def delete(self, message: str | os.PathLike[str]) -> str:
        """Remove a message (any state but active) and its idempotency key; returns the
        state it was in."""

    @abstractmethod
    async def purge(self, state: str, older_than: float | None = None, *,
                    keep: int = 0) -> int:
        """Delete passed, failed or corrupt messages finished more than ``older_than``
        seconds ago and, with ``keep``, all but the newest ``keep`` passed or failed
        ones, with their idempotency keys; how many. The ``[server] keep_*`` retention
        is this too."""
