"""Queue operations on the PostgreSQL store (mailq / postsuper), with the semantics of
``ops.QueueOps``: the same errors, the same record changes, the same ``MessageInfo``.

Each change is one statement guarded by the states it applies to (see ``ops_*`` in
``sql/queries.sql``). A deliverer's claim locks a row and makes it ``active``; a change
that meets a claim waits for it, then finds the row active and changes nothing. When a
change updates no row, the message is looked up to raise the error that says why
(MessageNotFound, MessageBusy for an active one, MessageStateError for another state).
The record in ``bodies.record`` is kept in step with the hot columns (``state``,
``due``, ``finished_at``).

Where the file store returns a spool path, these return the message id. Differences
from the file store, by nature of the store:

* ``show`` has no ``path``; a quarantined message shows ``id``, ``state``, ``reason``,
  ``quarantined_at`` and its text (``raw_size``, or ``raw``), not the file's ``kind``,
  ``size`` and ``original_name``;
* the age of a quarantined message counts from its ``created_at`` (the file store, which
  may not be able to read the file, counts from the time in its id);
* ``purge`` ages a final message without a ``finished_at`` from its ``created_at`` (the
  file store: from its file's modification time).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import MessageNotFound
from ..ops import (
    _PRIORITY_NAMES,
    HOLDABLE,
    RETRYABLE,
    MessageBusy,
    MessageInfo,
    MessageStateError,
    QueueOps,
    _error_text,
    _number,
    check_purge,
)
from ..outcome import message_id
from ..spool import STATES

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = ("delete", "hold", "list_messages", "purge", "release", "retry", "retry_all",
           "show")

PURGE_BATCH = 1000  # rows deleted per transaction
RETRY_BATCH = 1000  # messages retried per statement by retry_all
_TRIES = 5  # attempts at a change whose message keeps moving under it


# -- helpers ---------------------------------------------------------------------------


def _json(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


async def _notify_work(conn: Any, store: PostgresStore) -> None:
    await conn.execute("SELECT pg_notify($1, '')", store.work_channel)


async def _why(conn: Any, store: PostgresStore, msg_id: str, op: str,
               allowed: tuple[str, ...], problem: str) -> None:
    """Raise the error for a change that updated no row; return if the message is now in
    one of ``allowed`` (it moved under the change: try again)."""
    state = await conn.fetchval(store.sql["state"], msg_id)
    if state is None:
        raise MessageNotFound(msg_id)
    if state == "active":
        raise MessageBusy(msg_id, state, op)
    if state not in allowed:
        raise MessageStateError(msg_id, state, op, problem)


async def _change(store: PostgresStore, msg_id: str, op: str, allowed: tuple[str, ...],
                  problem: str, name: str, *args: Any, notify: bool = False) -> Any:
    """Run the guarded statement ``name``; its first row, or the error that says why
    there is none."""
    async def work(conn: Any) -> Any:
        for _ in range(_TRIES):
            row = await conn.fetchrow(store.sql[name], *args)
            if row is not None:
                if notify:
                    await _notify_work(conn, store)
                return row
            await _why(conn, store, msg_id, op, allowed, problem)
        raise MessageBusy(msg_id, "moving between states", op)
    return await store.run(work)


# -- reading ---------------------------------------------------------------------------


def _info(row: Any, now: float) -> MessageInfo:
    msg_id: str = row["id"]
    state: str = row["state"]
    fallback = _PRIORITY_NAMES.get(msg_id[21:22], "normal")
    age = now - float(row["created_at"])
    last_error = _json(row["last_error"])
    if state == "corrupt":
        return MessageInfo(msg_id, state, age, priority=fallback,
                           last_error=_error_text(last_error) or "quarantined")
    subject = _json(row["subject"])
    recipients = _json(row["recipients"])
    priority = _json(row["priority"])
    return MessageInfo(
        id=msg_id, state=state, age=age, attempts=int(row["attempts"]),
        recipients=list(recipients) if isinstance(recipients, list) else [],
        subject=subject if isinstance(subject, str) else None,
        last_error=_error_text(last_error),
        next_attempt_at=_number(_json(row["next_attempt_at"])),
        priority=str(priority or fallback))


async def list_messages(store: PostgresStore, states: Iterable[str] | str | None,
                        limit: int | None) -> list[MessageInfo]:
    """Messages in ``states`` (default: all), oldest first, at most ``limit``."""
    wanted = QueueOps._states(states, STATES)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more, not {limit}")
    rows = await store.fetch("ops_list", list(dict.fromkeys(wanted)), limit)
    now = store.clock()
    return [_info(row, now) for row in rows]


async def show(store: PostgresStore, message: str | os.PathLike[str], *,
               raw: bool = False) -> dict[str, Any]:
    """The record with its ``state``; ``raw_size`` (bytes) instead of the text unless
    ``raw``. A quarantined message gives its reason."""
    msg_id = message_id(message)
    rows = await store.fetch("ops_show", msg_id, raw)
    if not rows:
        raise MessageNotFound(msg_id)
    row = rows[0]
    state: str = row["state"]
    record = _json(row["record"])
    if not isinstance(record, dict):
        record = {"id": msg_id}
    if state == "corrupt":
        details: dict[str, Any] = {
            "id": msg_id, "state": state,
            "reason": _error_text(record.get("last_error")),
            "quarantined_at": _number(row["finished_at"])}
    else:
        details = {**record, "state": state}
    if raw:
        details["raw"] = row["raw"]
    else:
        details["raw_size"] = row["raw_size"]
    return details


# -- changing one message --------------------------------------------------------------


async def retry(store: PostgresStore, message: str | os.PathLike[str]) -> str:
    """Send a deferred or failed message again now (queued, due now; attempts are kept,
    a failed one loses its result). Returns its id."""
    msg_id = message_id(message)
    await _change(store, msg_id, "retry", RETRYABLE,
                  "only deferred or failed messages can be retried",
                  "ops_retry", [msg_id], store.clock(), list(RETRYABLE), notify=True)
    return store.ref(msg_id)


async def retry_all(store: PostgresStore,
                    states: Iterable[str] | str = RETRYABLE) -> int:
    """Retry every message in ``states`` (deferred and/or failed); how many were. Those
    claimed or changed meanwhile are skipped."""
    wanted = QueueOps._states(states, RETRYABLE)

    async def work(conn: Any) -> int:
        count = 0
        for state in dict.fromkeys(wanted):
            after = ""
            while True:
                ids: list[str] = [r["id"] for r in await conn.fetch(
                    store.sql["ops_ids"], state, after, RETRY_BATCH)]
                if not ids:
                    break
                moved = await conn.fetch(store.sql["ops_retry"], ids, store.clock(),
                                         [state])
                if moved:
                    count += len(moved)
                    await _notify_work(conn, store)
                if len(ids) < RETRY_BATCH:
                    break
                after = ids[-1]
        return count
    return await store.run(work)


async def hold(store: PostgresStore, message: str | os.PathLike[str]) -> str:
    """Park a queued, scheduled or deferred message: never sent until released. Returns
    its id."""
    msg_id = message_id(message)
    await _change(store, msg_id, "hold", HOLDABLE,
                  "only queued, scheduled or deferred messages can be held",
                  "ops_hold", msg_id, store.clock())
    return store.ref(msg_id)


async def release(store: PostgresStore, message: str | os.PathLike[str]) -> str:
    """Put a held message back: scheduled if its ``send_at`` is still ahead, else queued
    (sent now). Returns its id."""
    msg_id = message_id(message)
    await _change(store, msg_id, "release", ("held",), "only held messages can be released",
                  "ops_release", msg_id, store.clock(), notify=True)
    return store.ref(msg_id)


async def delete(store: PostgresStore, message: str | os.PathLike[str]) -> str:
    """Remove a message, whatever its state but active, and its idempotency key; returns
    the state it was in."""
    msg_id = message_id(message)
    every = tuple(s for s in STATES if s != "active")
    row = await _change(store, msg_id, "delete", every, "", "ops_delete", msg_id)
    return str(row["state"])


# -- many messages ---------------------------------------------------------------------


async def purge(store: PostgresStore, state: str, older_than: float | None = None, *,
                keep: int = 0) -> int:
    """Delete passed, failed or corrupt messages finished (quarantined) more than
    ``older_than`` seconds ago and, with ``keep``, all but the newest ``keep`` passed or
    failed ones, with their idempotency keys; how many. A transaction per batch of
    ``PURGE_BATCH``; also the ``[server] keep_*`` retention of the PostgreSQL store."""
    seconds, keep = check_purge(state, older_than, keep)
    cutoff = None if seconds is None else store.clock() - seconds

    async def work(conn: Any) -> int:
        removed = 0
        steps: list[tuple[str, float | int]] = []
        if cutoff is not None:
            steps.append(("ops_purge", cutoff))  # finished before the cutoff
        if keep:
            steps.append(("ops_purge_beyond", keep))  # then all but the newest `keep`
        for name, arg in steps:
            while True:
                gone = len(await conn.fetch(store.sql[name], state, arg, PURGE_BATCH))
                removed += gone
                if gone < PURGE_BATCH:
                    break
        return removed
    return await store.run(work)
