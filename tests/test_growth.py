"""Bounded growth: retention for passed/ and failed/, and a journal that is compacted."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from ess_async import Client, Manager
from ess_async.spool import decode_record

from .conftest import SMTPServer, make_config


async def test_retention_by_age_and_count(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(smtp_server.port))
    for i in range(10):
        client.create_work(to="a@example.com", subject=f"m{i}")
    await Manager(ws, config=make_config(smtp_server.port)).process_workload()
    passed = sorted((ws / "passed").rglob("*.json"))
    assert len(passed) == 10
    ten_days_ago = time.time() - 10 * 86400
    old_shard = ws / "passed" / time.strftime("%Y-%m-%d", time.gmtime(ten_days_ago))
    old_shard.mkdir()
    for path in passed[:4]:  # finished ten days ago, as their records and shard say
        record = decode_record(path.read_bytes())
        record["finished_at"] = ten_days_ago
        (old_shard / path.name).write_text(json.dumps(record))
        path.unlink()

    by_age = Manager(ws, config=make_config(smtp_server.port,
                                            server={"keep_passed_days": 7}))
    assert by_age.prune() == 4
    assert sorted((ws / "passed").rglob("*.json")) == passed[4:]

    by_count = Manager(ws, config=make_config(smtp_server.port, server={"keep_passed": 3}))
    await by_count.process_workload()  # retention also runs when a delivery run starts
    assert sorted((ws / "passed").rglob("*.json")) == passed[7:]  # the newest three
    assert by_count.status()["passed"] == 3


async def test_journal_is_compacted_while_serving(tmp_path: Path,
                                                  smtp_server: SMTPServer) -> None:
    journal = tmp_path / "ws" / "journal.log"
    config = make_config(smtp_server.port, server={"journal_compact_after": 10})
    async with Manager(tmp_path / "ws", spawn=1, config=config) as m:
        for i in range(60):
            await m.create_work(to="a@example.com", subject=f"m{i}")
        await asyncio.to_thread(smtp_server.handler.wait_for, 60)
        await m.wait(await m.create_work(to="a@example.com", subject="last"), timeout=20)
        lines = journal.read_text().splitlines()
        assert len(lines) < 2 * 12  # not the 120+ entries of 61 claims and acceptances
    assert journal.read_text() == ""  # settled and emptied when the run ends
