"""Issue 14 part 5: the suppression list, against a real aiosmtpd server and the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ess_async import Client, Manager, MessageError
from ess_async.config import ConfigError, parse_config
from ess_async.spool import decode_record
from ess_async.suppression import SuppressionList, normalize, refused_for_good

from .conftest import FakeClock, SMTPServer, make_config


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


def test_list_is_durable_private_and_case_insensitive(tmp_path: Path) -> None:
    """Issue 14 part 5: entries are one 0600 file per address (hashed name) in a 0700
    folder; addresses compare case-insensitively, display names are ignored."""
    ws = tmp_path / "ws"
    suppression = SuppressionList(ws)
    suppression.add("Bob <Bob@Example.COM>", reason="bounce", code=550, reply="5.1.1 gone")
    assert "bob@example.com" in suppression
    assert "BOB@example.com" in SuppressionList(ws)  # another instance: it is on disk
    folder = ws / "suppressed"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (entry_file,) = folder.iterdir()
    assert stat.S_IMODE(entry_file.stat().st_mode) == 0o600
    assert "bob" not in entry_file.name  # the name is a hash
    (entry,) = suppression.entries()
    assert entry["address"] == "bob@example.com" and entry["code"] == 550
    assert suppression.remove("bob@EXAMPLE.com") is True
    assert suppression.remove("bob@example.com") is False
    assert "bob@example.com" not in suppression
    with pytest.raises(MessageError):
        normalize("not an address")


def test_ttl_days_expires_entries(tmp_path: Path) -> None:
    """Issue 14 part 5: with [suppression] ttl_days, an entry older than that is no
    longer listed, and prune removes its file."""
    clock = FakeClock()
    suppression = SuppressionList(tmp_path, ttl_days=2, clock=clock)
    suppression.add("old@example.com")
    clock.advance(86400)
    suppression.add("new@example.com")
    clock.advance(86400 + 1)
    assert "old@example.com" not in suppression
    assert "new@example.com" in suppression
    assert suppression.prune() == 1
    assert [e["address"] for e in suppression.entries()] == ["new@example.com"]
    assert parse_config({"suppression": {"ttl_days": 30}}).suppression.ttl_days == 30
    with pytest.raises(ConfigError, match=r"suppression\.ttl_days"):
        parse_config({"suppression": {"ttl_days": -1}})
    with pytest.raises(ConfigError, match=r"suppression\.nope"):
        parse_config({"suppression": {"nope": 1}})


def test_refused_for_good_skips_policy_replies() -> None:
    """Issue 14 part 5: a 5xx about the mailbox lists it; 4xx, 5.7.x policy (relay
    denied) and 5.3.x system replies do not."""
    assert refused_for_good(550, "5.1.1 No such user")
    assert refused_for_good(551, "user not local")
    assert not refused_for_good(450, "4.2.1 busy")
    assert not refused_for_good(554, "5.7.1 <a@example.com>: Relay access denied")
    assert not refused_for_good(552, "5.3.4 message too big")


async def test_rcpt_5xx_suppresses_later_messages(tmp_path: Path,
                                                  smtp_server: SMTPServer) -> None:
    """Issue 14 part 5: a 5xx at RCPT puts the address on the list; the next
    create_work to it sends nothing to it (the others still get the message), a message
    left with nobody is recorded in failed/ with reason "suppressed", and force=True
    sends anyway."""
    smtp_server.handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    ws = tmp_path / "ws"
    manager = Manager(ws, config=make_config(smtp_server.port))
    await manager.create_work(to=["gone@example.com", "ok@example.com"], subject="one")
    assert (await manager.process_workload()).passed == 1
    entry = manager.suppression.get("Gone@Example.com")
    assert entry is not None and entry["code"] == 550 and entry["source"] == "rcpt"

    partial = await manager.create_work(to=["GONE@example.com", "ok@example.com"],
                                        subject="two")
    alone = await manager.create_work(to="gone@example.com", subject="three")
    assert alone.parent.parent.name == "failed"
    (record,) = records(ws, "failed")
    assert record["result"]["reason"] == "suppressed"
    assert record["suppressed"] == ["gone@example.com"]
    outcome = await manager.wait(alone, timeout=5)
    assert outcome.state == "failed"
    assert decode_record(partial.read_bytes())["recipients"] == ["ok@example.com"]

    smtp_server.handler.rcpt_replies.clear()
    await manager.create_work(to="gone@example.com", subject="four", force=True)
    assert (await manager.process_workload()).passed == 2
    sent = {m.message["Subject"]: m.rcpt_tos for m in smtp_server.handler.messages}
    assert sent["two"] == ["ok@example.com"]
    assert "three" not in sent
    assert sent["four"] == ["gone@example.com"]


async def test_policy_refusal_and_data_refusal_do_not_suppress(
        tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 14 part 5: a 5.7.x at RCPT (relay denied) and a 5xx at the end of the data
    (content) say nothing about the mailbox: nothing is listed."""
    handler = smtp_server.handler
    handler.rcpt_replies["a@example.com"] = "554 5.7.1 <a@example.com>: Relay access denied"
    handler.data_replies.append("554 5.6.0 rejected as spam")
    manager = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    await manager.create_work(to="a@example.com", subject="x")
    await manager.create_work(to="b@example.com", subject="y")
    assert (await manager.process_workload()).failed == 2
    assert manager.suppression.entries() == []


def test_client_honours_the_list(tmp_path: Path) -> None:
    """Issue 14 part 5: the synchronous Client checks the list too."""
    ws = tmp_path / "ws"
    SuppressionList(ws).add("x@example.com")
    client = Client(ws, config=make_config(25))
    path = client.create_work(to="x@example.com", subject="s")
    assert decode_record(path.read_bytes())["result"]["reason"] == "suppressed"
    forced = client.create_work(to="x@example.com", subject="s", force=True)
    assert forced.parent.name == "queued"


def run_cli(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "ess_async", "suppress", *args,
                           "--workspace", str(ws)], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_suppress_commands(tmp_path: Path) -> None:
    """Issue 14 part 5: ``suppress add|check|list|remove`` as subprocesses; check exits
    0 when listed and 1 when not; a bad address is one line on stderr, exit 2."""
    ws = tmp_path / "ws"
    added = run_cli(ws, "add", "Bounced@Example.com", "--reason", "hard bounce")
    assert added.returncode == 0, added.stderr
    assert run_cli(ws, "check", "bounced@example.com").returncode == 0
    assert run_cli(ws, "check", "other@example.com").returncode == 1
    listed = run_cli(ws, "list", "--json")
    assert [e["address"] for e in json.loads(listed.stdout)] == ["bounced@example.com"]
    assert "hard bounce" in run_cli(ws, "list").stdout
    assert run_cli(ws, "remove", "bounced@example.com").returncode == 0
    assert run_cli(ws, "remove", "bounced@example.com").returncode == 1
    assert run_cli(ws, "check", "bounced@example.com").returncode == 1
    bad = run_cli(ws, "add", "nobody")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
