"""``serve --processes N`` (issue 12 part 2): a supervisor holding the workspace lock hands
ids to N worker processes, each with its own journal; a killed worker is settled from
its journal and replaced; a killed supervisor takes its workers along and the next start
recovers every journal. Real processes, a real SMTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ess_async import Client, Manager
from ess_async.errors import ConfigError
from ess_async.lock import lock_holder
from ess_async.spool import decode_record
from ess_async.workers import WorkerPool, merge_entries

from .conftest import (
    RecordingHandler,
    Server,
    SMTPServer,
    cli_env,
    make_config,
    wait_until,
    write_config,
)


def run(ws: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ess_async", "--log-level", "WARNING",
                           command, "--workspace", str(ws), *args], capture_output=True,
                          text=True, timeout=60, env=cli_env(), cwd=ws.parent)


def wait_workers(serve: Server, count: int) -> list[int]:
    """Until ``count`` workers are ready (the supervisor logs it); their pids."""
    wait_until(lambda: "worker processes ready" in serve.log()
               or serve.proc.poll() is not None, 30, "the workers to be ready")
    assert serve.proc.poll() is None, serve.log()
    pids = worker_pids(serve.ws)
    assert len(pids) == count, (pids, serve.log())
    return sorted(pids.values())


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def worker_pids(ws: Path) -> dict[str, int]:
    """Worker name -> pid, from the lock files of their journals (live ones only)."""
    found = {}
    for lock in (ws / "journal").glob("w*.lock"):
        text = lock.read_text().strip()
        if text.isdigit() and alive(int(text)):
            found[lock.stem] = int(text)
    return found


def queue(ws: Path, count: int, prefix: str = "m") -> set[str]:
    client = Client(ws)
    return {client.create_work(to=f"r{i % 5}@example.com", subject=f"{prefix}{i}").stem
            for i in range(count)}


def ids_in(ws: Path, state: str) -> set[str]:
    return {p.stem for p in (ws / state).rglob("*.json")}


def journals(ws: Path) -> list[str]:
    folder = ws / "journal"
    return sorted(p.name for p in folder.glob("*.log")) if folder.is_dir() else []


# -- delivering ----------------------------------------------------------------------------


def test_two_processes_deliver_each_message_once(tmp_path: Path, smtp_server: SMTPServer,
                                                  servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    ids = queue(ws, 40)
    serve = servers(ws, "--processes", "2", "--spawn", "2")
    pids = wait_workers(serve, 2)
    assert all(parent_of(pid) == serve.pid for pid in pids)  # real processes, its own
    ids |= queue(ws, 10, prefix="late")  # found by the supervisor's watcher
    wait_until(lambda: ids_in(ws, "passed") == ids, 30, "every message in passed/")

    assert serve.proc.send_signal(signal.SIGTERM) is None
    assert serve.wait() == 0, serve.log()
    assert lock_holder(ws) is None
    assert not any(alive(pid) for pid in pids)
    received = Counter(smtp_server.handler.subjects())
    assert len(received) == 50 and set(received.values()) == {1}, received.most_common(3)
    assert ids_in(ws, "active") == set() and ids_in(ws, "queued") == set()
    assert journals(ws) == []  # settled and removed at the end
    log = serve.log()
    assert "[w1]" in log and "[w2]" in log  # both workers sent
    assert "stopped: passed 50," in log  # the workers' outcomes, counted by the supervisor
    assert "Traceback" not in log


@pytest.mark.parametrize("point", ["after_journal", "after_claim"])
def test_killed_worker_is_settled_and_replaced(tmp_path: Path, smtp_server: SMTPServer,
                                               servers: Callable[..., Server],
                                               point: str) -> None:
    """Worker w1 dies by SIGKILL at ``point`` of its third message: the supervisor
    settles what it held from its journal (accepted: passed, never resent; claimed only:
    requeued) and starts a replacement; every message is sent exactly once."""
    n = 30
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    ids = queue(ws, n)
    # One sender per worker: nothing else of w1's is in flight when it dies (another
    # send could be in the documented window, accepted and not yet journaled).
    serve = servers(ws, "--processes", "2", "--spawn", "1",
                   env=cli_env(ESS_TEST_WORKER_CRASH_AT=f"w1={point}:3"))
    wait_until(lambda: ids_in(ws, "passed") == ids or serve.proc.poll() is not None, 30,
               "every message in passed/")
    assert serve.proc.poll() is None, serve.log()
    log = serve.log()
    assert "worker w1 (pid" in log and "exited with -9" in log, log
    assert "a replacement starts" in log
    if point == "after_journal":
        assert "not sent again" in log  # finished from w1's journal
    wait_until(lambda: len(worker_pids(ws)) == 2, 30, "the replacement to run")
    pids = worker_pids(ws)

    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0, serve.log()
    assert not any(alive(pid) for pid in pids.values())
    received = Counter(smtp_server.handler.subjects())
    assert set(received) == {f"m{i}" for i in range(n)}
    assert set(received.values()) == {1}, received.most_common(3)  # none resent
    assert ids_in(ws, "active") == set() and ids_in(ws, "passed") == ids
    assert journals(ws) == []


def claims_of(ws: Path, worker: str) -> set[str]:
    """The ids a worker journaled a claim for (from journal/<worker>.log)."""
    lines = (ws / "journal" / f"{worker}.log").read_text().splitlines()
    return {json.loads(line)["id"] for line in lines if '"claim"' in line}


SPAWN = 2  # senders per worker in the tests below


def serve_until_senders_hang(ws: Path, smtp_server: SMTPServer,
                             servers: Callable[..., Server]) -> tuple[set[str], Server, list[int]]:
    """40 messages queued, ``serve --processes 2 --spawn 2``: the sink answers 10, then
    keeps every sender waiting for the reply to its data (until ``handler.release`` is
    set). Returns once those 10 are in passed/ and each sender holds a claim waiting for
    its reply (only those are in active/ from then on): the ids, serve, the workers' pids."""
    write_config(ws, smtp_server.port)
    ids = queue(ws, 40)
    smtp_server.handler.hold_after["DATA"] = 10
    smtp_server.handler.hold.add("DATA")
    serve = servers(ws, "--processes", "2", "--spawn", str(SPAWN))
    pids = wait_workers(serve, 2)
    wait_until(lambda: len(ids_in(ws, "passed")) == 10
               and len(ids_in(ws, "active")) == 2 * SPAWN, 30,
               "every sender to wait for its reply")
    return ids, serve, pids


