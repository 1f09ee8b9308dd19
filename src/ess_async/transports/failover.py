"""Named relays and failover: ``[transport] failover = ["primary", "backup"]``.

Each send goes through the first relay in the list that is not marked down. A relay that
cannot be used (a connection, TLS or greeting failure, a 4xx at connect, a policy reply
about this client: a ``destination`` error, with nothing of the message delivered) is
marked down for ``failback_after`` seconds and the same message goes to the next relay
at once; once that time has passed the first relay is tried first again, so sending
moves back when it recovers. A reply about the message itself (4xx/5xx to RCPT or DATA,
an outcome unknown) never moves it to another relay: that could deliver it twice.

A message queued with ``create_work(transport="name")`` (``route``) goes through that
relay alone, whatever the failover order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import DeliveryError, PermanentDeliveryError
from .base import SendResult, Transport

__all__ = ("FailoverTransport",)

logger = logging.getLogger("ess_async.transports.failover")


class FailoverTransport(Transport):
    """Relays in order of preference, each a transport of its own (one connection)."""

    def __init__(self, relays: list[tuple[str, Transport]], *, failback_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 named: dict[str, Callable[[], Transport]] | None = None) -> None:
        if not relays:
            raise ValueError("failover needs at least one relay")
        self.relays = relays  # the failover order
        self._named = named or {}  # relays messages may pick by name, made when first used
        self._routed: dict[str, Transport] = {}
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

    def _by_name(self, name: str) -> Transport:
        for relay, transport in self.relays:
            if relay == name:
                return transport
        if name not in self._routed:
            if name not in self._named:  # the config changed since it was queued
                raise PermanentDeliveryError(
                    f"no relay {name!r} in the config ([transport.smtp.{name}])",
                    phase="CONNECT")
            self._routed[name] = self._named[name]()
        return self._routed[name]

    async def send(self, mail_from: str, recipients: list[str], raw: bytes, *,
                   smtputf8: bool = False) -> SendResult:
        if self.route is not None:  # the message named its relay: that one alone
            transport = self._current = self._by_name(self.route)
            transport.checkpoint = self.checkpoint
            return await transport.send(mail_from, recipients, raw, smtputf8=smtputf8)
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
        for transport in [t for _, t in self.relays] + list(self._routed.values()):
            await transport.close()
