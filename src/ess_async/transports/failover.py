"""Failover across several relays: ``[transport] failover = ["primary", "backup"]``.

Each send goes through the first relay in the list that is not marked down. A relay that
cannot be used (a connection, TLS or greeting failure, a 4xx at connect, a policy reply
about this client: a ``destination`` error, with nothing of the message delivered) is
marked down for ``failback_after`` seconds and the same message goes to the next relay
at once; once that time has passed the first relay is tried first again, so sending
moves back when it recovers. A reply about the message itself (4xx/5xx to RCPT or DATA,
an outcome unknown) never moves it to another relay: that could deliver it twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import DeliveryError
from .base import SendResult, Transport

__all__ = ("FailoverTransport",)

logger = logging.getLogger("ess_async.transports.failover")


class FailoverTransport(Transport):
    """Relays in order of preference, each a transport of its own (one connection)."""

    def __init__(self, relays: list[tuple[str, Transport]], *, failback_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not relays:
            raise ValueError("failover needs at least one relay")
        self.relays = relays
        self.failback_after = failback_after
        self.clock = clock
        self._down_until = [0.0] * len(relays)
        self._current: Transport = relays[0][1]
        self._in_use: str | None = None  # the relay the last send went through

    # The sender reads these after a cancelled send: they are the current relay's.
    @property
    def outcome_pending(self) -> bool:
        return self._current.outcome_pending

    @outcome_pending.setter
    def outcome_pending(self, value: bool) -> None:
        self._current.outcome_pending = value

    @property
    def partial(self) -> SendResult | None:
        return self._current.partial

    @partial.setter
    def partial(self, value: SendResult | None) -> None:
        self._current.partial = value

    def _order(self) -> list[int]:
        now = self.clock()
        up = [i for i in range(len(self.relays)) if self._down_until[i] <= now]
        # All down: try them all anyway (the sender's throttle makes this a lone probe).
        return up or list(range(len(self.relays)))

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        failure: DeliveryError | None = None
        for index in self._order():
            name, transport = self.relays[index]
            self._current = transport
            transport.checkpoint = self.checkpoint
            try:
                result = await transport.send(mail_from, recipients, raw, smtputf8=smtputf8)
            except DeliveryError as exc:
                if not exc.destination or transport.partial is not None \
                        or exc.outcome_unknown:
                    raise  # about this message, or something of it was delivered
                self._down_until[index] = self.clock() + self.failback_after
                logger.warning("relay %s cannot be used (%s); trying the next one", name,
                               exc)
                failure = exc
                continue
            if self._in_use != name:
                logger.info("sending through relay %s", name)
                self._in_use = name
            self._down_until[index] = 0.0
            return result
        assert failure is not None
        raise failure

    async def close(self) -> None:
        for _, transport in self.relays:
            await transport.close()
