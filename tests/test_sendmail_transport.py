"""Issue 13 part 4 (the sendmail transport) and part 5 (the memory transport's
registration), with a real program on this machine: a small Python script standing in
for sendmail that records its argv and input and exits as told."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from ess_async import ConfigError, Manager
from ess_async.config import TransportConfig, parse_config
from ess_async.errors import PermanentDeliveryError
from ess_async.spool import decode_record
from ess_async.transports import SendmailTransport, create_transport

FAKE_SENDMAIL = """\
#!{python}
import json, os, pathlib, signal, sys, time
here = pathlib.Path(__file__).parent
data = sys.stdin.buffer.read()
runs = here / "runs"
runs.mkdir(exist_ok=True)
name = f"{{time.time_ns()}}-{{os.getpid()}}"
(runs / f"{{name}}.json").write_text(json.dumps({{"argv": sys.argv, "pid": os.getpid(),
    "stdin": data.decode("latin-1"), "env": os.environ.get("ESS_ASYNC_SENDMAIL_TRANSPORT")}}))
mode = (here / "mode").read_text().strip()
if mode == "overlap":
    running = here / "running"
    running.mkdir(exist_ok=True)
    (running / name).touch()
    with open(here / "overlap.log", "a") as log:
        log.write(f"{{len(list(running.iterdir()))}}\\n")
    time.sleep(0.3)
    (running / name).unlink()
    mode = "0"
if mode == "signal":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "hang":
    time.sleep(60)
if mode != "0":
    sys.stderr.write(f"fake sendmail: refusing with {{mode}}\\n")
