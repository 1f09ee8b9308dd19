"""Synchronous enqueue for code without an event loop (WSGI apps, scripts, the CLI)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import Config, load_config, relay_names
from .enqueue import Enqueuer, Prepared, prepare
from .manager import default_workspace
from .spool import Spool
from .suppression import SuppressionList

__all__ = ("Client",)


class Client:
    """``Client(workspace).create_work(**attrs)`` spools a message durably and returns its
    path. It never takes the workspace lock, so it works while a server delivers."""

    def __init__(self, workspace: str | os.PathLike[str] | None = None, *,
                 config: Config | None = None) -> None:
        self.workspace = Path(workspace).absolute() if workspace else default_workspace()
        self.config = config if config is not None else load_config(
            self.workspace / "config.toml")
        self.spool = Spool(self.workspace, max_size=self.config.server.max_message_size)
        self._enqueuer = Enqueuer(self.spool)
        self.suppression = SuppressionList(self.workspace,
                                           ttl_days=self.config.suppression.ttl_days)
        self._ensured = False

    def create_work(self, *, priority: str = "normal", send_at: object = None,
                    idempotency_key: str | None = None, expires_at: object = None,
                    expires_in: object = None, force: bool = False,
                    transport: str | None = None, **attrs: Any) -> Path:
        """Same arguments as ``Manager.create_work`` (``message=``, ``expires_at``,
        ``expires_in``, ``force`` and ``transport`` included); returns the spooled file's
        path."""
        prepared = prepare(attrs, self.config.message, now=time.time(), priority=priority,
                           send_at=send_at, idempotency_key=idempotency_key,
                           expires_at=expires_at, expires_in=expires_in,
                           suppressed=self.suppression.check, force=force,
                           transport=transport, relays=relay_names(self.config.transport))
        return self.commit_prepared(prepared)

    def commit_prepared(self, prepared: Prepared) -> Path:
        """Spool a message ``prepare`` validated (the Django backend validates at send
        time and spools when a transaction commits); returns the spooled file's path."""
        if not self._ensured:
            self.spool.ensure()
            self._ensured = True
        return self._enqueuer.commit(prepared)
