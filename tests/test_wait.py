"""``Manager.wait``: the final outcome of a message delivered here or by another process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageNotFound

from .conftest import SMTPServer, make_config, write_config


async def test_wait_in_process(tmp_path: Path, smtp_server: SMTPServer) -> None:
    smtp_server.handler.data_replies.extend(["250 2.0.0 queued as ABC", "550 5.7.1 no"])
    config = make_config(smtp_server.port)
    async with Manager(tmp_path / "ws", spawn=1, config=config) as manager:
        ok = await manager.create_work(to="a@example.com", subject="ok")
        bad = await manager.create_work(to="b@example.com", subject="bad")
        outcome = await manager.wait(ok, timeout=20)
        assert outcome.passed and outcome.state == "passed"
        assert (outcome.code, outcome.reply) == (250, "2.0.0 queued as ABC")
        assert outcome.delivered_to == ["a@example.com"]
        assert outcome.attempts == 1
        failed = await manager.wait(bad.stem, timeout=20)
        assert (failed.state, failed.code, failed.reply) == ("failed", 550, "5.7.1 no")
        assert failed.path.parent.parent.name == "failed"


async def test_wait_for_another_process(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    path = Client(ws).create_work(to="a@example.com", subject="elsewhere")
    manager = Manager(ws)  # this one never delivers
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ess_async", "process", "--workspace", str(ws),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        outcome = await manager.wait(path, timeout=30)
    finally:
        assert await proc.wait() == 0
    assert outcome.passed
    assert smtp_server.handler.subjects() == ["elsewhere"]


async def test_wait_timeout_and_unknown(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    path = await manager.create_work(to="a@example.com", subject="nobody delivers me")
    with pytest.raises(TimeoutError):
        await manager.wait(path, timeout=0.2)
    with pytest.raises(MessageNotFound):
        await manager.wait("00000000000000000001-n00000000", timeout=5)
    with pytest.raises(ValueError, match="not a message id"):
        await manager.wait("../../etc/passwd")