sys.exit(int(mode) if mode.isdigit() else 1)
"""


def fake_sendmail(folder: Path, mode: str = "0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "sendmail"
    script.write_text(FAKE_SENDMAIL.format(python=sys.executable))
    script.chmod(0o755)
    (folder / "mode").write_text(mode)
    return script


def runs(folder: Path) -> list[dict]:
    if not (folder / "runs").exists():
        return []
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").iterdir())]


def records(workspace: Path, state: str) -> list[dict]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / state).rglob("*.json"))]


def sendmail_manager(workspace: Path, script: Path, spawn: int = 1, **sendmail: object,
                     ) -> Manager:
    config = parse_config({
        "message": {"from": "sender@example.com"},
        "retry": {"min_backoff": 1, "max_backoff": 2},
        "transport": {"type": "sendmail", "sendmail": {"path": str(script), **sendmail}},
    })
    return Manager(workspace, spawn=spawn, config=config)


async def test_message_piped_to_program(tmp_path: Path) -> None:
    """Issue 13 part 4: each message is piped to the program with the default args
    (-i -f {from} --, then the recipients), LF line ends, Bcc on the envelope only;
    exit 0 is accepted and the record says so."""
    script = fake_sendmail(tmp_path / "bin")
    manager = sendmail_manager(tmp_path / "ws", script)
    await manager.create_work(to="Zoë <to@example.com>", cc="cc@example.com",
                              bcc="hidden@example.com", subject="Grüße", body="Hällo\n.\n")
    summary = await manager.process_workload()
    assert (summary.passed, summary.failed, summary.deferred) == (1, 0, 0)
    (run,) = runs(tmp_path / "bin")
    assert run["argv"] == [str(script), "-i", "-f", "sender@example.com", "--",
                           "to@example.com", "cc@example.com", "hidden@example.com"]
    assert run["env"] == "1"  # ess-sendmail refuses to queue what its transport pipes
    (record,) = records(tmp_path / "ws", "passed")
    assert run["stdin"].encode("latin-1") == record["raw"].encode("ascii").replace(
        b"\r\n", b"\n")
    assert "\r" not in run["stdin"] and "hidden@example.com" not in run["stdin"]
    assert "\n.\n" in run["stdin"]  # -i: the program is told a lone dot is text
    assert record["result"]["code"] == 250
    assert record["delivered_to"] == ["to@example.com", "cc@example.com",
                                      "hidden@example.com"]


async def test_custom_args_and_placeholder(tmp_path: Path) -> None:
    """Issue 13 part 4: [transport.sendmail] args replace the defaults; {from} is the
    envelope sender wherever it appears."""
    script = fake_sendmail(tmp_path / "bin")
    manager = sendmail_manager(tmp_path / "ws", script, args=["-oi", "-r{from}", "--"])
    await manager.create_work(to="to@example.com", subject="s", body="b")
    await manager.process_workload()
    (run,) = runs(tmp_path / "bin")
    assert run["argv"] == [str(script), "-oi", "-rsender@example.com", "--", "to@example.com"]


@pytest.mark.parametrize(("mode", "state", "reason"), [
    ("75", "deferred", "exited with status 75: fake sendmail: refusing with 75"),
    ("1", "failed", "exited with status 1: fake sendmail: refusing with 1"),
    ("signal", "deferred", "killed by SIGKILL"),
])
async def test_exit_status(tmp_path: Path, mode: str, state: str, reason: str) -> None:
    """Issue 13 part 4: exit 75 (EX_TEMPFAIL) and a signal are temporary (the message is
    deferred and retried); any other status is permanent, with the program's stderr as
    the reply."""
    script = fake_sendmail(tmp_path / "bin", mode)
    manager = sendmail_manager(tmp_path / "ws", script)
    await manager.create_work(to="to@example.com", subject="s", body="b")
    await manager.process_workload()
    (record,) = records(tmp_path / "ws", state)
    assert reason in record["last_error"]["message"]
    assert len(runs(tmp_path / "bin")) == 1
    if state == "deferred":  # retried: the program accepts it this time
        (tmp_path / "bin" / "mode").write_text("0")
        deadline = time.monotonic() + 15
        while not records(tmp_path / "ws", "passed"):
            assert time.monotonic() < deadline
            await manager.process_workload()
            await asyncio.sleep(0.2)
        assert len(runs(tmp_path / "bin")) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says whether it runs.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_hanging_program_killed_after_timeout(tmp_path: Path) -> None:
    """Issue 13 part 4: a program that hangs is killed after [transport.sendmail]
    timeout seconds; the message is deferred (outcome unknown: it had the whole
    message)."""
    script = fake_sendmail(tmp_path / "bin", "hang")
    manager = sendmail_manager(tmp_path / "ws", script, timeout=0.5)
    await manager.create_work(to="to@example.com", subject="s", body="b")
    start = time.monotonic()
    await manager.process_workload()
    assert time.monotonic() - start < 10
    (record,) = records(tmp_path / "ws", "deferred")
    assert "did not exit within 0.5s" in record["last_error"]["message"]
    assert record["last_error"].get("outcome_unknown") is True
    (run,) = runs(tmp_path / "bin")
    assert not _alive(run["pid"])


async def test_missing_program_waits_uncharged(tmp_path: Path) -> None:
    """Issue 13 part 4: a program that cannot be run is the configuration's fault: the
    message stays queued, no attempt counted."""
    manager = sendmail_manager(tmp_path / "ws", tmp_path / "no-such-sendmail")
    await manager.create_work(to="to@example.com", subject="s", body="b")
    await manager.process_workload()
    (record,) = records(tmp_path / "ws", "queued")
    assert record["attempts"] == 0
    assert record["last_error"]["destination"] is True
    assert "cannot run" in record["last_error"]["message"]


async def test_concurrency_bounded_by_spawn(tmp_path: Path) -> None:
    """Issue 13 part 4: at most `spawn` programs run at once."""
    script = fake_sendmail(tmp_path / "bin", "overlap")
    manager = sendmail_manager(tmp_path / "ws", script, spawn=2)
    for i in range(6):
        await manager.create_work(to=f"to{i}@example.com", subject="s", body="b")
    summary = await manager.process_workload()
    assert summary.passed == 6
    counts = [int(n) for n in (tmp_path / "bin" / "overlap.log").read_text().split()]
    assert len(counts) == 6 and max(counts) <= 2


async def test_dash_recipient_without_double_dash_refused(tmp_path: Path) -> None:
    """Issue 13 part 4: without "--" in args, a recipient starting with "-" would be an
    option of the program: refused, never run."""
    transport = SendmailTransport(parse_config({"transport": {"sendmail": {
        "path": str(fake_sendmail(tmp_path / "bin")), "args": ["-i"]}}}).transport.sendmail)
    with pytest.raises(PermanentDeliveryError):
        await transport.send("a@example.com", ["-X/tmp/log@example.com"], b"x\r\n")
    assert runs(tmp_path / "bin") == []


@pytest.mark.parametrize(("table", "key"), [
    ({"args": "-i"}, "transport.sendmail.args"),
    ({"args": ["-i", 3]}, "transport.sendmail.args"),
    ({"timeout": 0}, "transport.sendmail.timeout"),
    ({"path": 1}, "transport.sendmail.path"),
    ({"pth": "x"}, "transport.sendmail.pth"),
])
def test_bad_sendmail_config(table: dict, key: str) -> None:
    """Issue 13 part 4: [transport.sendmail] keys are checked like every other."""
    with pytest.raises(ConfigError) as info:
        parse_config({"transport": {"type": "sendmail", "sendmail": table}})
    assert info.value.key == key


def test_sendmail_config_defaults() -> None:
    """Issue 13 part 4: the documented defaults."""
    config = parse_config({"transport": {"type": "sendmail"}}).transport
    assert config.type == "sendmail"
    assert config.sendmail.path == "/usr/sbin/sendmail"
    assert config.sendmail.args == ["-i", "-f", "{from}", "--"]
    assert config.sendmail.timeout == 60.0


async def test_memory_transport_registered(tmp_path: Path) -> None:
    """Issue 13 part 5: [transport] type = "memory" delivers into the module's outbox."""
    from ess_async.transports import memory

    assert isinstance(create_transport(TransportConfig(type="memory"), tmp_path),
                      memory.MemoryTransport)
    config = parse_config({"message": {"from": "sender@example.com"},
                           "transport": {"type": "memory"}})
    before = len(memory.outbox)
    try:
        manager = Manager(tmp_path / "ws", config=config)
        await manager.create_work(to="to@example.com", subject="kept", body="b")
        assert (await manager.process_workload()).passed == 1
        (sent,) = memory.outbox[before:]
        assert sent.recipients == ["to@example.com"] and b"Subject: kept" in sent.raw
    finally:
        del memory.outbox[before:]


