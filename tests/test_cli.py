"""Every CLI command through a real subprocess (``python -m ess_async``).

Good input does what the command says; bad input prints exactly one line on stderr naming
the culprit, exits non-zero, and queues nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ess_async import __version__
from ess_async.spool import decode_record

from .conftest import SMTPServer, cli_env, write_config

FROM = "sender@example.com"
STATE_KEYS = ("queued", "active", "deferred", "passed", "failed")


def run(ws: Path | None, command: str, *args: str, log_level: str | None = None,
        stdin: str | None = None, timeout: float = 60,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ess_async [--log-level L] COMMAND [--workspace WS] ARGS...``."""
    argv = [sys.executable, "-m", "ess_async"]
    if log_level is not None:
        argv += ["--log-level", log_level]
    argv.append(command)
    if ws is not None:
        argv += ["--workspace", str(ws)]
    argv += list(args)
    cwd = ws.parent if ws is not None else None  # a default ./ess_data never lands in /work
    return subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=timeout,
                          env=cli_env(**(extra_env or {})), cwd=cwd)


def queued(ws: Path) -> list[Path]:
    folder = ws / "queued"
    return sorted(folder.iterdir()) if folder.exists() else []


def status_json(ws: Path) -> dict[str, int]:
    result = run(ws, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# -- version, config -------------------------------------------------------------------


def test_version() -> None:
    result = run(None, "version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __version__
    assert result.stderr == ""


def test_config_writes_once_and_keeps_existing(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    first = run(ws, "config")
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    assert path == ws / "config.toml"
    assert path.is_file()
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "[transport.smtp]" in text and "[server]" in text
    # The template it wrote is a valid config: status loads it without complaint.
    assert status_json(ws)["total"] == 0

    path.write_text('[message]\nfrom = "kept@example.com"\n')
    second = run(ws, "config")
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip()) == path
    assert path.read_text() == '[message]\nfrom = "kept@example.com"\n'


# -- email -----------------------------------------------------------------------------


def test_email_all_headers_queued_privately_then_delivered(tmp_path: Path,
                                                           smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"  # created by the CLI itself: it must be private
    result = run(ws, "email", "--to", "a@example.com", "--to", "b@example.com",
                 "--cc", "c@example.com", "--bcc", "hidden@example.com", "--from", FROM,
                 "--reply-to", "reply@example.com", "--subject", "Hello there",
                 "--body", "plain body\n")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == ws / "queued"
    assert path.is_file()
    assert path.stat().st_mode & 0o777 == 0o600
    assert (ws / "queued").stat().st_mode & 0o777 == 0o700
    assert ws.stat().st_mode & 0o777 == 0o700
    assert queued(ws) == [path]
    record = decode_record(path.read_bytes())
    assert record["subject"] == "Hello there"
    assert record["bcc_count"] == 1

    write_config(ws, smtp_server.port)
    proc = run(ws, "process")
    assert proc.returncode == 0, proc.stderr
    assert "passed 1" in proc.stdout
    smtp_server.handler.wait_for(1)
    [got] = smtp_server.handler.messages
    assert got.mail_from == FROM
    assert sorted(got.rcpt_tos) == ["a@example.com", "b@example.com", "c@example.com",
                                    "hidden@example.com"]
    msg = got.message
    assert msg["Subject"] == "Hello there"
    assert msg["To"] == "a@example.com, b@example.com"
    assert msg["Cc"] == "c@example.com"
    assert msg["Reply-To"] == "reply@example.com"
    assert msg["From"] == FROM
    assert msg["Bcc"] is None
    assert b"hidden@example.com" not in got.data
    assert msg.get_content().replace("\r\n", "\n") == "plain body\n"
    assert queued(ws) == []


def test_email_body_from_stdin_html_and_attachment(tmp_path: Path,
                                                   smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    html = tmp_path / "page.html"
    html.write_text("<p>Hello <b>HTML</b></p>\n", encoding="utf-8")
    attachment = tmp_path / "report.csv"
    attachment.write_bytes(b"a,b\n1,2\n")
    result = run(ws, "email", "--to", "a@example.com", "--subject", "with parts",
                 "--body-file", "-", "--html-file", str(html), "--attach", str(attachment),
                 stdin="text read from stdin\n")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_file() and path.parent == ws / "queued"
    assert path.stat().st_mode & 0o777 == 0o600

    proc = run(ws, "process")
    assert proc.returncode == 0, proc.stderr
    smtp_server.handler.wait_for(1)
    msg = smtp_server.handler.messages[0].message
    assert msg["From"] == FROM  # from the config's [message] defaults
    plain = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    assert plain is not None and html_part is not None
    assert plain.get_content().replace("\r\n", "\n") == "text read from stdin\n"
    assert html_part.get_content().replace("\r\n", "\n") == "<p>Hello <b>HTML</b></p>\n"
    [part] = list(msg.iter_attachments())
    assert part.get_filename() == "report.csv"
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == b"a,b\n1,2\n"


# -- testmail, status, process, cleanup, stop --------------------------------------------


def test_testmail_queues_n_and_process_delivers(tmp_path: Path,
                                                smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    result = run(ws, "testmail", "-n", "5", "--to", "t@example.com")
    assert result.returncode == 0, result.stderr
    assert "5" in result.stdout
    assert len(queued(ws)) == 5
    assert status_json(ws)["queued"] == 5

    proc = run(ws, "process", "--spawn", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "passed 5, failed 0, deferred 0, corrupt 0"
    smtp_server.handler.wait_for(5)
    assert sorted(smtp_server.handler.subjects()) == [f"ess_async test {i}"
                                                      for i in range(1, 6)]
    assert all(m.rcpt_tos == ["t@example.com"] for m in smtp_server.handler.messages)
    counts = status_json(ws)
    assert counts["queued"] == 0 and counts["passed"] == 5 and counts["total"] == 5


def test_status_counts_add_up(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    empty = status_json(ws)
    assert all(empty[key] == 0 for key in STATE_KEYS)
    assert empty["server_pid"] is None

    for i in range(4):
        assert run(ws, "email", "--to", "a@example.com", "--subject", f"s{i}").returncode == 0
    # One sender delivers oldest first: passed, failed, deferred, passed.
    smtp_server.handler.data_replies.extend(
        ["250 OK", "550 5.1.1 no such user", "451 4.3.0 try later", "250 OK"])
    proc = run(ws, "process", "--spawn", "1")
    assert proc.returncode == 0, proc.stderr
    assert "passed 2, failed 1, deferred 1" in proc.stdout
    for i in range(4, 6):
        assert run(ws, "email", "--to", "a@example.com", "--subject", f"s{i}").returncode == 0

    counts = status_json(ws)
    for key in (*STATE_KEYS, "total", "server_pid"):
        assert key in counts, counts
    assert {k: counts[k] for k in STATE_KEYS} == {"queued": 2, "active": 0, "deferred": 1,
                                                  "passed": 2, "failed": 1}
    states = sum(v for k, v in counts.items()
                 if k not in ("total", "server_pid", "oldest_queued_age", "last_error"))
    assert states == counts["total"] == 6  # every message ever queued, once

    text = run(ws, "status")
    assert text.returncode == 0, text.stderr
    lines = {line.split()[0]: line.split()[1:] for line in text.stdout.splitlines()}
    assert lines["queued"] == ["2"] and lines["passed"] == ["2"] and lines["total"] == ["6"]
    assert "not running" in text.stdout


def test_process_with_nothing_queued(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    proc = run(ws, "process")
    assert proc.returncode == 0, proc.stderr
    assert "passed 0, failed 0, deferred 0" in proc.stdout
    assert smtp_server.handler.messages == []


def test_log_level_goes_before_the_command(tmp_path: Path, smtp_server: SMTPServer) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    for i in range(2):
        assert run(ws, "email", "--to", "a@example.com", "--subject", f"l{i}").returncode == 0
    quiet = run(ws, "process", log_level="ERROR")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert run(ws, "email", "--to", "a@example.com", "--subject", "l2").returncode == 0
    loud = run(ws, "process", log_level="debug")  # case-insensitive
    assert loud.returncode == 0, loud.stderr
    assert "INFO" in loud.stderr and "passed" in loud.stderr
    smtp_server.handler.wait_for(3)


def test_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    result = run(None, "version", log_level="nonsense")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]  # argparse: usage, then the error
    assert "--log-level" in last and "NONSENSE" in last, result.stderr


def test_bad_log_level_from_environment_is_one_line(tmp_path: Path) -> None:
    result = run(None, "version", extra_env={"ESS_LOG_LEVEL": "bogus"})
    assert_one_error_line(result, "ESS_LOG_LEVEL", "BOGUS")
    assert result.stdout == ""
    ok = run(None, "version", extra_env={"ESS_LOG_LEVEL": "warning"})
    assert ok.returncode == 0 and ok.stdout.strip() == __version__


def test_cleanup_requeues_a_stranded_claim(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert run(ws, "email", "--to", "a@example.com", "--from", FROM).returncode == 0
    [path] = queued(ws)
    # A claim whose deliverer died before anything was journaled: back to queued/.
    path.rename(ws / "active" / path.name)
    result = run(ws, "cleanup")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["requeued"] == 1
    assert [p.name for p in queued(ws)] == [path.name]
    assert list((ws / "active").iterdir()) == []
    again = run(ws, "cleanup")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["requeued"] == 0


def test_stop_without_a_server_fails(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert run(ws, "config").returncode == 0
    result = run(ws, "stop")
    assert_one_error_line(result, "no server")
    # Nor when the workspace does not exist at all.
    assert run(tmp_path / "nowhere", "stop").returncode != 0


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--to", "not-an-address", "--from", FROM], "error: to: malformed"),
        (["--to", "a@example.com", "--cc", "two@@example.com", "--from", FROM],
         "error: cc: malformed"),
        (["--to", "a@example.com", "--from", "nobody"], "error: from: malformed"),
        (["--to", "a@example.com", "--reply-to", "x y", "--from", FROM],
         "error: reply_to: malformed"),
        (["--from", FROM, "--subject", "no recipient"], "error: to: no recipient"),
        (["--to", "a@example.com"], "error: from: no sender"),
        (["--to", "a@example.com", "--from", FROM, "--attach", "/nonexistent/file.pdf"],
         "error: attachments[0]: cannot read"),
        (["--to", "a@example.com", "--from", FROM, "--subject", "x\r\nBcc: e@example.com"],
         "error: subject: must not contain"),
        (["--to", "a@example.com", "--from", FROM, "--subject", "x\nBcc: e@example.com"],
         "error: subject: must not contain"),
        (["--to", "a@example.com", "--from", FROM, "--subject", "x\rBcc: e@example.com"],
         "error: subject: must not contain"),
        (["--to", "a@example.com", "--from", FROM, "--body-file", "/nonexistent/missing.txt"],
         "body"),
    ],
    ids=["malformed-to", "malformed-cc", "malformed-from", "malformed-reply-to",
         "no-recipient", "no-sender", "missing-attachment", "crlf-subject", "lf-subject",
         "cr-subject", "missing-body-file"],
)
def test_email_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    ws = tmp_path / "ws"
    result = run(ws, "email", *args)
    assert_one_error_line(result, needle)
    assert result.stdout == ""
    assert queued(ws) == []


def test_email_missing_html_file_names_html(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = run(ws, "email", "--to", "a@example.com", "--from", FROM,
                 "--html-file", str(tmp_path / "absent"))
    line = assert_one_error_line(result).replace(str(tmp_path), "")
    # Today it says "cannot read body", which points at the wrong option.
    assert "html" in line, line
    assert queued(ws) == []


def test_testmail_bad_count(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = run(ws, "testmail", "-n", "0", "--to", "a@example.com", "--from", FROM)
    assert_one_error_line(result, "-n")
    assert queued(ws) == []


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("[server]\nbogus = 1\n", "server.bogus"),
        ("[transport.smtp]\nprot = 25\n", "transport.smtp.prot"),
        ('[message]\nfrom = "sender@example.com"\nsubjekt = "x"\n', "message.subjekt"),
        ("[server]\nspawn = \"three\"\n", "server.spawn"),
    ],
    ids=["server", "smtp", "message", "wrong-type"],
)
@pytest.mark.parametrize("command", ["email", "testmail", "process", "serve", "status"])
def test_bad_config_key(tmp_path: Path, config: str, key: str, command: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "config.toml").write_text(config)
    args = {"email": ["--to", "a@example.com", "--from", FROM],
            "testmail": ["--to", "a@example.com", "--from", FROM]}.get(command, [])
    result = run(ws, command, *args, timeout=30)
    assert_one_error_line(result, f"{key}: ")
    assert queued(ws) == []
