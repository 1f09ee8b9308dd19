"""Group commit: concurrent enqueues share syncs, and each gets its own complete file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageError

from .conftest import make_config


async def test_concurrent_create_work(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    paths = await asyncio.gather(*[
        manager.create_work(to=f"r{i}@example.com", subject=f"m{i}") for i in range(200)])
    assert len(set(paths)) == 200
    assert sorted(os.listdir(tmp_path / "ws" / "queued")) == sorted(p.name for p in paths)
    reader = Client(tmp_path / "ws", config=make_config(25)).spool
    subjects = [reader.read(p)["subject"] for p in paths]
    assert subjects == [f"m{i}" for i in range(200)]  # each caller got its own message
    assert os.listdir(tmp_path / "ws" / "tmp") == []


async def test_bad_message_in_a_burst_fails_alone(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    results = await asyncio.gather(
        *[manager.create_work(to="a@example.com", subject=f"m{i}") for i in range(5)],
        manager.create_work(to="not an address"),
        return_exceptions=True)
    assert isinstance(results[-1], MessageError)
    assert all(isinstance(p, Path) and p.exists() for p in results[:-1])
    assert len(os.listdir(tmp_path / "ws" / "queued")) == 5


@pytest.mark.parametrize("count", [1, 3])
async def test_batch_sizes(tmp_path: Path, count: int) -> None:
    manager = Manager(tmp_path / "ws", config=make_config(25))
    paths = await asyncio.gather(*[manager.create_work(to="a@example.com")
                                   for _ in range(count)])
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths)
