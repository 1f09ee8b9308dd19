"""Delivery events (issue 14 part 7): every state change of a message, as a small dict.

``Manager(on_event=callback)`` calls ``callback(event)`` for each one; ``[events]
webhook`` POSTs the same JSON to a URL. Delivery never waits for either: events go into
a bounded queue per sink (``[events] queue_size``) that a background task empties, in
order. A callback that raises is logged (logger ``ess_async.events``) and the next event
goes on; a coroutine callback is awaited (at most 60 s); a plain function runs in a
worker thread, so a slow one never holds the event loop. When a queue is full (a sink
far behind), new events for that sink are dropped and counted, with a warning; delivery
itself is never held up and never loses a message.

An event::

    {"event": "passed", "id": "0179...-n1a2b3c4d", "at": 1800000000.0,
     "tags": ["welcome"], "code": 250, "reply": "OK", "attempts": 1,
     "recipients": ["a@example.com"], "delivered_to": ["a@example.com"], "refused": {}}

``event`` is one of queued, passed, failed, deferred, expired, suppressed (and corrupt
for a quarantined file). deferred adds ``next_attempt_at``, failed ``reason``, suppressed
lists the suppressed addresses in ``recipients``.

The webhook body is that JSON (UTF-8); its ``X-Ess-Signature`` header is ``sha256=``
followed by the hex HMAC-SHA256 of the exact body bytes with the secret from the
environment variable ``[events] secret_env``; ``X-Ess-Event`` names the event. Network
errors, timeouts, 408, 429 and 5xx replies are retried ``[events] retries`` times with
exponential backoff (1 s, 2 s, 4 s, ... at most 60 s); other replies are not retried.
It needs aiohttp (``pip install 'ess_async[events]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ConfigError

__all__ = ("EVENT_TYPES", "EventBus", "Webhook", "make_event", "sign")

logger = logging.getLogger("ess_async.events")

EVENT_TYPES = ("queued", "passed", "failed", "deferred", "expired", "suppressed", "corrupt")
_CALLBACK_TIMEOUT = 60.0

Sink = Callable[[dict[str, Any]], Awaitable[None]]


def make_event(kind: str, record: dict[str, Any], at: float, *,
               recipients: list[str] | None = None) -> dict[str, Any]:
    """The event for ``record`` entering state ``kind`` (never the message body)."""
    result = record.get("result") or {}
    error = record.get("last_error") or {}
    event: dict[str, Any] = {
        "event": kind, "id": record.get("id"), "at": at,
        "tags": list(record.get("tags") or []),
        "code": result.get("code", error.get("code")),
        "reply": result.get("message", error.get("message")),
        "attempts": record.get("attempts", 0),
        "recipients": list(recipients if recipients is not None
                           else record.get("recipients") or []),
    }
    if kind == "passed":
        event["delivered_to"] = list(record.get("delivered_to") or [])
        event["refused"] = dict(record.get("refused") or {})
    elif kind == "deferred":
        event["next_attempt_at"] = record.get("next_attempt_at")
    elif kind in ("failed", "expired"):
        event["reason"] = result.get("reason")
        event["refused"] = dict(result.get("refused") or {})
    elif kind == "queued":
        event["send_at"] = record.get("send_at")
        event["expires_at"] = record.get("expires_at")
    return event


def event_kind(state: str, record: dict[str, Any]) -> str:
    """The event name of a message that ended a step in ``state``."""
    if state == "failed":
        reason = (record.get("result") or {}).get("reason")
        if reason in ("expired", "suppressed"):
            return str(reason)
    return state


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Ess-Signature`` value of a webhook body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def callback_sink(callback: Callable[[dict[str, Any]], Any]) -> Sink:
    """A sink calling ``callback``: awaited if it is (or returns) a coroutine, else run
    in a worker thread."""
    if inspect.iscoroutinefunction(callback):
        async def call_async(event: dict[str, Any]) -> None:
            async with asyncio.timeout(_CALLBACK_TIMEOUT):
                await callback(event)
        return call_async

    async def call(event: dict[str, Any]) -> None:
        result = await asyncio.to_thread(callback, event)
        if inspect.isawaitable(result):
            async with asyncio.timeout(_CALLBACK_TIMEOUT):
                await result
    return call


class Webhook:
    """POST each event as JSON to ``url``, signed, with retries (aiohttp, lazily)."""

    def __init__(self, url: str, secret: bytes | None, *, timeout: float = 10.0,
                 retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0) -> None:
        try:
            self._aiohttp = importlib.import_module("aiohttp")
        except ImportError:
            raise ConfigError("events.webhook", "needs aiohttp: pip install "
                              "'ess_async[events]'") from None
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._session: Any = None
        self.sent = 0
        self.failed = 0

    async def __call__(self, event: dict[str, Any]) -> None:
        aiohttp = self._aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": "application/json", "X-Ess-Event": str(event["event"])}
        if self.secret is not None:
            headers["X-Ess-Signature"] = sign(self.secret, body)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                async with self._session.post(self.url, data=body, headers=headers) as reply:
                    status = reply.status
                    await reply.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= status < 300:
                self.sent += 1
                return
            problem = f"HTTP {status}"
            if status not in (408, 429) and status < 500:
                break  # the receiver refuses it: retrying will not help
        self.failed += 1
        logger.error("webhook: event %s of message %s not delivered (%s)", event["event"],
                     event.get("id"), problem)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class _Channel:
    def __init__(self, sink: Sink, maxsize: int) -> None:
        self.sink = sink
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.worker: asyncio.Task[None] | None = None
        self.dropped = 0

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                await self.sink(event)
            except asyncio.CancelledError:
                raise
            except BaseException:
                logger.exception("event handler failed on %s of message %s",
                                 event.get("event"), event.get("id"))
            finally:
                self.queue.task_done()


class EventBus:
    """Bounded, ordered, non-blocking fan-out of events to sinks."""

    def __init__(self, sinks: list[Sink], *, maxsize: int = 10_000) -> None:
        self._channels = [_Channel(sink, maxsize) for sink in sinks]

    def emit(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for every sink; never blocks (a full queue drops it, logged).
        Call it from the event loop."""
        for channel in self._channels:
            if channel.worker is None or channel.worker.done():
                channel.worker = asyncio.get_running_loop().create_task(channel.run())
            try:
                channel.queue.put_nowait(event)
            except asyncio.QueueFull:
                channel.dropped += 1
                if channel.dropped == 1 or channel.dropped % 1000 == 0:
                    logger.warning("event handler is behind: %d event(s) dropped",
                                   channel.dropped)

    @property
    def dropped(self) -> int:
        return sum(channel.dropped for channel in self._channels)

    async def flush(self, timeout: float | None = 10.0) -> None:
        """Wait (at most ``timeout`` seconds) for the queued events to be handled, then
        stop the workers and close the sinks (a later ``emit`` starts them again)."""
        for channel in self._channels:
            if channel.worker is None:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await channel.queue.join()
            if not channel.queue.empty():
                logger.warning("stopping with %d undelivered event(s)", channel.queue.qsize())
            channel.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel.worker
            channel.worker = None
            close = getattr(channel.sink, "close", None)
            if close is not None:
                await close()
