"""Issue 13 part 3: ``ess-async sendmail`` / ``ess-sendmail``, run as real subprocesses
with the invocations real callers use, then delivered to a real SMTP server."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ess_async import Manager
from ess_async import sendmail as sendmail_module
from ess_async.errors import SpoolError
from ess_async.sendmail import Options, UsageError, parse_options, read_input

from .conftest import SMTPServer, make_config, write_config


def sendmail(workspace: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
             command: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the command as a caller would: the workspace from $ESS_DATA, the message on
    standard input."""
    base = command or [sys.executable, "-m", "ess_async", "sendmail"]
    environ = {**os.environ, "ESS_DATA": str(workspace), **(env or {})}
    environ.pop("ESS_ASYNC_SENDMAIL_TRANSPORT", None)
    return subprocess.run([*base, *args], input=stdin, capture_output=True, timeout=60,
                          env=environ)


def queued(workspace: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workspace / "queued").glob("*.json"))]


async def deliver(workspace: Path, server: SMTPServer) -> None:
    summary = await Manager(workspace, config=make_config(server.port)).process_workload()
    assert summary.failed == summary.deferred == 0


async def test_cron_invocation(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 13 part 3: cron's call (-FCronDaemon -i -odi -oem -oi -t -f root) with
    cronie's headers: unqualified root gets the configured domain, -i keeps a lone dot,
    the UTF-8 output is re-encoded in 7 bits, and the server gets it all."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    message = ("From: \"(Cron Daemon)\" <root>\nTo: root\n"
               "Subject: Cron <root@host> /usr/local/bin/backup\n"
               "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
               "Content-Transfer-Encoding: 8bit\nAuto-Submitted: auto-generated\n"
               "Precedence: bulk\nX-Cron-Env: <SHELL=/bin/sh>\n\n"
               "backup done: Grüße\n.\nlast line\n").encode()
    result = sendmail(ws, "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root",
                      stdin=message)
    assert (result.returncode, result.stderr) == (0, b"")
    await deliver(ws, smtp_server)
    (got,) = smtp_server.handler.messages
    assert got.mail_from == "root@example.com"
    assert got.rcpt_tos == ["root@example.com"]
    assert got.data.isascii()
    msg = got.message
    assert msg["To"] == "root@example.com"
    assert msg["From"].addresses[0].addr_spec == "root@example.com"
    assert msg["Subject"] == "Cron <root@host> /usr/local/bin/backup"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Date"] is not None and msg["Message-ID"].endswith("@example.com>")
    assert msg.get_content() == "backup done: Grüße\n.\nlast line\n"


async def test_php_mail_invocation(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 13 part 3: PHP's mail() (-t -i, LF line ends, its own From): recipients from
    To, Cc and Bcc; Bcc not in the sent copy; the envelope sender is [message] from."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    message = (b"To: a@example.com, \"Bee\" <b@example.com>\n"
               b"Subject: =?UTF-8?B?R3LDvMOfZQ==?=\n"
               b"From: webmaster@example.org\nCc: c@example.com\nBcc: hidden@example.com\n"
               b"MIME-Version: 1.0\nContent-type: text/html; charset=utf-8\n\n"
               b"<p>Hello</p>\n")
    result = sendmail(ws, "-t", "-i", stdin=message)
    assert (result.returncode, result.stderr) == (0, b"")
    await deliver(ws, smtp_server)
    (got,) = smtp_server.handler.messages
    assert got.mail_from == "sender@example.com"
    assert sorted(got.rcpt_tos) == ["a@example.com", "b@example.com", "c@example.com",
                                    "hidden@example.com"]
    assert b"hidden@example.com" not in got.data and b"Bcc" not in got.data
    msg = got.message
    assert msg["From"] == "webmaster@example.org"
    assert msg["Subject"] == "Grüße"
    assert msg.get_content() == "<p>Hello</p>\n"


async def test_git_send_email_invocation(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 13 part 3: git send-email style (-i -f a@b -- rcpt): the envelope is the
    command line; the message's own From, Date and Message-ID are kept byte for byte;
    dots and 'From ' lines in the body are text."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    message = (b"From: A U Thor <a@b>\nTo: list@example.com\nCc: other@example.com\n"
               b"Subject: [PATCH] fix\nDate: Mon, 30 Nov 2026 15:59:42 +0100\n"
               b"Message-ID: <20261130.1@b>\n\n"
               b"From the start\n.\n..dots\n-- \n2.43.0\n")
    result = sendmail(ws, "-i", "-f", "a@b", "--", "rcpt@example.com", stdin=message)
    assert (result.returncode, result.stderr) == (0, b"")
    await deliver(ws, smtp_server)
    (got,) = smtp_server.handler.messages
    assert (got.mail_from, got.rcpt_tos) == ("a@b", ["rcpt@example.com"])
    assert got.data == message.replace(b"\n", b"\r\n")  # nothing added, nothing changed


