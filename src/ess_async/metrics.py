"""Metrics and health: counters kept by every run, served over HTTP when asked.

``DeliveryStats`` is plain Python (no dependency), kept by the dispatcher of every run:
attempts and outcomes by reply class, a send latency histogram, store errors, the last
error and whether the relay is usable. ``MetricsServer`` serves them, with the spool's
counts, as Prometheus text at ``/metrics`` (prometheus-client, the ``metrics`` extra)
and a health verdict at ``/healthz``, on an asyncio server inside the run's loop (no
thread reads the run's state). Folder listings and the store probe run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manager import Manager
    from .spool import Spool

__all__ = ("LATENCY_BUCKETS", "DeliveryStats", "MetricsServer", "oldest_queued",
           "read_last_error", "reply_class")

logger = logging.getLogger("ess_async.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
LAST_ERROR_NAME = "last_error.json"
_OUTCOMES = ("passed", "failed", "deferred", "requeued", "corrupt")


def reply_class(code: int | None) -> str:
    """``2xx``, ``4xx``, ``5xx`` for an SMTP reply code; ``none`` when there was no reply
    (a refused or lost connection, a timeout, a local error)."""
    if code is None or not 200 <= code < 600:
        return "none"
    return f"{code // 100}xx"


class DeliveryStats:
    """What one run's senders did, counted in memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.attempts: dict[str, int] = {}  # reply class -> count
        self.outcomes: dict[tuple[str, str], int] = {}  # (state, reply class) -> count
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.store_errors = 0
        self.last_error: dict[str, Any] | None = None
        # Set while the relay cannot be used (connect, TLS, greeting, AUTH, client policy)
        # and nothing got through since; cleared by any reply to a transaction.
        self.transport_error: dict[str, Any] | None = None
        self.error_file: Path | None = None  # last_error is written there (for status)
        self._flush: asyncio.TimerHandle | None = None

    def attempt(self, seconds: float, code: int | None, error: Any = None) -> None:
        """One send: its duration, and the reply code (None: no reply); ``error`` is the
        DeliveryError it raised, if any."""
        cls = reply_class(code)
        self.attempts[cls] = self.attempts.get(cls, 0) + 1
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break
        if error is None:
            self.transport_error = None
            return
        entry = {"at": self.clock(), "code": code, "message": str(getattr(error, "message",
                                                                          error)),
                 "phase": getattr(error, "phase", None)}
        if getattr(error, "destination", False) or entry["phase"] == "CONNECT":
            entry["destination"] = True
            self.transport_error = entry
        elif code is not None:
            self.transport_error = None  # the relay answered: it works
        if entry.get("destination") or (getattr(error, "pushback", False)
                                        and entry["phase"] == "MAIL"):
            self.outcome("requeued", code)  # back to queued/, uncharged (sender._attempt)
        self.error(entry)

    def outcome(self, state: str, code: int | None) -> None:
        key = (state, reply_class(code))
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def store_error(self, exc: BaseException) -> None:
        self.store_errors += 1
        self.error({"at": self.clock(), "code": None, "message": f"store: {exc}",
                    "phase": "STORE"})

    def error(self, entry: dict[str, Any]) -> None:
        self.last_error = entry
        if self.error_file is not None and self._flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
                self._flush = asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        """Write the last error for ``status`` (a small file; not fsynced: it is a hint)."""
        self._flush = None
        if self.error_file is None or self.last_error is None:
            return
        tmp = self.error_file.with_name(f".{self.error_file.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.last_error, fh)
            os.replace(tmp, self.error_file)
        except OSError as exc:
            logger.debug("cannot write %s: %s", self.error_file, exc)

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self.flush()


def read_last_error(workspace: Path) -> dict[str, Any] | None:
    """The last error the latest run recorded, or None."""
    try:
        with open(workspace / LAST_ERROR_NAME, "rb") as fh:
            value = json.loads(fh.read(65536))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def id_time(msg_id: str) -> float:
    return int(msg_id[:20]) / 1e9


def oldest_queued(spool: Spool, now: float) -> tuple[float | None, float | None]:
    """(age of the oldest message in queued/, how long it has waited there), or Nones.

    The oldest is the lowest id (ids begin with their creation time); it has waited since
    it was created or last written into queued/ (a retry, a release), whichever is later.
    Blocking: call it in a thread.
    """
    ids = spool.ids("queued")
    if not ids:
        return None, None
    oldest = min(ids)
    created = id_time(oldest)
    try:
        since = max(created, spool.path("queued", oldest).stat().st_mtime)
    except OSError:
        since = created
    return max(0.0, now - created), max(0.0, now - since)


def probe_store(workspace: Path) -> str | None:
    """Write, sync and remove a file in the spool's tmp/: None if that works, else why."""
    path = workspace / "tmp" / f".health-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
    except OSError as exc:
        return str(exc)
    return None


class MetricsServer:
    """``/metrics`` and ``/healthz`` for a delivering Manager, on ``host:port``."""

    def __init__(self, manager: Manager, host: str, port: int) -> None:
        self.manager = manager
        self.host = host
        self.port = port  # the bound port once started (port 0 picks one)
        self._server: asyncio.Server | None = None
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._snapshot_lock = asyncio.Lock()

    async def start(self) -> None:
        # Fail now, with the reason, if the extra is missing.
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            from .errors import ConfigError

            raise ConfigError("server.metrics", "needs the metrics extra: "
                                                "pip install 'ess_async[metrics]'") from None
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics on http://%s:%d/metrics, health on /healthz", self.host,
                    self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    # -- the state -------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """Counts per state, the oldest queued message and the store probe; computed
        in a thread, at most once a second (scrapes and health checks share it)."""
        async with self._snapshot_lock:
            now = time.monotonic()
            if self._snapshot is not None and now - self._snapshot[0] < 1.0:
                return self._snapshot[1]
            manager = self.manager

            def compute() -> dict[str, Any]:
                age, waited = oldest_queued(manager.spool, time.time())
                return {"counts": manager.spool.counts(), "oldest_age": age,
                        "oldest_wait": waited, "store_error": probe_store(manager.workspace)}

            value = await asyncio.to_thread(compute)
            self._snapshot = (time.monotonic(), value)
            return value

    async def health(self) -> dict[str, Any]:
        """``healthy`` and why not: not delivering, the store unwritable, the relay
        unusable, or a due message waiting longer than ``[server] unhealthy_after``."""
        snap = await self.snapshot()
        run = self.manager._run
        limit = self.manager.config.server.unhealthy_after
        stats = run.dispatcher.stats if run is not None else None
        problems = []
        if run is None or not run.live:
            problems.append("not delivering")
        if snap["store_error"]:
            problems.append(f"store not writable: {snap['store_error']}")
        if stats is not None and stats.transport_error is not None:
            problems.append(f"transport failed: {stats.transport_error['message']}")
        if snap["oldest_wait"] is not None and snap["oldest_wait"] > limit:
            problems.append(f"oldest due message waited {snap['oldest_wait']:.0f}s "
                            f"(unhealthy_after = {limit:g})")
        return {"healthy": not problems, "problems": problems,
                "oldest_queued_age": snap["oldest_age"],
                "oldest_due_wait": snap["oldest_wait"], "unhealthy_after": limit,
                "open_connections": run.pool.open if run is not None else 0,
                "last_error": stats.last_error if stats is not None else None}

    async def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        snap = await self.snapshot()
        health = await self.health()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.manager, snap, health))
        data: bytes = generate_latest(registry)
        return data

    # -- HTTP ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    if len(line) > 8192:
                        break
                parts = request.decode("latin-1").split()
                method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
                path = target.split("?", 1)[0]
                if method not in ("GET", "HEAD"):
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
                elif path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await self.render()
                elif path in ("/healthz", "/health"):
                    health = await self.health()
                    status = "200 OK" if health["healthy"] else "503 Service Unavailable"
                    ctype, body = "application/json", json.dumps(health).encode() + b"\n"
                else:
                    status, ctype, body = "404 Not Found", "text/plain", b"/metrics, /healthz\n"
                head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
                await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass
        except Exception:  # a scrape must never take the run down
            logger.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Collector:
    """Builds the metric families from one snapshot (prometheus-client's Collector
    protocol: ``collect``)."""

    def __init__(self, manager: Manager, snap: dict[str, Any], health: dict[str, Any]) -> None:
        self.manager = manager
        self.snap = snap
        self.health = health

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        run = self.manager._run
        stats = run.dispatcher.stats if run is not None else DeliveryStats()
        snap = self.snap

        states = GaugeMetricFamily("ess_async_messages", "Messages in each spool state",
                                   labels=["state"])
        for state, count in snap["counts"].items():
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily("ess_async_oldest_queued_age_seconds",
                                "Age of the oldest message in queued/ (0: none)",
                                value=snap["oldest_age"] or 0.0)
        yield GaugeMetricFamily("ess_async_oldest_due_wait_seconds",
                                "How long the oldest message in queued/ has waited there",
                                value=snap["oldest_wait"] or 0.0)

        attempts = CounterMetricFamily("ess_async_attempts", "Delivery attempts by reply "
                                       "class (none: no reply)", labels=["reply_class"])
        for cls in ("2xx", "4xx", "5xx", "none"):
            attempts.add_metric([cls], stats.attempts.get(cls, 0))
        yield attempts
        for state in _OUTCOMES:
            family = CounterMetricFamily(f"ess_async_{state}", f"Messages {state}, by the "
                                         "reply class of their last reply",
                                         labels=["reply_class"])
            for cls in ("2xx", "4xx", "5xx", "none"):
                family.add_metric([cls], stats.outcomes.get((state, cls), 0))
            yield family

        cumulative, total = [], 0
        for bound, count in zip(LATENCY_BUCKETS, stats.buckets, strict=True):
            total += count
            cumulative.append((repr(bound), total))
        cumulative.append(("+Inf", stats.latency_count))
        yield HistogramMetricFamily("ess_async_send_duration_seconds",
                                    "Time of one send (connect if needed, the SMTP "
                                    "transaction, the reply)", buckets=cumulative,
                                    sum_value=stats.latency_sum)

        throttle = run.dispatcher.throttle if run is not None else None
        yield GaugeMetricFamily("ess_async_open_connections", "Connections open (lent, "
                                "idle or closing)", value=run.pool.open if run else 0)
        yield GaugeMetricFamily("ess_async_concurrency_limit", "Concurrent sends allowed "
                                "now (halved by push-back)",
                                value=throttle.limit if throttle else 0)
        yield CounterMetricFamily("ess_async_pushback_pauses", "Pauses for push-back or "
                                  "an unusable relay (a burst counts once)",
                                  value=throttle.events if throttle else 0)
        yield CounterMetricFamily("ess_async_store_errors", "Journal and spool write errors",
                                  value=stats.store_errors)
        signer = run.dispatcher.signer if run is not None else None
        signed = CounterMetricFamily("ess_async_dkim", "Messages sent signed or unsigned "
                                     "(DKIM configured)", labels=["result"])
        signed.add_metric(["signed"], signer.signed if signer else 0)
        signed.add_metric(["unsigned"], signer.unsigned if signer else 0)
        yield signed
        yield GaugeMetricFamily("ess_async_transport_up", "1 unless the relay failed and "
                                "nothing got through since",
                                value=0 if stats.transport_error else 1)
        yield GaugeMetricFamily("ess_async_store_writable", "1 if a file can be written "
                                "and synced in the spool", value=0 if snap["store_error"]
                                else 1)
        yield GaugeMetricFamily("ess_async_healthy", "1 when /healthz says 200",
                                value=1 if self.health["healthy"] else 0)