HAS_IT_ALL = f"""#!{sys.executable}
import sys, time, pathlib
from ess_async.spool import decode_record
data = sys.stdin.buffer.read()
pathlib.Path(__file__).with_name("got").write_bytes(data)   # it has the whole message
time.sleep(60)                                              # e.g. slow local delivery
"""


async def test_stop_while_the_program_has_the_message_is_outcome_unknown(
        tmp_path: Path) -> None:
    """Issue 13 part 4 with issue 8 item 3 (review): a stop whose grace runs out while the
    program runs, after it read the whole message, records the message as outcome unknown
    (deferred), never requeued as if nothing was sent."""
    prog = tmp_path / "sendmail"
    prog.write_text(HAS_IT_ALL)
    prog.chmod(0o755)
    config = parse_config({"message": {"from": "s@example.com"},
                           "retry": {"min_backoff": 60, "max_backoff": 120},
                           "server": {"grace": 0.5},
                           "transport": {"type": "sendmail", "sendmail": {
                               "path": str(prog), "args": ["-i", "--"], "timeout": 30}}})
    manager = Manager(tmp_path / "ws", config=config, spawn=1)
    async with manager:
        path = await manager.create_work(to="a@example.com", subject="S", body="b")
        async with asyncio.timeout(20):
            while not (tmp_path / "got").exists():
                await asyncio.sleep(0.05)
    (record,) = [decode_record(p.read_bytes())
                 for p in (tmp_path / "ws" / "deferred").iterdir()]
    assert record["id"] == path.stem
    assert record["last_error"]["outcome_unknown"] is True
