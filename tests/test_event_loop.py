"""``serve`` and ``process`` take ``--loop auto|asyncio|uvloop`` (issue 11 item 4).

``auto`` (the default) runs on uvloop when it is installed (``ess_async[speed]``), else on
asyncio's own loop; ``asyncio`` opts out; ``uvloop`` requires it. A bad value is a usage
error: one line on stderr, exit 2, nothing sent.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ess_async import Client, cli

from .conftest import SMTPServer, cli_env, write_config

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def run(ws: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ess_async", "--log-level", "DEBUG", command,
                           "--workspace", str(ws), *args], capture_output=True, text=True,
                          timeout=60, env=cli_env(), cwd=ws.parent)


def queue(ws: Path, n: int) -> None:
    client = Client(ws)
    for i in range(n):
        client.create_work(to=f"user{i}@example.com", subject=f"loop {i}", body="hello\n")


def loop_used(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "event loop: " in line]
    assert len(lines) == 1, stderr
    return lines[0].rsplit("event loop: ", 1)[1].strip()


def test_process_loop_asyncio_delivers(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 3)
    result = run(ws, "process", "--loop", "asyncio")
    assert result.returncode == 0, result.stderr
    assert "passed 3, failed 0" in result.stdout
    assert loop_used(result.stderr).startswith("asyncio"), result.stderr
    smtp_server.handler.wait_for(3)


def test_process_default_loop_is_uvloop_when_installed(tmp_path: Path,
                                                       smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 2)
    result = run(ws, "process")
    assert result.returncode == 0, result.stderr
    assert "passed 2, failed 0" in result.stdout
    expected = "uvloop" if HAVE_UVLOOP else "asyncio"
    assert loop_used(result.stderr).startswith(expected), result.stderr


@pytest.mark.parametrize("command", ["process", "serve"])
def test_unknown_loop_is_a_usage_error(tmp_path: Path, smtp_server: SMTPServer,
                                       command: str) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 1)
    result = subprocess.run([sys.executable, "-m", "ess_async", command, "--workspace",
                             str(ws), "--loop", "trio"], capture_output=True, text=True,
                            timeout=60, env=cli_env(), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--loop" in lines[0] and "'trio'" in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(os.listdir(ws / "queued")) == 1  # nothing was taken, nothing sent
    assert smtp_server.handler.messages == []


def test_loop_uvloop_without_uvloop_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    real = cli.importlib.import_module

    def no_uvloop(name: str, package: str | None = None) -> object:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", no_uvloop)
    ws = tmp_path / "ws"
    assert cli.cli("process", "--workspace", str(ws), "--loop", "uvloop") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uvloop is not installed" in err[0], err
    assert cli._loop_factory("auto") is None  # auto falls back to asyncio
    assert cli._loop_factory("asyncio") is None


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed (ess_async[speed])")
def test_serve_on_uvloop_delivers_and_stops_on_sigterm(tmp_path: Path,
                                                       smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    queue(ws, 2)
    err_path = tmp_path / "serve.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ess_async", "--log-level", "DEBUG",
                                 "serve", "--workspace", str(ws), "--loop", "uvloop"],
                                stdout=subprocess.DEVNULL, stderr=err, env=cli_env(),
                                cwd=tmp_path)
    try:
        smtp_server.handler.wait_for(2)
        queue(ws, 1)  # picked up by the watcher, on uvloop too
        smtp_server.handler.wait_for(3)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert loop_used(err_path.read_text()) == "uvloop"
    assert len(smtp_server.handler.messages) == 3
