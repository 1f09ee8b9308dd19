"""Issue 14 part 7: delivery events to a callback and to a webhook on a real local HTTP
server (aiohttp on 127.0.0.1), with deliveries to a real aiosmtpd server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ess_async import Manager
from ess_async.config import ConfigError, parse_config
from ess_async.events import EventBus, Webhook

from .conftest import FakeClock, SMTPServer, make_config


async def test_callback_sees_every_state_change(tmp_path: Path,
                                                smtp_server: SMTPServer) -> None:
    """Issue 14 part 7: a coroutine on_event receives queued, passed, failed, deferred,
    expired and suppressed, each with id, tags, code and reply."""
    handler = smtp_server.handler
    handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    handler.rcpt_replies["busy@example.com"] = ["451 4.2.1 busy"]
    got: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        got.append(event)

    clock = FakeClock()
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), clock=clock,
                      on_event=on_event)
    ok = await manager.create_work(to="ok@example.com", subject="a", tags=["welcome"])
    gone = await manager.create_work(to="gone@example.com", subject="b")
    busy = await manager.create_work(to="busy@example.com", subject="c")
    late = await manager.create_work(to="ok@example.com", subject="d", expires_in=5)
    clock.advance(10)
    await manager.process_workload()
    suppressed = await manager.create_work(to="gone@example.com", subject="e")
    await manager.flush_events()

    by_id: dict[str, list[dict[str, Any]]] = {}
    for event in got:
        by_id.setdefault(event["id"], []).append(event)
    assert [e["event"] for e in by_id[ok.stem]] == ["queued", "passed"]
    passed = by_id[ok.stem][1]
    assert passed["tags"] == ["welcome"] and passed["code"] == 250
    assert passed["delivered_to"] == ["ok@example.com"]
    failed = by_id[gone.stem][1]
    assert (failed["event"], failed["code"]) == ("failed", 550)
    assert "no such user" in failed["reply"]
    deferred = by_id[busy.stem][1]
    assert (deferred["event"], deferred["code"]) == ("deferred", 451)
    assert deferred["next_attempt_at"] > clock.now
    assert [e["event"] for e in by_id[late.stem]] == ["queued", "expired"]
    assert by_id[late.stem][1]["reason"] == "expired"
    assert [e["event"] for e in by_id[suppressed.stem]] == ["suppressed"]
    assert by_id[suppressed.stem][0]["recipients"] == ["gone@example.com"]
    assert all("raw" not in e and "body" not in e for e in got)


async def test_failing_and_slow_callbacks_never_hold_delivery(
        tmp_path: Path, smtp_server: SMTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 part 7: a plain callback that raises is logged and the next event still
    comes; one that blocks runs in a thread, so delivery goes on meanwhile."""
    release = threading.Event()
    seen: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event["event"])
        if len(seen) == 1:
            raise RuntimeError("callback bug")
        release.wait(10)  # a slow handler: blocks its thread, never the loop

    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port),
                      on_event=on_event)
    caplog.set_level(logging.ERROR, logger="ess_async.events")
    for i in range(3):
        await manager.create_work(to="a@example.com", subject=f"m{i}")
    started = time.monotonic()
    run = asyncio.create_task(manager.process_workload())
    while len(smtp_server.handler.messages) < 3:
        assert time.monotonic() - started < 20, "delivery was held up by the callback"
        await asyncio.sleep(0.02)
    assert not release.is_set()
    release.set()
    summary = await run
    assert summary.passed == 3
    assert "callback bug" in caplog.text
    assert seen.count("passed") == 3


