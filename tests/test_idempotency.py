"""Idempotency keys: written before their message, read safely, removed with it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ess_async import Client, Manager, QueueOps

from .conftest import SMTPServer, make_config, write_config
from .test_crash import run_cli

ENQUEUE_KEYED = (
    "import sys; from ess_async import Client; "
    "print(Client(sys.argv[1]).create_work(to='a@example.com', subject='keyed', "
    "from_='s@example.com', idempotency_key=sys.argv[2]))"
)


def enqueue_keyed(workspace: Path, key: str, crash_at: str | None = None,
                  ) -> subprocess.CompletedProcess[str]:
    """``Client.create_work`` with ``idempotency_key=key`` in a process of its own."""
    env = dict(os.environ)
    env.pop("ESS_TEST_CRASH_AT", None)
    if crash_at:
        env["ESS_TEST_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", ENQUEUE_KEYED, str(workspace), key],
                          env=env, capture_output=True, text=True, timeout=30)


def key_file(workspace: Path, key: str) -> Path:
    return workspace / "keys" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def spooled(workspace: Path) -> list[Path]:
    return sorted(p for p in workspace.rglob("*.json")
                  if p.parent.name != "keys" and "keys" not in p.parts)


def test_crash_between_key_and_message(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 item 4: a SIGKILL after the key is written and before its message leaves a
    free key; the caller's retry with the same key makes exactly one message, which is
    delivered once (the old order, message then key, made two)."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    crashed = enqueue_keyed(ws, "order-7", crash_at="between_key_and_message")
    assert crashed.returncode == -9, crashed.stderr

    first = enqueue_keyed(ws, "order-7")  # the caller never got a path: it retries
    again = enqueue_keyed(ws, "order-7")
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout
    assert [p.name for p in spooled(ws)] == [Path(first.stdout.strip()).name]

    assert run_cli(ws, "process") == 0
    assert smtp_server.handler.subjects() == ["keyed"]


def test_crash_after_message_keeps_key(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 item 4 (guard for the new order): a SIGKILL once the message is durable
    (its key was written first) leaves a taken key: the retry returns that message."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    # after_queue_rename:2 is the message's rename (the key file's rename is the 1st).
    crashed = enqueue_keyed(ws, "order-8", crash_at="after_queue_rename:2")
    assert crashed.returncode == -9, crashed.stderr
    (message,) = spooled(ws)
    retried = enqueue_keyed(ws, "order-8")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == str(message)
    assert spooled(ws) == [message]
    assert run_cli(ws, "process") == 0
    assert smtp_server.handler.subjects() == ["keyed"]


@pytest.mark.parametrize("kind", ["symlink", "directory", "oversized"])
def test_hostile_key_file_is_free(tmp_path: Path, kind: str) -> None:
    """Issue 8 item 12: keys/ lookups never follow a symlink and read only small regular
    files; anything else is not a key (the key is free, and the entry is replaced)."""
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(25))
    taken = client.create_work(to="a@example.com", subject="taken", idempotency_key="k1")
    target = key_file(ws, "k2")
    if kind == "symlink":  # would lend k2 the message of k1
        target.symlink_to(key_file(ws, "k1"))
    elif kind == "directory":
        target.mkdir()
    else:
        target.write_text(f'{{"id": "{taken.stem}", "pad": "{"x" * 8192}"}}')
    fresh = client.create_work(to="a@example.com", subject="fresh", idempotency_key="k2")
    assert fresh != taken
    assert target.is_file() and not target.is_symlink()
    assert target.stat().st_size < 4096
    assert client.create_work(to="a@example.com", idempotency_key="k2") == fresh
    assert client.create_work(to="a@example.com", idempotency_key="k1") == taken
    assert len(spooled(ws)) == 2


def test_fifo_key_file_does_not_block(tmp_path: Path) -> None:
    """Issue 8 item 12: a FIFO in keys/ is not a key; the lookup must not block on it
    while holding the keys lock (the old lookup opened it and waited for a writer)."""
    ws = tmp_path / "ws"
    write_config(ws, 25)
    Client(ws).create_work(to="a@example.com", subject="first", idempotency_key="other")
    os.mkfifo(key_file(ws, "order-9"))
    try:
        done = enqueue_keyed(ws, "order-9")
    except subprocess.TimeoutExpired:
        pytest.fail("create_work blocked on a FIFO in keys/")
    assert done.returncode == 0, done.stderr
    assert key_file(ws, "order-9").is_file()
    assert Path(done.stdout.strip()) in spooled(ws)
    assert enqueue_keyed(ws, "order-9").stdout == done.stdout


def test_delete_frees_the_key(tmp_path: Path) -> None:
    """Issue 8 scale item: QueueOps.delete removes the message's key file with it, and the
    key makes a new message afterwards."""
    ws = tmp_path / "ws"
    client = Client(ws, config=make_config(25))
    first = client.create_work(to="a@example.com", idempotency_key="del-1")
    other = client.create_work(to="a@example.com", idempotency_key="del-2")
    assert QueueOps(ws, max_size=1 << 20).delete(first) == "queued"
    assert not key_file(ws, "del-1").exists()
    assert key_file(ws, "del-2").is_file()  # another message's key stays
    assert sorted(os.listdir(ws / "keys" / "ids")) == [other.name]
    again = client.create_work(to="a@example.com", idempotency_key="del-1")
    assert again != first and again.parent.name == "queued"
    assert client.create_work(to="a@example.com", idempotency_key="del-2") == other


async def test_purge_and_retention_free_keys(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 8 scale item: keys/ is pruned with the messages: a passed message purged by
    QueueOps.purge, or removed by retention ([server] keep_passed), takes its key file with
    it, and the key is usable again."""
    ws = tmp_path / "ws"
    config = make_config(smtp_server.port, server={"keep_passed": 2})
    manager = Manager(ws, config=config)
    purged = await manager.create_work(to="a@example.com", subject="p", idempotency_key="p")
    await manager.create_work(to="a@example.com", subject="r", idempotency_key="r")
    kept = [await manager.create_work(to="a@example.com", subject=f"k{i}",
                                      idempotency_key=f"k{i}") for i in range(2)]
    assert (await manager.process_workload()).passed == 4

    ops = QueueOps(ws, max_size=1 << 20, clock=lambda: 4e9)  # everything is old by then
    ops.delete(kept[0])  # not the oldest: retention then keeps exactly k1 and one more
    assert not key_file(ws, "k0").exists()
    assert key_file(ws, "p").is_file() and key_file(ws, "r").is_file()

    assert manager.prune() == 1  # keep_passed = 2: the oldest, "p", goes
    assert not key_file(ws, "p").exists()
    assert key_file(ws, "r").is_file() and key_file(ws, "k1").is_file()

    assert ops.purge("passed", older_than=0) == 2
    assert not key_file(ws, "r").exists() and not key_file(ws, "k1").exists()
    assert os.listdir(ws / "keys" / "ids") == []

    again = await manager.create_work(to="a@example.com", subject="again", idempotency_key="p")
    assert again.parent.name == "queued" and again.stem != purged.stem
    assert (await manager.process_workload()).passed == 1
    assert sorted(smtp_server.handler.subjects()) == ["again", "k0", "k1", "p", "r"]
