"""Issue 14 part 2: Prometheus metrics and health, scraped from the real HTTP endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ess_async import Manager
from ess_async.cli import cli

from .conftest import SMTPServer, free_port, make_config, write_config


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def parse(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def one(samples: dict[str, Any], name: str, **labels: str) -> float:
    value: float = samples[name][tuple(sorted(labels.items()))]
    return value


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def metrics_port(manager: Manager) -> int:
    async def started() -> bool:
        return manager.metrics is not None

    await until(started)
    assert manager.metrics is not None
    return manager.metrics.port


async def health(port: int) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(port, "/healthz")
    return status, json.loads(body)


async def test_scrape_during_a_run(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 2: /metrics during a run, parsed with prometheus-client's parser:
    messages per state, attempts and passed/failed/deferred by reply class, the send
    latency histogram, open connections, push-back pauses, store errors; /healthz 200."""
    handler = smtp_server.handler
    handler.rcpt_replies["refused@example.net"] = "550 5.1.1 No such user"
    handler.rcpt_replies["later@example.net"] = "450 4.2.0 Mailbox busy"
    handler.mail_replies.extend(["250 OK", "421 4.7.0 Try again later, too many messages"])
    config = make_config(smtp_server.port, server={"metrics": "127.0.0.1:0", "spawn": 1},
                         retry={"min_backoff": 600, "max_backoff": 600})
    async with Manager(tmp_path / "ess_data", config=config) as manager:
        port = await metrics_port(manager)
        for to in ("ok@example.net", "pushed@example.net", "refused@example.net",
                   "later@example.net", "ok2@example.net"):
            await manager.create_work(to=to, subject=to, body="Hello")

        async def settled() -> bool:
            counts = manager.status()
            return counts["passed"] == 3 and counts["failed"] == 1 and counts["deferred"] == 1
        await until(settled, 30)

        status, body = await http_get(port, "/metrics")
        assert status == 200
        m = parse(body)
        assert one(m, "ess_async_messages", state="passed") == 3
        assert one(m, "ess_async_messages", state="failed") == 1
        assert one(m, "ess_async_messages", state="deferred") == 1
        assert one(m, "ess_async_messages", state="queued") == 0
        assert one(m, "ess_async_attempts_total", reply_class="2xx") == 3
        assert one(m, "ess_async_attempts_total", reply_class="4xx") == 2  # 421, 450
        assert one(m, "ess_async_attempts_total", reply_class="5xx") == 1
        assert one(m, "ess_async_passed_total", reply_class="2xx") == 3
        assert one(m, "ess_async_failed_total", reply_class="5xx") == 1
        assert one(m, "ess_async_deferred_total", reply_class="4xx") == 1
        assert one(m, "ess_async_requeued_total", reply_class="4xx") == 1  # the 421
        assert one(m, "ess_async_send_duration_seconds_count") == 6
        assert one(m, "ess_async_send_duration_seconds_bucket", le="+Inf") == 6
        assert 0 < one(m, "ess_async_send_duration_seconds_sum") < 30
        assert one(m, "ess_async_pushback_pauses_total") == 1
        assert one(m, "ess_async_open_connections") == manager._run.pool.open >= 1  # type: ignore[union-attr]
        assert one(m, "ess_async_store_errors_total") == 0
        assert one(m, "ess_async_oldest_queued_age_seconds") == 0
        assert one(m, "ess_async_transport_up") == 1
        assert one(m, "ess_async_healthy") == 1
        status, verdict = await health(port)
        assert status == 200 and verdict["healthy"] and verdict["problems"] == []
        assert (await http_get(port, "/nope"))[0] == 404
    # The run is over: the endpoint is closed.
    with pytest.raises(OSError):
        await http_get(port, "/metrics")


