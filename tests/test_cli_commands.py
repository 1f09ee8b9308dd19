"""Every CLI command through a real subprocess; bad input is one line and queues nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ess_async import __version__
from ess_async.cli import cli

from .conftest import SMTPServer, write_config


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ess_async", *args], capture_output=True,
                          text=True, input=stdin, timeout=120,
                          env={**os.environ, **(env or {})})


def queued(ws: Path) -> list[Path]:
    folder = ws / "queued"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_version_and_config(tmp_path: Path) -> None:
    assert run("version").stdout.strip() == __version__
    ws = tmp_path / "ws"
    result = run("config", "--workspace", str(ws))
    assert result.returncode == 0
    path = Path(result.stdout.strip())
    assert path == ws / "config.toml" and path.exists()
    path.write_text('[message]\nfrom = "x@example.com"\n')
    assert run("config", "--workspace", str(ws)).returncode == 0
    assert path.read_text() == '[message]\nfrom = "x@example.com"\n'  # kept


def test_email_and_process(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    html = tmp_path / "body.html"
    html.write_text("<p>Hi</p>")
    attachment = tmp_path / "notes.txt"
    attachment.write_text("attached")
    result = run("email", "--workspace", str(ws), "--to", "a@example.com", "--to",
                 "b@example.com", "--cc", "c@example.com", "--bcc", "d@example.com",
                 "--from", "me@example.com", "--reply-to", "r@example.com",
                 "--subject", "Grüße", "--body-file", "-", "--html-file", str(html),
                 "--attach", str(attachment), "--tag", "cli", stdin="from stdin\n")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == ws / "queued" and path.exists()
    assert path.stat().st_mode & 0o777 == 0o600
    assert (ws / "queued").stat().st_mode & 0o777 == 0o700

    assert run("testmail", "-n", "3", "--to", "t@example.com", "--workspace",
               str(ws)).returncode == 0
    assert len(queued(ws)) == 4
    result = run("process", "--workspace", str(ws))
    assert result.returncode == 0, result.stderr
    assert "passed 4" in result.stdout
    got = next(m for m in smtp_server.handler.messages if m.message["Subject"] == "Grüße")
    assert sorted(got.rcpt_tos) == ["a@example.com", "b@example.com", "c@example.com",
                                    "d@example.com"]
    assert got.mail_from == "me@example.com"
    assert got.message.get_body(("plain",)).get_content() == "from stdin\n"
    assert got.message.get_body(("html",)).get_content().strip() == "<p>Hi</p>"
    assert next(got.message.iter_attachments()).get_filename() == "notes.txt"

    counts = json.loads(run("status", "--json", "--workspace", str(ws)).stdout)
    for key in ("queued", "active", "deferred", "passed", "failed"):
        assert key in counts
    assert counts["passed"] == counts["total"] == 4
    plain = run("status", "--workspace", str(ws)).stdout
    assert "passed" in plain and "not running" in plain
    assert json.loads(run("cleanup", "--workspace", str(ws)).stdout)["requeued"] == 0


def test_demo_needs_no_mail_server() -> None:
    result = run("--log-level", "WARNING", "demo", "-n", "25")
    assert result.returncode == 0, result.stderr
    assert "sink received 25" in result.stdout


@pytest.mark.parametrize(("args", "field"), [
    (["--to", "not-an-address"], "to"),
    ([], "to"),
    (["--to", "a@example.com", "--attach", "/nonexistent.pdf"], "attachments[0]"),
    (["--to", "a@example.com", "--subject", "a\nBcc: x@example.com"], "subject"),
    (["--to", "a@example.com", "--from", "nobody"], "from"),
    (["--to", "a@example.com", "--body-file", "/nonexistent.txt"], "body"),
])
def test_bad_email_input(tmp_path: Path, args: list[str], field: str) -> None:
    ws = tmp_path / "ws"
    write_config(ws, 25)
    subject = [] if "--subject" in args else ["--subject", "s"]
    result = run("email", "--workspace", str(ws), *subject, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr
    assert queued(ws) == []


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "config.toml").write_text("[server]\nspwan = 3\n")
    for command in (["status"], ["process"], ["email", "--to", "a@example.com"]):
        result = run(*command, "--workspace", str(ws))
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert "server.spwan: unknown key" in line
    assert queued(ws) == []


def test_cli_callable_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("version") == 0
    assert capsys.readouterr().out.strip() == __version__
    assert cli("testmail", "-n", "0", "--to", "a@example.com", "--workspace",
               str(tmp_path)) == 2


def test_bad_log_level_is_a_usage_error() -> None:
    result = run("--log-level", "loud", "version")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr
