"""Issue 14 part 4: per-domain limits ([limits."domain"] max_connections, max_per_second,
max_per_minute, a "*" default) and push-back per recipient domain."""

from __future__ import annotations

import asyncio
import math
import time
import tomllib
from pathlib import Path

import pytest

from ess_async import Manager
from ess_async.config import CONFIG_TEMPLATE, DomainLimits, parse_config
from ess_async.errors import ConfigError
from ess_async.limits import DomainLimiter, domains_of, pushback_domains
from ess_async.spool import decode_record

from .conftest import RecordingHandler, SMTPServer, make_config


def timed(server: SMTPServer) -> list[tuple[float, str]]:
    """Record (monotonic time, recipient domain) for each message the server accepts."""
    handler = server.handler
    received: list[tuple[float, str]] = []
    original = handler.handle_DATA

    async def handle_data(srv, session, envelope):  # type: ignore[no-untyped-def]
        reply = await original(srv, session, envelope)
        if reply.startswith("250"):
            received.append((time.monotonic(), envelope.rcpt_tos[0].rpartition("@")[2]))
        return reply

    handler.handle_DATA = handle_data  # type: ignore[method-assign]
    return received


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- config ---------------------------------------------------------------------------


def test_limits_config() -> None:
    """Issue 14 part 4: [limits."domain"] tables and the "*" default parse into
    DomainLimits; unknown keys, bad values and a domain named twice are ConfigErrors
    naming the key; the template documents the keys and still parses to the defaults."""
    config = parse_config({"limits": {"Slow.Example": {"max_per_second": 5},
                                      "*": {"max_connections": 3, "max_per_minute": 600}}})
    assert config.limits == {"Slow.Example": DomainLimits(max_per_second=5.0),
                             "*": DomainLimits(max_connections=3, max_per_minute=600)}
    bad = [({"a.example": {"max_per_hour": 1}}, 'limits."a.example".max_per_hour'),
           ({"a.example": {"max_per_second": -1}}, 'limits."a.example".max_per_second'),
           ({"a.example": {"max_per_minute": 1.5}}, 'limits."a.example".max_per_minute'),
           ({"a.example": {"max_connections": "2"}}, 'limits."a.example".max_connections'),
           ({"A.example": {}, "a.example.": {}}, 'limits."a.example."'),
           ({"user@a.example": {}}, 'limits."user@a.example"'),
           ({"a.example": 3}, 'limits."a.example"')]
    for limits, key in bad:
        with pytest.raises(ConfigError) as caught:
            parse_config({"limits": limits})
        assert caught.value.key == key, limits
    for key in ("[limits.", "max_per_minute", 'limits."*"'):
        assert key in CONFIG_TEMPLATE
    assert parse_config(tomllib.loads(CONFIG_TEMPLATE)).limits == {}


# -- the limiter alone ----------------------------------------------------------------


def test_limiter_budgets() -> None:
    """Issue 14 part 4: per-second spacing, an exact per-minute window, concurrency per
    domain, the "*" default per domain, and a message to several domains needs budget in
    each (and is charged in each)."""
    clock = Clock()
    limiter = DomainLimiter({"slow.example": DomainLimits(max_per_second=5),
                             "minute.example": DomainLimits(max_per_minute=3),
                             "*": DomainLimits(max_connections=2)},
                            default_concurrency=10, clock=clock)
    assert limiter.active
    slow = frozenset({"slow.example"})
    assert limiter.blocked(slow) is None
    limiter.acquire(slow)
    assert limiter.blocked(slow) == ("slow.example", pytest.approx(1000.2))
    clock.now += 0.2
    assert limiter.blocked(slow) is None
    # The minute's window: three at once, the fourth when the first leaves the window.
    minute = frozenset({"minute.example"})
    for _ in range(3):
        assert limiter.blocked(minute) is None
        limiter.acquire(minute)
        limiter.release(minute)
        clock.now += 1
    assert limiter.blocked(minute) == ("minute.example", pytest.approx(1000.2 + 60))
    # "*": two in flight per domain, each domain its own budget.
    for name in ("a.example", "b.example"):
        for _ in range(2):
            assert limiter.blocked({name}) is None
            limiter.acquire({name})
        assert limiter.blocked({name}) == (name, math.inf)
    limiter.release({"a.example"})
    # Several domains: the one blocking by time is waited for first, then slots.
    both = {"a.example", "slow.example"}
    limiter.acquire({"slow.example"})
    assert limiter.blocked(both)[0] == "slow.example"
    clock.now += 0.2
    assert limiter.blocked(both) is None
    limiter.acquire(both)
    assert limiter.blocked({"a.example"}) == ("a.example", math.inf)
    assert limiter.blocked({"slow.example"})[0] == "slow.example"
    assert domains_of(["x@Slow.Example.", "y@b.example"]) == {"slow.example", "b.example"}


