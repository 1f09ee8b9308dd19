"""The PostgreSQL store: one outbox shared by a fleet of hosts.

Rows in ``<schema>.messages`` (narrow: state, priority, due time, lease) and
``<schema>.bodies`` (the record and the message text). Enqueueing is a group commit:
concurrent ``enqueue`` calls of a process share one transaction, durable when they
return. Deliverers claim batches with ``FOR UPDATE SKIP LOCKED`` under a lease whose
fresh token fences every later write of that claim (``store.pgdeliver``). New work and
final outcomes are announced with NOTIFY, heard by one listening connection per process,
with a periodic poll as the safety net. The statements live in ``sql/``.

asyncpg is imported only when a PostgreSQL store is used (``pip install
'ess_async[postgres]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from ..batching import Batcher
from ..config import StoreConfig
from ..enqueue import Prepared
from ..errors import MessageNotFound, StoreError, StoreUnavailable
from ..ops import MessageInfo
from ..outcome import Outcome, message_id
from ..spool import FINAL_STATES, STATES
from .base import MessageRef, Store

__all__ = ("SCHEMA_VERSION", "PostgresStore", "masked_url")

logger = logging.getLogger("ess_async.store.postgres")

SCHEMA_VERSION = 1
_PRIORITY = {"high": 0, "normal": 1, "low": 2}
_POLL = 1.0  # seconds between polls while waiting: the safety net under NOTIFY
_T = TypeVar("_T")


def masked_url(url: str) -> str:
    """The URL without any password (in its user part or its query), for logs and
    status."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    if "password" in parts.query.lower():
        query = parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(query=urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in query], safe="*"))
    return urlunsplit(parts)


@functools.cache
def _statements() -> tuple[str, dict[str, str]]:
    folder = resources.files("ess_async.store").joinpath("sql")
    schema = folder.joinpath("schema.sql").read_text(encoding="utf-8")
    named: dict[str, str] = {}
    name = ""
    for line in folder.joinpath("queries.sql").read_text(encoding="utf-8").splitlines():
        if line.startswith("-- name:"):
            name = line.split(":", 1)[1].strip()
            named[name] = ""
        elif name and not line.startswith("--"):
            named[name] += line + "\n"
    return schema, named


def _set_event(event: asyncio.Event, *_args: Any) -> None:
    event.set()


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - the extra is missing
        raise StoreError("the PostgreSQL store needs asyncpg: pip install "
                         "'ess_async[postgres]'") from None
    return asyncpg


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be reached (vs. a statement's error)."""
    asyncpg = _import_asyncpg()
    return isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.PostgresConnectionError
                      | asyncpg.CannotConnectNowError | asyncpg.InterfaceError
                      | asyncpg.ConnectionDoesNotExistError | asyncpg.TooManyConnectionsError
                      | asyncpg.AdminShutdownError)