async def test_lone_dot_ends_input_without_i(tmp_path: Path, smtp_server: SMTPServer) -> None:
    """Issue 13 part 3: without -i a lone '.' line ends the message (the rest is
    ignored); with -i it is text; input without a trailing newline is complete; missing
    From (-F name, -f address), Date and Message-ID are added."""
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    body = b"Subject: dots\n\nfirst\n.\nignored"
    assert sendmail(ws, "-F", "Jo Bloggs", "-fjo@example.org", "x@example.com",
                    stdin=body).returncode == 0
    assert sendmail(ws, "-oi", "y@example.com", stdin=body).returncode == 0
    assert sendmail(ws, "z@example.com", stdin=b"no headers at all\n.").returncode == 0
    await deliver(ws, smtp_server)
    by_rcpt = {m.rcpt_tos[0]: m for m in smtp_server.handler.messages}
    first = by_rcpt["x@example.com"]
    assert first.mail_from == "jo@example.org"
    assert first.message.get_content() == "first\n"
    assert str(first.message["From"]) == "Jo Bloggs <jo@example.org>"
    assert first.message["Message-ID"].endswith("@example.org>")
    assert first.message["Date"] is not None
    second = by_rcpt["y@example.com"]
    assert second.mail_from == "sender@example.com"
    assert second.message.get_content() == "first\n.\nignored\n"
    assert second.data.endswith(b"ignored\r\n")
    assert str(second.message["From"]) == "sender@example.com"
    third = by_rcpt["z@example.com"]
    assert third.message.get_content() == "no headers at all\n"
    assert third.message["Subject"] is None and third.message["From"] is not None


def test_exit_codes(tmp_path: Path) -> None:
    """Issue 13 part 3: 64 usage, 65 bad message or no recipients, 73 spool not
    writable, 78 configuration error; one line on stderr each; nothing queued."""
    ws = tmp_path / "ws"
    write_config(ws, 25)
    ok = b"Subject: s\n\nbody\n"
    cases = [
        (("-Z", "a@example.com"), ok, 64, b"unknown option -Z"),
        (("-bs",), ok, 64, b"-bs is not supported"),
        (("a@example.com", "-f"), ok, 64, b"option -f needs a value"),
        (("-q1h",), ok, 64, b"-q is not supported"),
        ((), ok, 65, b"no recipients"),
        (("-t",), ok, 65, b"no recipients"),
        (("-t",), b"To: bad@@example.com\n\nx\n", 65, b"malformed address"),
        (("a@example.com",), b"Subject: \xff\xfe\n\nx\n", 65, b"not UTF-8"),
        (("a@example.com",), b"Subject: x\nDate: yesterday\n\nx\n", 65, b"Date"),
        (("-f", "<>", "a@example.com"), ok, 64, b"null sender"),
    ]
    for args, stdin, code, text in cases:
        result = sendmail(ws, *args, stdin=stdin)
        assert result.returncode == code, (args, result.stderr)
        assert text in result.stderr, (args, result.stderr)
        assert result.stderr.count(b"\n") == 1, result.stderr
        assert result.stderr.startswith(b"ess-async sendmail: ")
    assert not (ws / "queued").exists() or queued(ws) == []

    (ws / "config.toml").write_text("[server]\nspwan = 3\n")
    result = sendmail(ws, "a@example.com", stdin=ok)
    assert result.returncode == 78 and b"server.spwan" in result.stderr
    assert result.stderr.count(b"\n") == 1

    blocked = tmp_path / "blocked"
    write_config(blocked, 25)
    (blocked / "tmp").write_text("a file where the spool wants a folder")
    result = sendmail(blocked, "a@example.com", stdin=ok)
    assert result.returncode == 73 and b"cannot queue" in result.stderr
    assert result.stderr.count(b"\n") == 1

    result = sendmail(ws, "a@example.com", stdin=ok,
                      env={"ESS_ASYNC_SENDMAIL_TRANSPORT": "1"}, command=[
                          sys.executable, "-c", "import os, sys; os.environ["
                          "'ESS_ASYNC_SENDMAIL_TRANSPORT']='1'; from ess_async.cli import "
                          "main; sys.exit(main(['sendmail', *sys.argv[1:]]))"])
    assert result.returncode == 78 and b"mail loop" in result.stderr