def assert_only_in_flight_resent(ws: Path, handler: RecordingHandler,
                                 in_flight: set[str]) -> None:
    """Every message arrived; only those sent without a reply (outcome unknown) twice."""
    received = Counter(handler.subjects())
    assert set(received) == {f"m{i}" for i in range(40)}
    subject = {p.stem: decode_record(p.read_bytes())["subject"]
               for p in (ws / "passed").rglob("*.json")}
    resent = {s for s, copies in received.items() if copies > 1}
    assert max(received.values()) <= 2 and resent <= {subject[i] for i in in_flight}


def test_worker_killed_by_pid_mid_send_loses_nothing(
        tmp_path: Path, smtp_server: SMTPServer, servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    ids, serve, _ = serve_until_senders_hang(ws, smtp_server, servers)
    handler = smtp_server.handler
    victim = worker_pids(ws)["w2"]
    in_flight = claims_of(ws, "w2") & ids_in(ws, "active")
    assert len(in_flight) == SPAWN
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: worker_pids(ws).get("w2", victim) != victim, 30, "a new w2")
    handler.hold.clear()
    handler.release.set()
    wait_until(lambda: ids_in(ws, "passed") == ids, 30, "every message in passed/")

    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0, serve.log()
    assert "holding claims: {'requeued': 2}" in serve.log()
    assert_only_in_flight_resent(ws, handler, in_flight)
    assert ids_in(ws, "active") == set()


