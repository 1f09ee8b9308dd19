"""Delivering from the PostgreSQL store: writes fenced by the claim (``PgRun`` in
``store.pgrun`` claims, renews and reaps).

A deliverer process claims batches (``FOR UPDATE SKIP LOCKED``), each message under a
lease with a fresh token. A heartbeat renews every lease the process holds, every third
of the lease. Every write about a claim is fenced by its token: the server's acceptance
(committed right after the 250, before anything else, like the file store's journal
entry) and the next state. A deliverer that lost a lease (paused past it, cut off from
the database) therefore writes nothing over the newer attempt. Every deliverer also
reaps expired leases: an accepted message is finished as passed (never resent), any
other goes back to where it was claimed from.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..batching import Batcher
from ..delivery import Delivery
from ..errors import StoreUnavailable
from ..expiry import is_expired
from ..spool import FINAL_STATES
from ..transports import Transport
from .postgres import PostgresStore

__all__ = ("GroupWrite", "PgDelivery", "settle_rows")

logger = logging.getLogger("ess_async.store.pgdeliver")

_NOTIFY_BYTES = 7_000  # NOTIFY payloads must stay under 8000 bytes


def _settle_row(record: dict[str, Any], token: uuid.UUID, raw: str | None, now: float
                ) -> tuple[Any, ...]:
    state = record["state"]
    due = record.get("next_attempt_at") or now
    body = {k: v for k, v in record.items() if k != "raw"}
    return (record["id"], token, state, due, int(record.get("attempts", 0)),
            record.get("finished_at") if state in FINAL_STATES else None,
            orjson.dumps(body).decode(), raw)


class GroupWrite:
    """Rows written by concurrent callers in one statement: ``write(row)`` returns
    whether the row was written (False: its claim's lease was lost), once committed."""

    def __init__(self, store: PostgresStore,
                 statement: Callable[[Any, list[tuple[Any, ...]]], Awaitable[set[str]]]
                 ) -> None:
        self.store = store
        self.statement = statement
        self._batcher: Batcher[tuple[Any, ...], bool] = Batcher(self._write)

    async def write(self, row: tuple[Any, ...]) -> bool:
        return await self._batcher.submit(row)

    async def _write(self, rows: list[tuple[Any, ...]]) -> list[bool]:
        try:
            # No explicit transaction: the write is one statement (atomic on its own),
            # so one round trip, not BEGIN + statement + COMMIT.
            written = await self.store.run(functools.partial(self._apply, rows))
        except OSError:
            raise
        except Exception as exc:
            raise StoreUnavailable(f"cannot write to the PostgreSQL store: {exc}") from exc
        return [row[0] in written for row in rows]

    async def _apply(self, rows: list[tuple[Any, ...]], conn: Any) -> set[str]:
        return await self.statement(conn, rows)

    async def drain(self) -> None:
        await self._batcher.drain()


async def settle_rows(conn: Any, rows: list[tuple[Any, ...]], *, store: PostgresStore
                      ) -> set[str]:
    """Write a batch of next states (in the caller's transaction); returns the ids
    written (the others had lost their lease) and announces the final ones."""
    columns = [list(col) for col in zip(*rows, strict=True)]
    written = {r["id"] for r in await conn.fetch(store.sql["settle"], *columns)}
    final = [row[0] for row in rows if row[0] in written and row[2] in FINAL_STATES]
    payload = ""
    for msg_id in final:
        if len(payload) + len(msg_id) + 1 > _NOTIFY_BYTES:
            await conn.execute("SELECT pg_notify($1, $2)", store.done_channel, payload)
            payload = ""
        payload = f"{payload},{msg_id}" if payload else msg_id
    if payload:
        await conn.execute("SELECT pg_notify($1, $2)", store.done_channel, payload)
    if any(row[0] in written and row[2] in ("queued", "deferred") for row in rows):
        await conn.execute("SELECT pg_notify($1, '')", store.work_channel)
    return written


class PgDelivery(Delivery):
    """The delivery policy writing to PostgreSQL, each write fenced by the claim."""

    def __init__(self, store: PostgresStore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.tokens: dict[str, uuid.UUID] = {}  # claimed ids -> their lease tokens
        self.raws: dict[str, str] = {}  # the text as claimed: rewritten only if changed
        self.records: dict[str, dict[str, Any]] = {}  # accepted, awaiting their record
        self.lost = 0  # writes refused because the lease had been lost
        # Concurrent senders' writes share transactions (group commits).
        self._accepts = GroupWrite(store, self._write_accepts)
        self._settles = GroupWrite(store, functools.partial(settle_rows, store=store))

    async def _write_accepts(self, conn: Any, rows: list[tuple[Any, ...]]) -> set[str]:
        columns = [list(col) for col in zip(*rows, strict=True)]
        return {r["id"] for r in await conn.fetch(self.store.sql["accepted"], *columns)}

    async def deliver(self, row: Any, transport: Transport) -> str:
        """Deliver one claimed row (id, lease_token, record, raw)."""
        msg_id: str = row["id"]
        self.tokens[msg_id] = row["lease_token"]
        self.claimed[msg_id] = None
        cancelled = False
        try:
            try:
                record: dict[str, Any] = orjson.loads(row["record"])
                if not isinstance(record, dict) or record.get("id") != msg_id:
                    raise ValueError("record id does not match its row")
            except (ValueError, TypeError) as exc:
                corrupt = {"id": msg_id, "state": "corrupt", "finished_at": self.clock(),
                           "last_error": {"message": f"unreadable record: {exc}"}}
                await self._settle("corrupt", corrupt)
                return self._done(corrupt, "corrupt")
            record["raw"] = self.raws[msg_id] = row["raw"]
            if "expires_at" in record and is_expired(record, self.clock()):
                return await self._finish(self._expired(record))  # never sent
            return await self._attempt(record, transport)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if self.claimed.get(msg_id) is None:
                self.claimed.pop(msg_id, None)
                token = self.tokens.get(msg_id)
                self._release(msg_id)
                if cancelled and token is not None:
                    # Stopped at the grace deadline: if nothing was written for this
                    # claim (no data sent), the run's end gives it back (a no-op if
                    # its outcome was written meanwhile).
                    self.tokens[msg_id] = token

    async def _attempt(self, record: dict[str, Any], transport: Transport) -> str:
        self.records[record["id"]] = record
        return await super()._attempt(record, transport)

    async def _persist_accepted(self, entry: dict[str, Any]) -> None:
        msg_id = entry["id"]
        token = self.tokens.get(msg_id)
        if token is None:
            return
        if not await self._accepts.write((msg_id, token, orjson.dumps(entry).decode())):
            self.lost += 1
            logger.error("message %s was accepted by the server after its lease was lost "
                         "(this deliverer stalled): another deliverer may send it again",
                         msg_id)

    def _release(self, msg_id: str) -> None:
        self.tokens.pop(msg_id, None)
        self.raws.pop(msg_id, None)
        if msg_id not in self.unsettled:
            self.records.pop(msg_id, None)

    async def _settle(self, state: str, record: dict[str, Any]) -> None:
        """Stage the next state; one transaction writes what concurrent senders staged
        (a group commit)."""
        msg_id = record["id"]
        token = self.tokens.get(msg_id)
        if token is None:
            return
        raw = record.get("raw")
        changed = raw if raw is not None and raw is not self.raws.get(msg_id) else None
        row = _settle_row({**record, "state": state}, token, changed, self.clock())
        if not await self._settles.write(row):
            self.lost += 1
            logger.error("message %s: its lease was lost (this deliverer stalled past it); "
                         "its %s state was not written over the newer attempt", msg_id, state)

    async def retry_unsettled(self) -> None:
        """Record messages the server accepted while the database refused their records
        (their leases are renewed meanwhile, so no other deliverer resends them)."""
        for msg_id, entry in list(self.unsettled.items()):
            record = self.records.get(msg_id)
            if record is None:
                self.unsettled.pop(msg_id, None)
                continue
            try:
                await self._persist_accepted(entry)
                state, settled = self.settle_accepted(record, entry)
                await self._settle(state, settled)
            except OSError as exc:
                logger.warning("message %s: accepted, still cannot record it: %s", msg_id, exc)
                return
            self.unsettled.pop(msg_id, None)
            self.claimed.pop(msg_id, None)
            self._release(msg_id)
            self._done(settled, state)

    async def drain(self) -> None:
        await super().drain()
        await self._accepts.drain()
        await self._settles.drain()
