"""Django email backend: ``EMAIL_BACKEND = "ess_async.django.EmailBackend"``.

Every message Django sends (``send_mail``, ``send_mass_mail``, ``EmailMessage.send()``,
``EmailMultiAlternatives``, ``mail_admins``...) is spooled durably into an ess_async
workspace, exactly as Django built it (attachments, alternatives, headers); Bcc
recipients are on the envelope only. ``python -m ess_async serve`` (or a Manager) delivers
it. Settings (all optional)::

    ESS_ASYNC = {
        "WORKSPACE": "/var/spool/myapp/ess_data",  # default: $ESS_DATA, else ./ess_data
        "STORE_URL": None,      # a file path (or file:// URL) is used as the workspace
                                # when WORKSPACE is not set; other URLs are ignored
        "ON_COMMIT": False,     # True: queue when the surrounding transaction commits
        "FAIL_SILENTLY": False, # True: invalid messages are skipped, not raised
    }

Per message, these headers are read and removed before the message is spooled:
``X-ESS-Priority: high|normal|low``, ``X-ESS-Send-At`` (ISO 8601 with an offset, e.g.
``2026-12-01T09:00:00+01:00``) and ``X-ESS-Idempotency-Key``. The same can be given as
attributes of the EmailMessage: ``ess_priority``, ``ess_send_at`` (an aware datetime) and
``ess_idempotency_key``. ``get_connection("ess_async.django.EmailBackend",
workspace=..., on_commit=...)`` overrides the settings for one connection.

Django is imported lazily: this module needs it only when a backend is used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from .client import Client
from .enqueue import Prepared, prepare
from .errors import MessageError

__all__ = ("HEADER_IDEMPOTENCY_KEY", "HEADER_PRIORITY", "HEADER_SEND_AT", "EmailBackend")

HEADER_PRIORITY = "X-ESS-Priority"
HEADER_SEND_AT = "X-ESS-Send-At"
HEADER_IDEMPOTENCY_KEY = "X-ESS-Idempotency-Key"
_OPTION_HEADERS = (HEADER_PRIORITY, HEADER_SEND_AT, HEADER_IDEMPOTENCY_KEY)


def _settings() -> dict[str, Any]:
    from django.conf import settings

    value = getattr(settings, "ESS_ASYNC", None) or {}
    if not isinstance(value, dict):
        raise MessageError("ESS_ASYNC", "the ESS_ASYNC setting must be a dict")
    return value


def _workspace_from(conf: dict[str, Any]) -> str | None:
    if conf.get("WORKSPACE"):
        return str(os.fspath(conf["WORKSPACE"]))
    url = conf.get("STORE_URL")
    if not url or not isinstance(url, str | os.PathLike):
        return None
    text = os.fspath(url)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return unquote(parts.path)
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or C:\...)
        return text
    return None  # another store's URL: not used by this backend


def _send_at(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise MessageError(f"headers.{HEADER_SEND_AT}",
                           f"not an ISO 8601 date and time: {value!r}") from None
    if when.tzinfo is None:
        raise MessageError(f"headers.{HEADER_SEND_AT}",
                           f"needs an offset (e.g. +00:00): {value!r}")
    return when


class EmailBackend:
    """A Django email backend that spools into an ess_async workspace (see the module)."""

    def __init__(self, fail_silently: bool = False, *,
                 workspace: str | os.PathLike[str] | None = None,
                 on_commit: bool | None = None, **kwargs: Any) -> None:
        conf = _settings()
        self.fail_silently = bool(fail_silently or conf.get("FAIL_SILENTLY", False))
        self.workspace = os.fspath(workspace) if workspace else _workspace_from(conf)
        self.on_commit = bool(conf.get("ON_COMMIT", False) if on_commit is None
                              else on_commit)
        self._client: Client | None = None

    # Django's backend protocol ------------------------------------------------------

    def open(self) -> bool:
        """Load the workspace's config (once); nothing stays open."""
        if self._client is None:
            self._client = Client(Path(self.workspace) if self.workspace else None)
            return True
        return False

    def close(self) -> None:
        """Nothing to release: every message is durable when ``send_messages`` returns."""

    def __enter__(self) -> EmailBackend:
        try:
            self.open()
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def send_messages(self, email_messages: Iterable[Any]) -> int:
        """Spool each message; return how many were queued (with ``ON_COMMIT``: how many
        will be queued when the transaction commits). Messages without recipients are
        skipped, as Django's SMTP backend does. A message that fails validation raises
        MessageError, or is skipped (not counted) with ``fail_silently``."""
        messages = list(email_messages)
        if not messages:
            return 0
        try:
            self.open()
        except Exception:
            if self.fail_silently:
                return 0
            raise
        client = self._client
        assert client is not None
        count = 0
        for email_message in messages:
            if not email_message.recipients():
                continue
            try:
                prepared = self._prepare(client, email_message)
            except Exception:
                if not self.fail_silently:
                    raise
                continue
            if self.on_commit:
                from django.db import transaction

                transaction.on_commit(self._committer(client, prepared))
            else:
                try:
                    client.commit_prepared(prepared)
                except Exception:
                    if not self.fail_silently:
                        raise
                    continue
            count += 1
        return count

    # ---------------------------------------------------------------------------------

    def _prepare(self, client: Client, email_message: Any) -> Prepared:
        headers = {str(k).lower(): v for k, v in (email_message.extra_headers or {}).items()}
        priority = getattr(email_message, "ess_priority", None) or headers.get(
            HEADER_PRIORITY.lower(), "normal")
        send_at = getattr(email_message, "ess_send_at", None) or _send_at(
            headers.get(HEADER_SEND_AT.lower()))
        key = getattr(email_message, "ess_idempotency_key", None) or headers.get(
            HEADER_IDEMPOTENCY_KEY.lower())
        if isinstance(priority, str):
            priority = priority.strip().lower()
        msg = email_message.message()
        for name in _OPTION_HEADERS:
            del msg[name]
        attrs = {"message": msg, "from_": email_message.from_email,
                 "to": list(email_message.to), "cc": list(email_message.cc),
                 "bcc": list(email_message.bcc)}
        return prepare(attrs, client.config.message, now=time.time(), priority=priority,
                       send_at=send_at, idempotency_key=key)

    def _committer(self, client: Client, prepared: Prepared) -> Callable[[], None]:
        def commit() -> None:
            try:
                client.commit_prepared(prepared)
            except Exception:
                if not self.fail_silently:
                    raise
        return commit