async def test_bus_is_bounded_and_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 part 7: when a handler is far behind, emit still returns at once and the
    overflow is dropped and counted (logged), not queued without bound."""
    gate = asyncio.Event()
    handled: list[int] = []

    async def sink(event: dict[str, Any]) -> None:
        await gate.wait()
        handled.append(event["n"])

    bus = EventBus([sink], maxsize=3)
    started = time.monotonic()
    for n in range(10):
        bus.emit({"event": "queued", "n": n})
    assert time.monotonic() - started < 0.1
    await asyncio.sleep(0)  # the worker takes the first event, three more wait
    bus.emit({"event": "queued", "n": 10})
    assert bus.dropped >= 6
    gate.set()
    await bus.flush(5)
    assert handled[:1] == [0] and handled == sorted(handled)
    assert "dropped" in caplog.text


class Hook:
    """A real HTTP endpoint on 127.0.0.1 recording POSTs; ``fail_first`` replies 503 to
    that many requests first."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="busy")
        return web.Response(text="ok")


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    recorder = Hook()
    app = web.Application()
    app.router.add_post("/events", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recorder.url = f"http://127.0.0.1:{port}/events"
    yield recorder
    await runner.cleanup()


async def test_webhook_posts_signed_json_with_retries(
        tmp_path: Path, smtp_server: SMTPServer, hook: Hook,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14 part 7: [events] webhook POSTs each event as JSON to a real local HTTP
    server, signed with HMAC-SHA256 of the body (X-Ess-Signature) using the secret from
    [events] secret_env; a 503 is retried."""
    secret = "s3cret-for-tests"
    monkeypatch.setenv("ESS_TEST_HOOK_SECRET", secret)
    hook.fail_first = 1
    config = make_config(smtp_server.port, events={"webhook": hook.url,
                                                   "secret_env": "ESS_TEST_HOOK_SECRET"})
    manager = Manager(tmp_path / "ws", config=config)
    path = await manager.create_work(to="a@example.com", subject="hi", tags=["t1"])
    await manager.process_workload()  # its end flushes the events

    assert len(hook.requests) == 3  # queued (503, then retried) and passed
    bodies = []
    for headers, body in hook.requests:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Ess-Signature"] == f"sha256={expected}"
        assert headers["Content-Type"] == "application/json"
        bodies.append(json.loads(body))
    assert bodies[0] == bodies[1]  # the retry sends the same bytes
    assert [b["event"] for b in bodies[1:]] == ["queued", "passed"]
    assert bodies[2]["id"] == path.stem and bodies[2]["tags"] == ["t1"]
    assert bodies[2]["code"] == 250
    assert hook.requests[2][0]["X-Ess-Event"] == "passed"


async def test_webhook_gives_up_and_logs(hook: Hook,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 part 7: a webhook that keeps failing is retried with backoff, then the
    event is logged as not delivered; a 4xx (other than 408/429) is not retried."""
    hook.fail_first = 100
    webhook = Webhook(hook.url, b"k", retries=2, backoff=0.01)
    await webhook({"event": "passed", "id": "x"})
    assert len(hook.requests) == 3 and webhook.failed == 1
    assert "not delivered (HTTP 503)" in caplog.text
    gone = Webhook(hook.url.replace("/events", "/nowhere"), b"k", retries=3, backoff=0.01)
    await gone({"event": "passed", "id": "y"})
    assert len(hook.requests) == 3  # 404/405 from aiohttp's router: not retried
    down = Webhook("http://127.0.0.1:9/events", None, retries=1, backoff=0.01, timeout=2)
    await down({"event": "passed", "id": "z"})
    assert down.failed == 1
    for client in (webhook, gone, down):
        await client.close()


def test_events_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14 part 7: [events] keys are checked and name the key: a webhook that is
    not an http(s) URL, a webhook without its secret in the environment."""
    with pytest.raises(ConfigError, match=r"events\.webhook"):
        parse_config({"events": {"webhook": "ftp://example.com/x"}})
    with pytest.raises(ConfigError, match=r"events\.retries"):
        parse_config({"events": {"retries": -1}})
    with pytest.raises(ConfigError, match=r"events\.bogus"):
        parse_config({"events": {"bogus": 1}})
    monkeypatch.delenv("ESS_EVENTS_SECRET", raising=False)
    config = parse_config({"events": {"webhook": "https://hooks.example.com/ess"}})
    with pytest.raises(ConfigError, match=r"events\.secret_env"):
        Manager(tmp_path / "ws", config=config)
