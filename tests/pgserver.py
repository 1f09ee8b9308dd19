"""A throwaway PostgreSQL cluster for the tests and benchmarks, from the installed server
binaries (Debian's ``postgresql`` package), on 127.0.0.1 and a private socket folder.

``initdb`` refuses to run as root: as root the cluster's folder belongs to the
``postgres`` user and every server command runs as that user (``runuser``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ("PgServer", "pg_available", "pg_bindir")


def pg_bindir() -> Path | None:
    """The server binaries' folder, or None."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def pg_available() -> str | None:
    """None if a cluster can be started here, else one line saying why not."""
    if pg_bindir() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install 'ess_async[postgres]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """``PgServer().start()``, then ``url(db)``; ``stop()`` removes everything.

    ``durable=False`` (tests) turns fsync off; benchmarks keep it on."""

    def __init__(self, *, durable: bool = False) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries")
        self.bindir = bindir
        self.durable = durable
        self.port = 0
        self.dir: Path | None = None
        self._as_postgres = os.geteuid() == 0

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                cwd="/")
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip() or result.stdout}")
        return result

    def start(self) -> PgServer:
        self.dir = Path(tempfile.mkdtemp(prefix="ess_pg_"))
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        data = self.dir / "data"
        self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
                  "-D", str(data))
        self.port = _free_port()
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300 -c shared_buffers=64MB")
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(data), "-l", str(self.dir / "log"),
                  "-o", options, "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop",
                      timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
