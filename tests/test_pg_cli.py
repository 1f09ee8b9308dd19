"""Issue 12 part 3: the CLI against the PostgreSQL store (`--store URL` after the command
name, `$ESS_STORE_URL`, `[store] url`), run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import SMTPServer, cli_env, write_config

FILE_STATUS_KEYS = {"queued", "scheduled", "active", "deferred", "held", "passed", "failed",
                    "corrupt", "total", "server_pid", "oldest_queued_age", "last_error"}


def ess(ws: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run([sys.executable, "-m", "ess_async", command, "--workspace", str(ws),
                           *rest], capture_output=True, text=True, timeout=60,
                          env=env or cli_env(), cwd=ws.parent)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def test_every_command_works_on_the_store(tmp_path: Path, smtp_server: SMTPServer,
                                          pg_url: str) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    store = ("--store", pg_url)
    assert "at version 1 (was 0)" in ok(ess(ws, "db", "migrate", *store))
    assert "up to date" in ok(ess(ws, "db", "migrate", *store))
    ids = [ok(ess(ws, "email", *store, "--to", f"r{i}@example.com", "--subject", f"s{i}",
                  "--body", "hi")).strip() for i in range(3)]
    assert all(len(i) == 30 for i in ids)
    status = json.loads(ok(ess(ws, "status", *store, "--json")))
    assert set(status) >= FILE_STATUS_KEYS and status["store"] == "postgres"
    assert status["queued"] == status["total"] == 3
    listed = json.loads(ok(ess(ws, "list", *store, "--json")))
    assert [m["id"] for m in listed] == ids  # oldest first
    assert "held" in ok(ess(ws, "hold", *store, ids[0]))
    assert json.loads(ok(ess(ws, "show", *store, ids[0])))["state"] == "held"
    assert ok(ess(ws, "release", *store, ids[0])).split() == [ids[0], "queued"]
    assert "was queued" in ok(ess(ws, "delete", *store, ids[2]))
    assert "passed 2" in ok(ess(ws, "process", *store))
    assert sorted(smtp_server.handler.subjects()) == ["s0", "s1"]
    shown = json.loads(ok(ess(ws, "show", *store, ids[1])))
    assert shown["state"] == "passed" and "raw" not in shown and shown["raw_size"] > 0
    assert "purged 2 passed" in ok(ess(ws, "purge", *store, "--state", "passed",
                                       "--older-than", "0s"))
    assert json.loads(ok(ess(ws, "status", *store, "--json")))["total"] == 0


def test_the_url_comes_from_the_environment_or_the_config(tmp_path: Path,
                                                          smtp_server: SMTPServer,
                                                          pg_url: str) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    ok(ess(ws, "db", "migrate", env=cli_env(ESS_STORE_URL=pg_url)))
    ok(ess(ws, "email", "--to", "r@example.com", "--body", "x",
           env=cli_env(ESS_STORE_URL=pg_url)))
    write_config(ws, smtp_server.port, f'\n[store]\nurl = "{pg_url}"\n')
    assert json.loads(ok(ess(ws, "status", "--json")))["queued"] == 1
    assert not (ws / "queued").exists()  # nothing went to the spool folders


def test_clear_errors(tmp_path: Path, smtp_server: SMTPServer, pg_url: str) -> None:
    ws = tmp_path / "ws"
    write_config(ws, smtp_server.port)
    result = ess(ws, "db", "migrate")
    assert result.returncode == 2 and "no PostgreSQL store is configured" in result.stderr
    result = ess(ws, "status", "--store", "postgresql://ess:secret@127.0.0.1/mail")
    assert result.returncode == 2 and "--store" in result.stderr
    assert "secret" not in result.stderr + result.stdout
    result = ess(ws, "email", "--store", pg_url, "--to", "r@example.com", "--body", "x")
    assert result.returncode == 2 and "db migrate" in result.stderr
    ok(ess(ws, "db", "migrate", "--store", pg_url))
    result = ess(ws, "stop", "--store", pg_url)
    assert result.returncode == 2 and "SIGTERM" in result.stderr
    result = ess(ws, "hold", "--store", pg_url, "00000000000000000001-n00000000")
    assert result.returncode == 2 and "00000000000000000001-n00000000" in result.stderr


def test_purge_keep_from_the_cli_on_both_stores(tmp_path: Path, smtp_server: SMTPServer,
                                                 pg_url: str) -> None:
    for name, store in (("files", ()), ("pg", ("--store", pg_url))):
        ws = tmp_path / name
        write_config(ws, smtp_server.port)
        if store:
            ok(ess(ws, "db", "migrate", *store))
        for i in range(4):
            ok(ess(ws, "email", *store, "--to", "r@example.com", "--subject", f"k{i}",
                   "--body", "x"))
        assert "passed 4" in ok(ess(ws, "process", *store))
        assert "purged 3 passed" in ok(ess(ws, "purge", *store, "--state", "passed",
                                           "--keep", "1"))
        result = ess(ws, "purge", *store, "--state", "passed")
        assert result.returncode == 2 and "older_than, keep" in result.stderr
