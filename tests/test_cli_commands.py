"""The demo on a machine with no mail server, and ``cli()`` called in-process.
(Every other command is covered through subprocesses in test_cli.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ess_async import __version__
from ess_async.cli import cli


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ess_async", *args], capture_output=True,
                          text=True, input=stdin, timeout=120,
                          env={**os.environ, **(env or {})})


def test_demo_needs_no_mail_server() -> None:
    result = run("--log-level", "WARNING", "demo", "-n", "25")
    assert result.returncode == 0, result.stderr
    assert "sink received 25" in result.stdout


def test_cli_callable_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("version") == 0
    assert capsys.readouterr().out.strip() == __version__
    assert cli("testmail", "-n", "0", "--to", "a@example.com", "--workspace",
               str(tmp_path)) == 2
