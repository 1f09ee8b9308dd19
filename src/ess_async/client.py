"""Synchronous enqueue for code without an event loop (WSGI apps, scripts, the CLI)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .config import Config, load_config, relay_names
from .enqueue import Enqueuer, Prepared, prepare
from .manager import default_workspace, store_url
from .spool import Spool
from .store.postgres import PostgresStore
from .suppression import SuppressionList

_T = TypeVar("_T")

__all__ = ("Client",)


class Client:
    """``Client(workspace).create_work(**attrs)`` spools a message durably and returns its
    path. It never takes the workspace lock, so it works while a server delivers.

    With a PostgreSQL store (``store=`` URL, ``$ESS_STORE_URL`` or ``[store] url``) it
    returns the message id; one background thread runs the store's connections (and
    groups concurrent calls from several threads into one commit); ``close()`` ends it.
    """

    def __init__(self, workspace: str | os.PathLike[str] | None = None, *,
                 config: Config | None = None, store: str | None = None) -> None:
        self.workspace = Path(workspace).absolute() if workspace else default_workspace()
        self.config = config if config is not None else load_config(
            self.workspace / "config.toml")
        self.store_url = store_url(store, self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: PostgresStore | None = None
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.spool = Spool(self.workspace, max_size=self.config.server.max_message_size)
        self._enqueuer = Enqueuer(self.spool)
        self.suppression = SuppressionList(self.workspace,
                                           ttl_days=self.config.suppression.ttl_days)
        self._ensured = False

    def create_work(self, *, priority: str = "normal", send_at: object = None,
                    idempotency_key: str | None = None, expires_at: object = None,
                    expires_in: object = None, force: bool = False,
                    transport: str | None = None, **attrs: Any) -> Path | str:
        """Same arguments as ``Manager.create_work`` (``message=``, ``expires_at``,
        ``expires_in``, ``force`` and ``transport`` included); returns the spooled file's
        path."""
        prepared = prepare(attrs, self.config.message, now=time.time(), priority=priority,
                           send_at=send_at, idempotency_key=idempotency_key,
                           expires_at=expires_at, expires_in=expires_in,
                           suppressed=self.suppression.check, force=force,
                           transport=transport, relays=relay_names(self.config.transport))
        return self.commit_prepared(prepared)

    def commit_prepared(self, prepared: Prepared) -> Path | str:
        """Spool a message ``prepare`` validated (the Django backend validates at send
        time and spools when a transaction commits); returns the spooled file's path."""
        if self.store_url:
            store = self._pg()
            return self._call(store.enqueue(prepared))
        if not self._ensured:
            self.spool.ensure()
            self._ensured = True
        return self._enqueuer.commit(prepared)

    # -- the PostgreSQL store ----------------------------------------------------------

    def _pg(self) -> PostgresStore:
        with self._start:
            if self._store is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever,
                                                name="ess-async-client", daemon=True)
                self._thread.start()
                self._loop = loop
                self._store = PostgresStore.from_config(self.store_url, self.config.store)
            return self._store

    def _call(self, work: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def close(self) -> None:
        """Close the store's connections and thread (PostgreSQL store; else nothing)."""
        with self._start:
            store, loop, thread = self._store, self._loop, self._thread
            self._store = self._loop = self._thread = None
        if store is not None and loop is not None and thread is not None:
            asyncio.run_coroutine_threadsafe(store.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