class PostgresStore(Store):
    """Messages in PostgreSQL: ``PostgresStore("postgresql://ess@db/mail")``.

    ``password``: given explicitly, else the URL's environment (PGPASSWORD, .pgpass)
    does. ``clock`` gives the times written (due times, leases), like the file store's.
    """

    kind = "postgres"

    def __init__(self, url: str, *, schema: str = "ess", password: str | None = None,
                 pool_size: int = 10, clock: Callable[[], float] = time.time,
                 name: str | None = None) -> None:
        self.url = url
        self.schema = schema
        self.clock = clock
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"  # claimed_by
        self._password = password
        self._pool_size = pool_size
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None
        schema_sql, named = _statements()
        quoted = '"' + schema.replace('"', '""') + '"'
        self._schema_sql = schema_sql.replace("{schema}", quoted)
        self.sql = {k: v.replace("{schema}", quoted) for k, v in named.items()}
        self.quoted_schema = quoted
        self.work_channel = f"{schema}_work"
        self.done_channel = f"{schema}_done"
        # Enqueue group commit.
        self._enqueues: Batcher[Prepared, str] = Batcher(self._insert)
        # The listening connection, fanned out to waiters.
        self._listener: Any = None
        self._listen_task: asyncio.Task[None] | None = None
        self._closing = False
        self.work_event = asyncio.Event()
        self._done_waiters: dict[str, set[asyncio.Event]] = {}

    @classmethod
    def from_config(cls, url: str, settings: StoreConfig, *, pool_size: int | None = None,
                    clock: Callable[[], float] = time.time) -> PostgresStore:
        """The store at ``url`` with the ``[store]`` settings: its schema, its pool size
        (``pool_size`` caps it), the password from ``password_env`` if that names one."""
        password = os.environ.get(settings.password_env) if settings.password_env else None
        size = settings.pool_size if pool_size is None else min(pool_size, settings.pool_size)
        return cls(url, schema=settings.schema, password=password, pool_size=size,
                   clock=clock)

    def __repr__(self) -> str:
        return f"PostgresStore({masked_url(self.url)!r}, schema={self.schema!r})"

    # -- connections -------------------------------------------------------------------

    async def open(self, *, check_schema: bool = True) -> None:
        if self._pool is not None:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is not None:
                return
            asyncpg = _import_asyncpg()
            try:
                pool = await asyncpg.create_pool(
                    self.url, password=self._password, min_size=1,
                    max_size=self._pool_size, command_timeout=60)
            except Exception as exc:
                if _unavailable(exc):
                    raise StoreUnavailable(f"cannot connect to {masked_url(self.url)}: "
                                           f"{exc}") from None
                if isinstance(exc, asyncpg.PostgresError):
                    # A wrong password, an unknown database or role: the configuration,
                    # not an outage (retrying would never help).
                    raise StoreError(f"cannot use {masked_url(self.url)}: {exc}") from None
                raise
            self._pool = pool
            if check_schema:
                try:
                    await self._check_schema()
                except BaseException:
                    await self.close()
                    raise

    async def close(self) -> None:
        self._closing = True
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(BaseException):
                await self._listen_task
            self._listen_task = None
        await self._enqueues.drain()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)
        self._closing = False

    async def run(self, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """``work(connection)`` on a pooled connection; a lost database raises
        StoreUnavailable."""
        async with self.transaction(atomic=False) as conn:
            return await work(conn)

    async def fetch(self, name: str, *args: Any) -> list[Any]:
        return await self.run(lambda conn: conn.fetch(self.sql[name], *args))

    @contextlib.asynccontextmanager
    async def transaction(self, *, atomic: bool = True) -> AsyncIterator[Any]:
        """A pooled connection in a transaction (``atomic=False``: each statement
        commits on its own); a lost database raises StoreUnavailable."""
        if self._pool is None:
            await self.open()
        try:
            async with self._pool.acquire() as conn:
                if atomic:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except StoreError:
            raise
        except Exception as exc:
            if _unavailable(exc):
                raise StoreUnavailable(f"PostgreSQL store unavailable: {exc}") from None
            raise

    # -- schema ------------------------------------------------------------------------

    async def schema_version(self) -> int:
        async def read(conn: Any) -> int:
            exists = await conn.fetchval("SELECT to_regclass($1)", f"{self.quoted_schema}.meta")
            if exists is None:
                return 0
            value = await conn.fetchval(
                f"SELECT value FROM {self.quoted_schema}.meta WHERE key = 'version'")
            return int(value or 0)
        return await self.run(read)

    async def _check_schema(self) -> None:
        version = await self.schema_version()
        if version != SCHEMA_VERSION:
            found = "no schema" if version == 0 else f"schema version {version}"
            raise StoreError(f"the database {masked_url(self.url)} has {found} in "
                             f"{self.schema!r} (this version needs {SCHEMA_VERSION}): run "
                             f"`ess-async db migrate`")

    async def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema; returns (version before, version after). Safe to
        run from several hosts at once (an advisory lock serializes them)."""
        await self.open(check_schema=False)
        q = self.quoted_schema

        async def upgrade(conn: Any) -> tuple[int, int]:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                   f"ess_async migrate {self.schema}")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {q}.meta "
                                   "(key text PRIMARY KEY, value text NOT NULL)")
                value = await conn.fetchval(f"SELECT value FROM {q}.meta WHERE key = 'version'")
                before = int(value or 0)
                if before > SCHEMA_VERSION:
                    raise StoreError(f"the schema {self.schema!r} is version {before}, newer "
                                     f"than this ess_async ({SCHEMA_VERSION}): upgrade it")
                if before < 1:
                    await conn.execute(self._schema_sql)
                await conn.execute(
                    f"INSERT INTO {q}.meta (key, value) VALUES ('version', $1) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    str(SCHEMA_VERSION))
                return before, SCHEMA_VERSION
        return await self.run(upgrade)

    # -- enqueueing --------------------------------------------------------------------

    def ref(self, msg_id: str) -> str:
        return msg_id

    async def enqueue(self, prepared: Prepared) -> MessageRef:
        return await self._enqueues.submit(prepared)

    async def _insert(self, batch: list[Prepared]) -> list[str]:
        """One transaction for the batch; each message's id (the first message's, for a
        repeated idempotency key)."""
        cols: list[list[Any]] = [[] for _ in range(8)]
        first: dict[str, str] = {}  # key -> the id of its first message in this batch
        for prepared in batch:
            record = prepared.record
            key = prepared.key_hash
            if key is not None:
                if key in first:
                    continue  # the same key twice in one batch: the first one wins
                first[key] = record["id"]
            body = {k: v for k, v in record.items() if k != "raw"}
            due = record.get("next_attempt_at") or record["created_at"]
            for col, value in zip(cols, (
                    record["id"], record["state"], _PRIORITY[record["priority"]], due,
                    record["created_at"], key, orjson.dumps(body).decode(), record["raw"]),
                    strict=True):
                col.append(value)
        resolved: dict[str, str] = {}
        if not first:
            # One statement, atomic and durable on its own: one round trip to commit
            # (the notification follows the commit; a lost one is covered by polling).
            async def insert(conn: Any) -> None:
                if await conn.fetch(self.sql["enqueue"], *cols):
                    await conn.execute("SELECT pg_notify($1, '')", self.work_channel)
            await self.run(insert)
            return [p.record["id"] for p in batch]
        async with self.transaction() as conn:
            inserted = {r["id"] for r in await conn.fetch(self.sql["enqueue"], *cols)}
            for key, msg_id in first.items():
                if msg_id not in inserted:  # an earlier message holds the key
                    existing = await conn.fetchval(self.sql["by_key"], key)
                    if existing is None:
                        raise StoreError("an idempotency key was freed while enqueueing; "
                                         "try again")
                    msg_id = existing
                resolved[key] = msg_id
            if inserted:
                await conn.execute("SELECT pg_notify($1, '')", self.work_channel)
        return [resolved[p.key_hash] if p.key_hash is not None else p.record["id"]
                for p in batch]

    # -- notifications -----------------------------------------------------------------

    async def listen(self) -> None:
        """Start this process's listening connection (new work, final outcomes);
        reconnects by itself. Without it, waiters and deliverers poll."""
        if self._listen_task is None or self._listen_task.done():
            self._listen_task = asyncio.create_task(self._listen_forever())

    async def _listen_forever(self) -> None:
        asyncpg = _import_asyncpg()
        delay = 0.5
        while not self._closing:
            conn = None
            try:
                conn = await asyncpg.connect(self.url, password=self._password)
                self._listener = conn
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(self.work_channel, self._on_work)
                await conn.add_listener(self.done_channel, self._on_done)
                delay = 0.5
                self.work_event.set()  # what was missed while not listening: poll once
                self._wake_all()
                await lost.wait()
            except asyncio.CancelledError:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
                raise
            except Exception as exc:
                logger.warning("PostgreSQL listener: %s; reconnecting in %.1f s", exc, delay)
            if conn is not None and not conn.is_closed():
                conn.terminate()
            self._listener = None
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _on_work(self, *_args: Any) -> None:
        self.work_event.set()

    def _on_done(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        for msg_id in payload.split(","):
            for event in self._done_waiters.get(msg_id, ()):
                event.set()

    def _wake_all(self) -> None:
        for events in self._done_waiters.values():
            for event in events:
                event.set()

    # -- reading -----------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        rows = await self.fetch("counts")
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    async def find(self, message: str | os.PathLike[str]) -> tuple[str, dict[str, Any] | None]:
        msg_id = message_id(message)
        rows = await self.fetch("find", msg_id)
        if not rows:
            raise MessageNotFound(msg_id)
        row = rows[0]
        if row["state"] == "corrupt":
            return "corrupt", None
        record: dict[str, Any] = orjson.loads(row["record"])
        record["state"] = row["state"]
        return row["state"], record

    async def wait(self, message: str | os.PathLike[str], *,
                   timeout: float | None = None) -> Outcome:
        msg_id = message_id(message)
        event = asyncio.Event()
        self._done_waiters.setdefault(msg_id, set()).add(event)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    state, record = await self.find(msg_id)
                    if state in FINAL_STATES:
                        if record is None:
                            return Outcome(id=msg_id, state=state, path=Path(msg_id))
                        return Outcome.from_record(state, Path(msg_id), record)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), _POLL)
        finally:
            events = self._done_waiters.get(msg_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._done_waiters[msg_id]

    # -- operations: see store.pgops ---------------------------------------------------

    async def list(self, states: Iterable[str] | str | None = None,
                   limit: int | None = None) -> list[MessageInfo]:
        from .pgops import list_messages
        return await list_messages(self, states, limit)

    async def show(self, message: str | os.PathLike[str], *,
                   raw: bool = False) -> dict[str, Any]:
        from .pgops import show
        return await show(self, message, raw=raw)

    async def retry(self, message: str | os.PathLike[str]) -> MessageRef:
        from .pgops import retry
        return await retry(self, message)

    async def retry_all(self, states: Iterable[str] | str = ("deferred", "failed")) -> int:
        from .pgops import retry_all
        return await retry_all(self, states)

    async def hold(self, message: str | os.PathLike[str]) -> MessageRef:
        from .pgops import hold
        return await hold(self, message)

    async def release(self, message: str | os.PathLike[str]) -> MessageRef:
        from .pgops import release
        return await release(self, message)

    async def delete(self, message: str | os.PathLike[str]) -> str:
        from .pgops import delete
        return await delete(self, message)

    async def purge(self, state: str, older_than: float | None = None, *,
                    keep: int = 0) -> int:
        from .pgops import purge
        return await purge(self, state, older_than, keep=keep)

