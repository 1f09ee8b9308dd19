"""ess_async: a durable asyncio email outbox.

Messages are written to an on-disk spool (or a PostgreSQL store shared by several hosts)
before ``create_work`` returns, and delivered over SMTP by ``spawn`` concurrent senders.
"""

from __future__ import annotations

from .client import Client
from .config import Config, load_config
from .delivery import WorkloadSummary
from .errors import (
    ConfigError,
    DeliveryError,
    EssError,
    MessageError,
    MessageNotFound,
    PermanentDeliveryError,
    SpoolError,
    StoreError,
    StoreUnavailable,
    TemporaryDeliveryError,
    WorkspaceLockedError,
)
from .manager import Manager
from .ops import MessageBusy, MessageInfo, MessageStateError, QueueOps
from .outcome import Outcome
from .store import Store
from .store.file import FileStore
from .store.postgres import PostgresStore
from .transports import SendResult, Transport

__all__ = (
    "Client",
    "Config",
    "ConfigError",
    "DeliveryError",
    "EssError",
    "FileStore",
    "Manager",
    "MessageBusy",
    "MessageError",
    "MessageInfo",
    "MessageNotFound",
    "MessageStateError",
    "Outcome",
    "PermanentDeliveryError",
    "PostgresStore",
    "QueueOps",
    "SendResult",
    "SpoolError",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TemporaryDeliveryError",
    "Transport",
    "WorkloadSummary",
    "WorkspaceLockedError",
    "__version__",
    "load_config",
)

__version__ = "0.1.0"