def test_killed_supervisor_takes_its_workers_and_the_next_start_recovers(
        tmp_path: Path, smtp_server: SMTPServer, servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    ids, serve, pids = serve_until_senders_hang(ws, smtp_server, servers)
    handler = smtp_server.handler
    in_flight = ids_in(ws, "active")
    serve.proc.send_signal(signal.SIGKILL)
    assert serve.wait() == -signal.SIGKILL
    wait_until(lambda: not any(alive(pid) for pid in pids), 10, "the workers to die too")
    assert lock_holder(ws) is None
    # Their claims are still in active/, each journaled by the worker that made it.
    assert ids_in(ws, "active") == in_flight
    assert claims_of(ws, "w1") | claims_of(ws, "w2") >= in_flight
    handler.hold.clear()
    handler.release.set()

    again = servers(ws, "--processes", "2", "--spawn", str(SPAWN))
    wait_until(lambda: ids_in(ws, "passed") == ids or again.proc.poll() is not None, 30,
               "every message in passed/")
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait() == 0, again.log()
    assert "recovered claims from an earlier run: {'requeued': 4," in again.log()
    assert_only_in_flight_resent(ws, handler, in_flight)
    assert ids_in(ws, "active") == set() and ids_in(ws, "queued") == set()
    assert journals(ws) == []


def test_sigterm_lets_the_workers_finish_their_sends(
        tmp_path: Path, smtp_server: SMTPServer, servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    ids, serve, pids = serve_until_senders_hang(ws, smtp_server, servers)
    handler = smtp_server.handler
    in_flight = ids_in(ws, "active")
    serve.proc.send_signal(signal.SIGTERM)
    # Each worker got SIGTERM and waits (within grace) for its sends: let them finish.
    wait_until(lambda: serve.log().count(f"for {SPAWN} in-flight sends") == 2, 30,
               "both workers to wait for their sends")
    handler.hold.clear()
    handler.release.set()
    assert serve.wait() == 0, serve.log()
    assert lock_holder(ws) is None and not any(alive(pid) for pid in pids)
    passed, queued = ids_in(ws, "passed"), ids_in(ws, "queued")
    assert len(passed) == 10 + 2 * SPAWN and passed >= in_flight  # finished, not cut
    assert passed | queued == ids and ids_in(ws, "active") == set()
    received = Counter(handler.subjects())
    assert set(received.values()) == {1} and sum(received.values()) == len(passed)
    assert journals(ws) == []


def test_a_worker_that_cannot_start_stops_serve(tmp_path: Path, smtp_server: SMTPServer,
                                               servers: Callable[..., Server]) -> None:
    import fcntl

    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    (ws / "journal").mkdir()
    with open(ws / "journal" / "w1.lock", "w") as held:  # as if w1 were still running
        fcntl.flock(held, fcntl.LOCK_EX)
        serve = servers(ws, "--processes", "2")
        assert serve.wait() == 2, serve.log()
    assert "worker w1 exited with 2 before it was ready" in serve.log()
    assert lock_holder(ws) is None and worker_pids(ws) == {}


def test_push_back_seen_by_one_worker_pauses_them_all(
        tmp_path: Path, smtp_server: SMTPServer, servers: Callable[..., Server]) -> None:
    n = 20
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    ids = queue(ws, n)
    handler = smtp_server.handler
    handler.mail_replies.append("421 4.7.0 Too many connections, slow down")
    serve = servers(ws, "--processes", "2", "--spawn", "2")
    wait_until(lambda: ids_in(ws, "passed") == ids, 30, "every message in passed/")
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0, serve.log()
    log = serve.log()
    assert log.count("server pushed back") == 1, log  # one worker saw it...
    assert log.count("another worker saw push-back: pausing too") == 1, log  # ...both paused
    received = Counter(handler.subjects())
    assert len(received) == n and set(received.values()) == {1}


def test_next_start_settles_every_worker_journal(tmp_path: Path,
                                                 smtp_server: SMTPServer) -> None:
    """Claims left in active/ by dead workers: each settled from its own journal (an
    accepted one finished as passed and never sent; a claimed one requeued and sent)."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    client = Client(ws)
    accepted = client.create_work(to="a@example.com", subject="accepted").stem
    claimed = client.create_work(to="a@example.com", subject="claimed").stem
    for msg_id in (accepted, claimed):
        os.rename(ws / "queued" / f"{msg_id}.json", ws / "active" / f"{msg_id}.json")
    (ws / "journal").mkdir()
    (ws / "journal" / "w1.log").write_text(
        json.dumps({"op": "claim", "id": accepted, "at": 1.0}) + "\n"
        + json.dumps({"op": "accepted", "id": accepted, "at": 2.0, "code": 250,
                      "reply": "OK", "refused": {}, "attempt": 1}) + "\n")
    (ws / "journal" / "w2.log").write_text(
        json.dumps({"op": "claim", "id": claimed, "at": 1.0}) + "\n")
    (ws / "journal" / "w2.lock").write_text("999999\n")  # its owner is long gone

    result = run(ws, "process")
    assert result.returncode == 0, result.stderr
    assert smtp_server.handler.subjects() == ["claimed"]
    assert ids_in(ws, "passed") == {accepted, claimed}
    assert journals(ws) == [] and not (ws / "journal" / "w2.lock").exists()


def test_second_serve_is_refused_while_the_supervisor_runs(
        tmp_path: Path, smtp_server: SMTPServer, servers: Callable[..., Server]) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    serve = servers(ws, "--processes", "2")
    wait_workers(serve, 2)
    assert lock_holder(ws) == serve.pid  # the supervisor holds the workspace lock
    for command in ("serve", "process", "cleanup"):
        refused = run(ws, command)
        assert refused.returncode != 0, refused.stdout
        assert "already being delivered" in refused.stderr, refused.stderr
        assert str(serve.pid) in refused.stderr
    second = servers(ws, "--processes", "2")
    assert second.wait() != 0
    assert serve.proc.poll() is None and lock_holder(ws) == serve.pid
    queue(ws, 3)
    wait_until(lambda: len(ids_in(ws, "passed")) == 3, 30, "delivery")
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0, serve.log()
    assert lock_holder(ws) is None


# -- the API and the bounds ---------------------------------------------------------------


async def test_manager_processes_delivers_and_forwards_events(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    events: list[dict[str, object]] = []
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port), spawn=2,
                      processes=2, on_event=events.append)
    async with manager:
        for _ in range(3000):  # the workers start in the background
            if len(manager.worker_pids) == 2:
                break
            await asyncio.sleep(0.01)
        pids = manager.worker_pids
        assert len(pids) == 2 and all(parent_of(pid) == os.getpid() for pid in pids)
        assert manager.workers == []  # no sender task in this process
        paths = [await manager.create_work(to="a@example.com", subject=f"s{i}")
                 for i in range(6)]
        outcomes = [await manager.wait(path, timeout=20) for path in paths]
    assert [o.state for o in outcomes] == ["passed"] * 6
    assert manager.worker_pids == []
    await asyncio.sleep(0)
    assert not any(alive(pid) for pid in pids)
    assert sorted(smtp_server.handler.subjects()) == [f"s{i}" for i in range(6)]
    kinds = Counter(str(e["event"]) for e in events)
    assert kinds == {"queued": 6, "passed": 6}  # the workers' events reach the callback


def test_bounds_are_split_among_the_workers(tmp_path: Path) -> None:
    config = make_config(25, transport={"smtp": {"host": "127.0.0.1", "port": 25,
                                                 "max_connections": 5,
                                                 "max_per_second": 30}})
    pool = WorkerPool(Manager(tmp_path / "ws", config=config, processes=3), None)  # type: ignore[arg-type]
    assert [s.connections for s in pool.slots] == [2, 2, 1]  # sum: the workspace's
    assert [s.rate for s in pool.slots] == [10.0, 10.0, 10.0]
    assert pool.credit == 2 * 3  # two ids per sender (spawn 3)
    with pytest.raises(ConfigError, match="max_connections"):
        WorkerPool(Manager(tmp_path / "ws", config=config, processes=6), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="processes"):
        Manager(tmp_path / "ws", config=config, processes=-1)


def test_merge_entries_prefers_the_latest_acceptance() -> None:
    claim = {"op": "claim", "id": "x", "at": 1.0}
    old = {"op": "accepted", "id": "x", "at": 2.0, "attempt": 1}
    new = {"op": "accepted", "id": "x", "at": 3.0, "attempt": 2}
    assert merge_entries({"x": new}, {"x": claim}, {"x": old}) == {"x": new}
    assert merge_entries({"x": claim}, {"y": claim}) == {"x": claim, "y": claim}