def test_limiter_push_back_is_per_domain() -> None:
    """Issue 14 part 4: push-back halves and pauses the domain that said it, a burst is
    one event, and successes earn the slots back; other domains are untouched."""
    clock = Clock()
    limiter = DomainLimiter({}, default_concurrency=8, clock=clock, recover_after=2)
    assert not limiter.active
    assert pushback_domains({"a@push.example": (451, "4.7.1 Please slow down"),
                             "b@other.example": (450, "4.2.1 mailbox busy")}) == \
        {"push.example"}
    limiter.push_back({"push.example"})
    limiter.push_back({"push.example"})  # the same burst
    assert limiter.active and limiter.events == 1
    assert limiter.snapshot("push.example")["limit"] == 4
    assert limiter.blocked({"push.example"}) == ("push.example", 1001.0)
    assert limiter.blocked({"other.example"}) is None
    clock.now += 1
    assert limiter.blocked({"push.example"}) is None
    for _ in range(8):
        limiter.success({"push.example"})
    assert limiter.snapshot("push.example")["limit"] == 8
    assert not limiter.active


# -- against a real server ------------------------------------------------------------


async def test_slow_domain_rate_is_measured_while_fast_domain_flows(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 4: with [limits."slow.example"] max_per_second = 5 and no limit for
    fast.example, 20 messages each: the fast ones all arrive well before the slow ones
    are done, the slow domain's rate measured at the server is at most ~5/s, no message
    is charged an attempt for waiting, and waiting is no hot loop (the limiter said
    "wait" a bounded number of times)."""
    received = timed(smtp_server)
    config = make_config(smtp_server.port, server={"spawn": 4},
                         limits={"slow.example": {"max_per_second": 5}})
    workspace = tmp_path / "ws"
    async with Manager(workspace, config=config) as manager:
        assert manager._run is not None and manager._run.limiter is not None
        limiter = manager._run.limiter
        paths = []
        for i in range(20):
            paths.append(await manager.create_work(to=f"s{i}@slow.example", subject=f"s{i}"))
            paths.append(await manager.create_work(to=f"f{i}@fast.example", subject=f"f{i}"))
        for path in paths:
            await manager.wait(path, timeout=30)
        waits = limiter.waits
    slow = [t for t, domain in received if domain == "slow.example"]
    fast = [t for t, domain in received if domain == "fast.example"]
    assert len(slow) == 20 and len(fast) == 20
    rate = (len(slow) - 1) / (slow[-1] - slow[0])
    assert rate <= 6.0, rate
    assert max(fast) < slow[5], "the fast domain waited for the slow one"
    for i, start in enumerate(slow):  # no 1 s window holds more than 5 (+1 of jitter)
        assert sum(1 for t in slow[i:] if t < start + 1.0) <= 6
    passed = records(workspace, "passed")
    assert len(passed) == 40 and all(r["attempts"] == 1 for r in passed)
    assert waits <= 3 * 20, waits
    print(f"slow.example: {rate:.2f} msgs/s measured; fast.example done in "
          f"{max(fast) - min(fast):.2f} s; limiter waits: {waits}")


def track_peak_in_flight(handler: RecordingHandler) -> dict[str, int]:
    """Make ``handler`` count messages in flight per recipient domain (from RCPT to the
    end of DATA); returns the peak per domain, updated as the server runs."""
    inflight: dict[str, int] = {}
    peak: dict[str, int] = {}
    original_rcpt, original_data = handler.handle_RCPT, handler.handle_DATA

    async def handle_rcpt(srv, session, envelope, address, options):  # type: ignore[no-untyped-def]
        domain = address.rpartition("@")[2]
        inflight[domain] = inflight.get(domain, 0) + 1
        peak[domain] = max(peak.get(domain, 0), inflight[domain])
        return await original_rcpt(srv, session, envelope, address, options)

    async def handle_data(srv, session, envelope):  # type: ignore[no-untyped-def]
        try:
            return await original_data(srv, session, envelope)
        finally:
            for rcpt in envelope.rcpt_tos:
                inflight[rcpt.rpartition("@")[2]] -= 1

    handler.handle_RCPT = handle_rcpt  # type: ignore[method-assign]
    handler.handle_DATA = handle_data  # type: ignore[method-assign]
    return peak


async def test_max_connections_per_domain(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 4: [limits."one.example"] max_connections = 2: never more than two
    messages to that domain in flight at the server at once, while another domain uses
    every sender."""
    handler = smtp_server.handler
    handler.delays["DATA"] = 0.05
    peak = track_peak_in_flight(handler)
    config = make_config(smtp_server.port, server={"spawn": 6},
                         limits={"one.example": {"max_connections": 2}})
    workspace = tmp_path / "ws"
    async with Manager(workspace, config=config) as manager:
        paths = []
        for i in range(12):
            paths.append(await manager.create_work(to=f"o{i}@one.example", subject=f"o{i}"))
            paths.append(await manager.create_work(to=f"t{i}@two.example", subject=f"t{i}"))
        for path in paths:
            await manager.wait(path, timeout=30)
        assert manager._run is not None and manager._run.limiter is not None
        waits = manager._run.limiter.waits
    assert peak["one.example"] == 2
    assert peak["two.example"] >= 3
    passed = records(workspace, "passed")
    assert len(passed) == 24 and all(r["attempts"] == 1 for r in passed)
    assert waits <= 3 * 12, waits


@pytest.mark.parametrize("reply", ["451 4.7.1 Please slow down",
                                   "450 4.7.1 Error: too many recipients from 127.0.0.1",
                                   "421 4.7.0 Try again later, closing connection."])
async def test_push_back_slows_only_that_domain(tmp_path: Path, smtp_server: SMTPServer,
                                                reply: str) -> None:
    """Issue 14 part 4: a push-back reply at RCPT to one domain's recipient pauses and
    halves that domain alone: the relay-wide throttle is untouched, the other domain's
    messages all go through during the pause, and the domain's next messages wait it out
    (uncharged) before they are sent."""
    handler = smtp_server.handler
    received = timed(smtp_server)
    handler.rcpt_replies["p0@push.example"] = [reply]
    config = make_config(smtp_server.port, server={"spawn": 4})
    workspace = tmp_path / "ws"
    async with Manager(workspace, config=config) as manager:
        run = manager._run
        assert run is not None and run.limiter is not None
        first = await manager.create_work(to="p0@push.example", subject="p0")
        while not list((workspace / "deferred").rglob(f"{first.stem}.json")):
            await asyncio.sleep(0.005)
        pushed_at = time.monotonic()
        assert run.limiter.paused("push.example")
        assert run.limiter.snapshot("push.example")["limit"] == 2
        later = [await manager.create_work(to=f"p{i}@push.example", subject=f"p{i}")
                 for i in (1, 2)]
        others = [await manager.create_work(to=f"o{i}@other.example", subject=f"o{i}")
                  for i in range(20)]
        for path in others:
            await manager.wait(path, timeout=30)
        others_done = time.monotonic()
        for path in [first, *later]:
            assert (await manager.wait(path, timeout=30)).state == "passed"
        throttle = run.dispatcher.throttle
        assert throttle.events == 0 and throttle.limit == throttle.max_concurrency
        assert run.limiter.events == 1
    assert others_done - pushed_at < 0.9  # not held by the push.example pause
    push_times = [t for t, domain in received if domain == "push.example"]
    assert len(push_times) == 3 and min(push_times) >= pushed_at + 0.8
    passed = {r["id"]: r for r in records(workspace, "passed")}
    assert passed[first.stem]["attempts"] == 2
    assert all(passed[p.stem]["attempts"] == 1 for p in later)


async def test_process_waits_out_a_rate(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 4: ``process`` (one pass) delivers every due message of a
    rate-limited domain, waiting out its budget, rather than ending its pass early."""
    received = timed(smtp_server)
    config = make_config(smtp_server.port, server={"spawn": 3},
                         limits={"*": {"max_per_second": 20}})
    workspace = tmp_path / "ws"
    manager = Manager(workspace, config=config)
    for i in range(8):
        await manager.create_work(to=f"r{i}@rate.example", subject=f"r{i}")
    summary = await manager.process_workload()
    assert summary.passed == 8
    times = [t for t, _ in received]
    assert (times[-1] - times[0]) >= 7 / 20 * 0.9