async def test_unhealthy_when_store_unwritable(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 2: /healthz is 503 while a file cannot be written and synced in the
    spool (its tmp/ replaced by a file here: even root cannot write there), 200 again
    once it can."""
    config = make_config(smtp_server.port, server={"metrics": "127.0.0.1:0"})
    async with Manager(tmp_path / "ess_data", config=config) as manager:
        port = await metrics_port(manager)
        assert (await health(port))[0] == 200
        tmp = tmp_path / "ess_data" / "tmp"
        shutil.rmtree(tmp)
        tmp.write_text("not a folder")
        await asyncio.sleep(1.1)  # past the one-second snapshot cache
        status, verdict = await health(port)
        assert status == 503
        assert any("store not writable" in p for p in verdict["problems"])
        m = parse((await http_get(port, "/metrics"))[1])
        assert one(m, "ess_async_store_writable") == 0 and one(m, "ess_async_healthy") == 0
        tmp.unlink()
        tmp.mkdir(mode=0o700)
        await asyncio.sleep(1.1)
        assert (await health(port))[0] == 200


async def test_unhealthy_when_transport_failed(tmp_path: Path, smtp_server: SMTPServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14 part 2: a relay that refuses connections makes /healthz 503 (transport
    failed) and status --json shows the last error; when it is back, the waiting message
    goes out and /healthz is 200 again."""
    smtp_server.stop()
    config = make_config(smtp_server.port, server={"metrics": "127.0.0.1:0"})
    workspace = tmp_path / "ess_data"
    async with Manager(workspace, config=config) as manager:
        port = await metrics_port(manager)
        path = await manager.create_work(to="a@example.net", subject="s", body="b")

        async def failed() -> bool:
            return (await health(port))[0] == 503
        await until(failed)
        verdict = (await health(port))[1]
        assert any(p.startswith("transport failed") for p in verdict["problems"])
        m = parse((await http_get(port, "/metrics"))[1])
        assert one(m, "ess_async_transport_up") == 0
        assert one(m, "ess_async_requeued_total", reply_class="none") >= 1
        assert one(m, "ess_async_pushback_pauses_total") >= 1
        await asyncio.sleep(1.1)  # the last error is written for status within a second
        capsys.readouterr()
        assert await asyncio.to_thread(cli, "status", "--workspace", str(workspace),
                                       "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["queued"] == 1 and status["oldest_queued_age"] > 0
        assert status["last_error"]["phase"] == "CONNECT"
        assert status["last_error"]["destination"] is True
        smtp_server.start()
        outcome = await manager.wait(path, timeout=30)
        assert outcome.state == "passed"
        await asyncio.sleep(1.1)
        assert (await health(port))[0] == 200


def test_status_json_oldest_age_and_last_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14 part 2: status --json gives the oldest queued message's age and the last
    error a run recorded (null when there is none)."""
    workspace = tmp_path / "ess_data"
    write_config(workspace, free_port())
    assert cli("status", "--workspace", str(workspace), "--json") == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["oldest_queued_age"] is None and empty["last_error"] is None
    assert cli("email", "--workspace", str(workspace), "--to", "a@example.net",
               "--subject", "s", "--body", "b") == 0
    capsys.readouterr()
    time.sleep(0.2)
    (workspace / "last_error.json").write_text(json.dumps(
        {"at": time.time(), "code": None, "message": "Connection refused",
         "phase": "CONNECT", "destination": True}))
    assert cli("status", "--workspace", str(workspace), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queued"] == 1
    assert 0.2 <= status["oldest_queued_age"] < 60
    assert status["last_error"]["message"] == "Connection refused"
    assert cli("status", "--workspace", str(workspace)) == 0
    text = capsys.readouterr().out
    assert "oldest" in text and "Connection refused" in text


async def test_unhealthy_when_due_message_waits_too_long(tmp_path: Path,
                                                         smtp_server: SMTPServer) -> None:
    """Issue 14 part 2: with one sender stuck on a slow server, the next message waits in
    queued/; past [server] unhealthy_after /healthz is 503, and 200 once it is sent."""
    handler = smtp_server.handler
    handler.hold.add("DATA")
    config = make_config(smtp_server.port, server={"metrics": "127.0.0.1:0", "spawn": 1,
                                                   "unhealthy_after": 1})
    async with Manager(tmp_path / "ess_data", config=config) as manager:
        port = await metrics_port(manager)
        await manager.create_work(to="a@example.net", subject="first", body="b")
        await asyncio.to_thread(handler.held.wait, 10)
        second = await manager.create_work(to="b@example.net", subject="second", body="b")
        assert (await health(port))[0] == 200

        async def stuck() -> bool:
            return (await health(port))[0] == 503
        await until(stuck)
        verdict = (await health(port))[1]
        assert any("oldest due message waited" in p for p in verdict["problems"])
        assert verdict["oldest_due_wait"] > 1
        m = parse((await http_get(port, "/metrics"))[1])
        assert one(m, "ess_async_oldest_queued_age_seconds") > 1
        assert one(m, "ess_async_messages", state="queued") == 1
        assert one(m, "ess_async_messages", state="active") == 1
        handler.release.set()
        assert (await manager.wait(second, timeout=30)).state == "passed"
        await asyncio.sleep(1.1)
        assert (await health(port))[0] == 200


def test_serve_metrics_flag(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 2: serve --metrics HOST:PORT in a real process serves /metrics and
    /healthz; a bad value is one line on stderr and exit 2."""
    workspace = tmp_path / "ess_data"
    write_config(workspace, smtp_server.port)
    bad = subprocess.run([sys.executable, "-m", "ess_async", "serve", "--workspace",
                          str(workspace), "--metrics", "nowhere"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--metrics" in bad.stderr
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ess_async", "serve", "--workspace",
                             str(workspace), "--metrics", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert cli("email", "--workspace", str(workspace), "--to", "a@example.net",
                   "--subject", "s", "--body", "b") == 0
        smtp_server.handler.wait_for(1)

        async def scrape() -> dict[str, Any]:
            for _ in range(200):
                try:
                    status, body = await http_get(port, "/metrics")
                    m = parse(body)
                    if one(m, "ess_async_passed_total", reply_class="2xx") == 1:
                        assert status == 200
                        assert (await health(port))[0] == 200
                        return m
                except OSError:
                    pass
                await asyncio.sleep(0.05)
            raise AssertionError("no scrape showed the message passed")

        m = asyncio.run(scrape())
        assert one(m, "ess_async_messages", state="passed") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
