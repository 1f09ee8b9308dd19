"""Exception hierarchy: one root, subclasses that also inherit the matching builtin."""

from __future__ import annotations

__all__ = (
    "ConfigError",
    "DeliveryError",
    "EssError",
    "MessageError",
    "MessageNotFound",
    "PermanentDeliveryError",
    "SpoolError",
    "StoreError",
    "StoreUnavailable",
    "TemporaryDeliveryError",
    "WorkspaceLockedError",
)


class EssError(Exception):
    """Root of every error ess_async raises on purpose."""


class MessageError(EssError, ValueError):
    """A message given to ``create_work`` is invalid; ``.field`` names the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class MessageNotFound(EssError, LookupError):
    """No message with this id is in the spool (never queued, or purged)."""

    def __init__(self, msg_id: str) -> None:
        self.id = msg_id
        super().__init__(f"no message {msg_id} in the spool")


class ConfigError(EssError, ValueError):
    """The configuration file is unreadable or holds a bad key or value; ``.key`` names it."""

    def __init__(self, key: str, problem: str, *, path: object = None) -> None:
        self.key = key
        self.problem = problem
        self.path = path
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{key}: {problem}" if key else f"{where}{problem}")


class WorkspaceLockedError(EssError, RuntimeError):
    """Another process is already delivering this workspace."""

    def __init__(self, workspace: object, pid: int | None) -> None:
        self.workspace = workspace
        self.pid = pid
        holder = f" (pid {pid})" if pid else ""
        super().__init__(
            f"workspace {workspace} is already being delivered by another process{holder}")


class SpoolError(EssError, OSError):
    """A spool operation failed (disk full, permissions, ...)."""


class StoreError(EssError):
    """The message store refused an operation (e.g. a database without the schema:
    run ``ess-async db migrate``)."""


class StoreUnavailable(StoreError, ConnectionError):
    """The message store cannot be reached (PostgreSQL down or unreachable); nothing was
    written. Enqueueing raises it; deliverers retry with backoff."""


class DeliveryError(EssError):
    """A transport could not deliver a message. ``code`` is the SMTP reply code, if any.

    ``pushback`` marks a server asking its clients to slow down (421, "too many",
    refused connections). ``refused`` maps recipients refused at RCPT to (code, reply)
    when every recipient was refused; ``phase`` is the SMTP step that failed;
    ``outcome_unknown`` means the connection was lost
    after the message data was sent, so the server may have accepted it.
    ``destination`` marks a failure of the relay or of this client's configuration rather
    than of the message (cannot connect, TLS or greeting failure, authentication, a
    ``530``/``5.7.x`` policy reply about the client): the message is not charged an
    attempt and the destination is backed off instead.
    """

    temporary: bool = True

    def __init__(self, message: str, *, code: int | None = None, pushback: bool = False,
                 refused: dict[str, tuple[int, str]] | None = None,
                 outcome_unknown: bool = False, phase: str | None = None,
                 destination: bool = False) -> None:
        self.code = code
        self.phase = phase  # the SMTP step that failed: CONNECT, MAIL, RCPT or DATA
        self.message = message
        self.pushback = pushback
        self.refused = refused or {}
        self.outcome_unknown = outcome_unknown
        self.destination = destination
        super().__init__(f"{code} {message}" if code else message)


class TemporaryDeliveryError(DeliveryError, ConnectionError):
    """Try again later: a 4xx reply, a refused or dropped connection, a timeout."""

    temporary = True


class PermanentDeliveryError(DeliveryError):
    """Do not try again: a 5xx reply."""

    temporary = False