def test_temporary_failure_is_75(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13 part 3: a spool write that fails for a passing reason (disk full) exits
    75 (EX_TEMPFAIL), so the caller keeps the message and tries again."""
    from ess_async.client import Client

    def full(*args: object, **kwargs: object) -> Path:
        raise SpoolError(errno.ENOSPC, "cannot write: No space left on device")

    monkeypatch.setattr(Client, "create_work", full)
    code = sendmail_module.main(["--workspace", str(tmp_path / "ws"), "a@example.com"],
                                prog="ess-sendmail", stdin=io.BytesIO(b"Subject: s\n\nb\n"))
    assert code == 75
    err = capsys.readouterr().err
    assert err.startswith("ess-sendmail: cannot queue") and err.count("\n") == 1


def test_bp_lists_the_queue_and_help(tmp_path: Path) -> None:
    """Issue 13 part 3: -bp lists the queue like `list`; `ess-async --help` lists the
    sendmail command."""
    ws = tmp_path / "ws"
    write_config(ws, 25)
    assert sendmail(ws, "a@example.com", stdin=b"Subject: listed\n\nx\n").returncode == 0
    result = sendmail(ws, "-bp")
    assert result.returncode == 0
    (record,) = queued(ws)
    assert record["id"].encode() in result.stdout and b"subject: listed" in result.stdout
    help_text = subprocess.run([sys.executable, "-m", "ess_async", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "sendmail" in help_text


def test_ess_sendmail_console_script(tmp_path: Path) -> None:
    """Issue 13 part 3: the ess-sendmail console script (when installed beside this
    Python) queues like `ess-async sendmail`."""
    script = shutil.which("ess-sendmail", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("ess-sendmail is not installed in this environment")
    ws = tmp_path / "ws"
    write_config(ws, 25)
    result = sendmail(ws, "-t", "-i", stdin=b"To: a@example.com\nSubject: s\n\nb\n",
                      command=[script])
    assert (result.returncode, result.stderr) == (0, b"")
    (record,) = queued(ws)
    assert record["recipients"] == ["a@example.com"]
    bad = sendmail(ws, "-Z", command=[script])
    assert bad.returncode == 64 and bad.stderr.startswith(b"ess-sendmail: ")


@pytest.mark.parametrize(("argv", "expected"), [
    (["-ti"], Options(extract=True, ignore_dots=True)),
    (["-fme@example.com", "-FJo Bloggs"], Options(sender="me@example.com",
                                                  full_name="Jo Bloggs")),
    (["-r", "me@example.com", "a@example.com"], Options(sender="me@example.com",
                                                       recipients=["a@example.com"])),
    (["a@example.com", "-t", "-oi"], Options(extract=True, ignore_dots=True,
                                             recipients=["a@example.com"])),
    (["-odi", "-oem", "-oQ/var/spool", "-h", "5", "-B8BITMIME", "-L", "tag", "-Oa=b",
      "-X/tmp/log", "-G", "-U", "-v", "-n", "-m", "-bm", "-Ndelay", "-Rhdrs", "-Vid",
      "-pSMTP:h", "-ep", "-Ac"], Options()),
    (["-i", "--", "-x@example.com", "-t"], Options(ignore_dots=True,
                                                   recipients=["-x@example.com", "-t"])),
    (["--workspace=/w", "-bp"], Options(mode="p", workspace=Path("/w"))),
])
def test_option_parsing(argv: list[str], expected: Options) -> None:
    """Issue 13 part 3: getopt-style options as sendmail takes them: clusters, attached
    and separate values, options after recipients, '--', the ignored ones."""
    assert parse_options(argv) == expected


@pytest.mark.parametrize("argv", [["-C/etc/mail.cf"], ["-bi"], ["--verbose"], ["-f"]])
def test_option_errors(argv: list[str]) -> None:
    """Issue 13 part 3: what sendmail's peers would not do here is a usage error."""
    with pytest.raises(UsageError):
        parse_options(argv)


@pytest.mark.parametrize(("data", "ignore", "expected"), [
    (b"a\n.\nb\n", False, b"a\r\n"),
    (b"a\n.", False, b"a\r\n"),
    (b".\nb\n", False, b""),
    (b"a\n..\nb", False, b"a\r\n..\r\nb\r\n"),
    (b"a\n.\nb", True, b"a\r\n.\r\nb\r\n"),
    (b"a\r\n.\r\nb\r\n", False, b"a\r\n"),
])
def test_read_input_dots(data: bytes, ignore: bool, expected: bytes) -> None:
    """Issue 13 part 3: a lone dot ends the input unless -i; CRLF line ends; a final
    line without a newline is kept."""
    assert read_input(io.BytesIO(data), ignore_dots=ignore) == expected
