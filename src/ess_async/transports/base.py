"""The transport contract: hand one rendered message to somewhere that delivers it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ("SendResult", "Transport")


@dataclass(frozen=True)
class SendResult:
    """What the server said when it accepted a message.

    ``refused`` maps each recipient the server refused (while accepting others) to its
    ``(code, reply)``.
    """

    code: int
    message: str
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class Transport(ABC):
    """One delivery channel; each sender owns one, so a transport need not be shared-safe.

    ``send`` returns a SendResult when the message was accepted, and raises
    TemporaryDeliveryError (try later) or PermanentDeliveryError (give up) otherwise.

    ``outcome_pending`` is True from the moment the whole message may have reached the
    receiver (the end of DATA was written) until its reply has been read: a send that is
    cancelled or fails while it is True may have been delivered (outcome unknown), one
    that ends while it is False was certainly not.

    ``partial`` is None at the start of each ``send`` and stays None until a transaction
    of that send is accepted (a final 2xx). From then on it is the SendResult the send
    would return if it ended at that point: the message was delivered to every recipient
    not in its ``refused``; the others are in ``refused`` with their own refusal or with a
    4xx (not sent yet, or, while a later transaction's final reply is pending, outcome
    unknown), so they are retried later for themselves alone. A message goes out in more
    than one transaction when the server limits the recipients per transaction (SMTP
    452 "too many recipients"); ``code`` and ``message`` are the last accepted final
    reply. Once ``partial`` is set, ``send`` never raises a DeliveryError (a later
    transaction's failure is returned as refusals), so it is only meaningful when a send
    is cancelled (or interrupted by another BaseException): a sender cancelled while
    ``partial`` is set must finish the message as accepted with ``partial`` (never
    requeue it, never record the whole message as outcome unknown); ``partial`` takes
    precedence over ``outcome_pending``. After a send returns, ``partial`` is its result.

    ``checkpoint``, when the caller sets it, is awaited with ``partial`` after each
    accepted transaction that more will follow, before the next one starts: the sender
    makes that partial delivery durable, so a crash later in the send never sends the
    message again to recipients who already have it.
    """

    outcome_pending: bool = False
    partial: SendResult | None = None
    checkpoint: Callable[[SendResult], Awaitable[None]] | None = None
    # The named relay the next message must go through (``create_work(transport=...)``),
    # set by the sender before each send; a transport without named relays ignores it.
    route: str | None = None

    @abstractmethod
    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        """Deliver ``raw`` to ``recipients``; ``smtputf8``: addresses and headers are
        UTF-8 (RFC 6531), so the server must support SMTPUTF8."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the transport may be used again afterwards."""
