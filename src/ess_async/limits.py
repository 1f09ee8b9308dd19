"""Per-domain limits (issue 14 part 4): a budget for each recipient domain.

``[limits."example.com"]`` sets ``max_connections`` (messages to that domain in flight at
once), ``max_per_second`` (sends to it start at least ``1 / max_per_second`` s apart: a
steady rate, no burst) and ``max_per_minute`` (at most that many sends start in any 60 s
window: a burst is allowed, the window is exact); ``[limits."*"]`` is the default, a budget
of its own for every other domain. A domain with neither has no limits.

A message needs budget in each of its recipient domains (all of them at once, never one
held while waiting for another, so nothing deadlocks) and is charged in each. The
limiter never sleeps: ``blocked`` says which domain a message must wait for and the
Manager parks it there (it stays in ``queued/``, not claimed, no attempt counted) while
the senders take other messages; ``ready_at`` says when a domain can take the next one.

Push-back at RCPT ("451 4.7.1 too many ...", 421 "try again later" for a recipient) is
the recipient domain's: it halves that domain's concurrency and pauses it (1 s, doubling
to 30 s while it keeps happening); ``recover_after`` successes to it earn one slot back.
Other domains are not slowed. The limiter is ``active`` (the Manager looks at a
message's domains before claiming it) only while some domain has limits or push-back.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from . import replies

__all__ = ("DomainLimiter", "domain_of", "domains_of", "pushback_domains")

DEFAULT_KEY = "*"
_GC_ABOVE = 10_000  # idle per-domain states are dropped beyond this many


class LimitsLike(Protocol):
    @property
    def max_connections(self) -> int: ...
    @property
    def max_per_second(self) -> float: ...
    @property
    def max_per_minute(self) -> int: ...


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lower case, no trailing dot, IDNA (A-label) form, so "Bücher.example." in the
    config matches "user@xn--bcher-kva.example" and the other way round."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


def domain_of(address: str) -> str:
    return normalize_domain(address.rpartition("@")[2])


def domains_of(recipients: Iterable[str]) -> frozenset[str]:
    return frozenset(domain_of(r) for r in recipients)


def pushback_domains(refused: Mapping[str, tuple[int, str] | list[object]]) -> set[str]:
    """The domains of recipients refused at RCPT with a push-back reply."""
    found = set()
    for rcpt, reply in refused.items():
        code, text = reply[0], reply[1]
        if isinstance(code, int) and replies.is_pushback(code, str(text), "RCPT"):
            found.add(domain_of(rcpt))
    return found


@dataclass
class _Domain:
    base: int  # concurrency without push-back (max_connections, or the senders')
    interval: float = 0.0  # 1 / max_per_second; 0 = no rate
    per_minute: int = 0
    limit: int = 0  # current concurrency limit (halved by push-back)
    active: int = 0
    next_slot: float = 0.0
    window: deque[float] = field(default_factory=deque)  # last per_minute send times
    paused_until: float = 0.0
    pause: float = 0.0
    last_event: float = -math.inf
    successes: int = 0

    def idle(self, now: float) -> bool:
        return (self.active == 0 and self.limit >= self.base and self.paused_until <= now
                and self.next_slot <= now and (not self.window or self.window[-1] + 60 <= now))


class DomainLimiter:
    """Budgets per recipient domain; see the module docstring."""

    def __init__(self, limits: Mapping[str, LimitsLike], *, default_concurrency: int,
                 min_pause: float = 1.0, max_pause: float = 30.0, recover_after: int = 10,
                 coalesce: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = {normalize_domain(k) if k != DEFAULT_KEY else k: v
                       for k, v in limits.items()}
        self.default_concurrency = max(1, default_concurrency)
        self.min_pause = min_pause
        self.max_pause = max_pause
        self.recover_after = recover_after
        self.coalesce = coalesce
        self.clock = clock
        self._states: dict[str, _Domain] = {}
        self._troubled: set[str] = set()  # pushed back and not yet recovered
        self.waits = 0  # times a message had to wait (parked): a hot loop would show here
        self.events = 0  # push-back events (a burst counted once per domain)

    @property
    def active(self) -> bool:
        return bool(self.limits) or bool(self._troubled)

    def _limits_for(self, domain: str) -> LimitsLike | None:
        return self.limits.get(domain) or self.limits.get(DEFAULT_KEY)

    def _state(self, domain: str, *, create: bool = True) -> _Domain | None:
        state = self._states.get(domain)
        if state is None:
            conf = self._limits_for(domain)
            if conf is None and not create:
                return None
            base = (conf.max_connections if conf is not None and conf.max_connections
                    else self.default_concurrency)
            state = _Domain(base=base, limit=base, pause=self.min_pause)
            if conf is not None:
                state.interval = 1.0 / conf.max_per_second if conf.max_per_second else 0.0
                state.per_minute = conf.max_per_minute
            if len(self._states) >= _GC_ABOVE:
                self._gc()
            self._states[domain] = state
        return state

    def _gc(self) -> None:
        now = self.clock()
        for name in [n for n, s in self._states.items() if s.idle(now)]:
            del self._states[name]

    def _tracked(self, domain: str) -> _Domain | None:
        """The state of a domain with limits or push-back; None for a free one."""
        state = self._states.get(domain)
        if state is not None:
            return state
        return self._state(domain, create=False)

    # -- deciding --------------------------------------------------------------------

    def ready_at(self, domain: str, now: float | None = None) -> float:
        """``now`` (or earlier) if ``domain`` can take a message now; the time it can by
        rate or pause; ``inf`` when only a finished send frees a slot."""
        now = self.clock() if now is None else now
        state = self._tracked(domain)
        if state is None:
            return now
        at = max(state.paused_until, state.next_slot)
        if state.per_minute and len(state.window) >= state.per_minute:
            at = max(at, state.window[-state.per_minute] + 60.0)
        if at > now:
            return at
        return now if state.active < state.limit else math.inf

    def paused(self, domain: str) -> bool:
        state = self._states.get(domain)
        return state is not None and state.paused_until > self.clock()

    def blocked(self, domains: Iterable[str]) -> tuple[str, float] | None:
        """None if every domain can take the message now; else the domain to wait for
        and when it is ready (the latest by time first; ``inf``: a slot)."""
        now = self.clock()
        timed: list[tuple[str, float]] = []
        slot: str | None = None
        for domain in domains:
            at = self.ready_at(domain, now)
            if at <= now:
                continue
            if math.isinf(at):
                slot = slot or domain
            else:
                timed.append((domain, at))
        # Wait for time before a slot: the slots are looked at again when the time comes.
        if timed:
            worst = max(timed, key=lambda pair: pair[1])
        elif slot is not None:
            worst = (slot, math.inf)
        else:
            return None
        self.waits += 1
        return worst

    def acquire(self, domains: Iterable[str]) -> None:
        """Charge a send to each domain (a slot, the rate, the minute's window)."""
        now = self.clock()
        for domain in domains:
            state = self._tracked(domain)
            if state is None:
                continue
            state.active += 1
            if state.interval:
                state.next_slot = max(now, state.next_slot) + state.interval
            if state.per_minute:
                state.window.append(now)
                while len(state.window) > state.per_minute:
                    state.window.popleft()

    def release(self, domains: Iterable[str]) -> None:
        for domain in domains:
            state = self._states.get(domain)
            if state is not None and state.active > 0:
                state.active -= 1

    # -- feedback --------------------------------------------------------------------

    def success(self, domains: Iterable[str]) -> None:
        now = self.clock()
        for domain in domains:
            state = self._states.get(domain)
            if state is None:
                continue
            state.successes += 1
            if state.successes >= self.recover_after:
                state.successes = 0
                state.pause = self.min_pause
                if state.limit < state.base:
                    state.limit += 1
            if state.limit >= state.base and state.paused_until <= now:
                self._troubled.discard(domain)

    def push_back(self, domains: Iterable[str]) -> None:
        """A domain's recipients were refused with push-back: halve its concurrency and
        pause it (several senders told at once are one event)."""
        now = self.clock()
        for domain in domains:
            state = self._state(domain)
            assert state is not None
            state.successes = 0
            self._troubled.add(domain)
            if now - state.last_event < self.coalesce:
                continue
            state.last_event = now
            self.events += 1
            state.limit = max(1, state.limit // 2)
            state.paused_until = max(state.paused_until, now + state.pause)
            state.pause = min(self.max_pause, state.pause * 2)

    def snapshot(self, domain: str) -> dict[str, float]:
        """A domain's state, for logs and tests."""
        state = self._states.get(domain)
        if state is None:
            return {}
        return {"active": state.active, "limit": state.limit, "base": state.base,
                "paused_until": state.paused_until}
