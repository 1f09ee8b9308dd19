"""A throwaway PostgreSQL cluster for the tests and benchmarks, from the installed server
binaries (Debian's ``postgresql`` package), on 127.0.0.1 and a private socket folder.

``initdb`` refuses to run as root: as root the cluster's folder belongs to the
``postgres`` user and every server command runs as that user (``runuser``). Client
commands (``createdb``) connect over TCP with ``trust`` and run as whoever we are.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ("PgServer", "pg_available", "pg_bindir")

_NEEDED = ("initdb", "pg_ctl", "postgres", "createdb")
_SOCKET_MAX = 100  # sun_path is 108 bytes; "<dir>/.s.PGSQL.<port>" must fit


def _version_key(bin_initdb: str) -> tuple[int, ...]:
    name = Path(bin_initdb).parent.parent.name  # /usr/lib/postgresql/<version>/bin/initdb
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (0,)


def pg_bindir() -> Path | None:
    """The server binaries' folder: ``pg_config --bindir`` if it has ``initdb``, else the
    newest ``/usr/lib/postgresql/*/bin``; None if there is neither."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    return Path(found[-1]).parent if found else None


def pg_available() -> str | None:
    """None if a cluster can be started here, else one line saying why not."""
    bindir = pg_bindir()
    if bindir is None:
        return "no PostgreSQL server binaries (apt-get install postgresql)"
    missing = [name for name in _NEEDED if not (bindir / name).exists()]
    if missing:
        return f"{bindir} lacks {', '.join(missing)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to run initdb as postgres"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install 'ess_async[postgres]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables (PGHOST, PGSSLMODE, PGOPTIONS...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _others_can_enter(path: Path) -> bool:
    """Every folder from / to ``path`` lets other users through (the postgres user must
    reach its cluster's folder)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return False
    return True


def _base_dir(as_postgres: bool) -> str | None:
    """Where the cluster's temp folder goes: the usual temp dir unless the socket path
    would be too long or (as root) the postgres user could not reach it; then /tmp."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) + len("/ess_pg_XXXXXXXX/.s.PGSQL.65535") > _SOCKET_MAX or (
            as_postgres and not _others_can_enter(base)):
        return "/tmp"
    return None


class PgServer:
    """``PgServer().start()`` (or ``with PgServer() as pg``), then ``url(db)`` and
    ``create_database(name)``; ``stop()`` kills the server and removes its folder.

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

    # -- commands --

    def _run(self, *argv: str, as_server: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one of the bindir's programs; server programs as postgres when root."""
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if as_server and self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                cwd="/", env=_clean_env())
        if result.returncode != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise RuntimeError(f"{argv[0]} failed: {' | '.join(detail[-3:])}")
        return result

    def _log_tail(self, since: int = 0) -> str:
        if self.dir is None:
            return ""
        try:
            with open(self.dir / "log", "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- lifecycle --

    def start(self) -> PgServer:
        """initdb and start the server (``pg_ctl -w``: it accepts connections on return).
        On failure nothing is left behind and RuntimeError says why (with the log)."""
        if self.dir is not None:
            raise RuntimeError("PgServer already started")
        self.dir = Path(tempfile.mkdtemp(prefix="ess_pg_", dir=_base_dir(self._as_postgres)))
        atexit.register(self.stop)  # a session that dies between start and stop
        try:
            if self._as_postgres:
                user = pwd.getpwnam("postgres")
                os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--locale=C", "--no-sync", "-D", str(self.dir / "data"))
            for _ in range(5):
                if self._start_on(_free_port()):
                    return self
            raise RuntimeError("pg_ctl start: no free port after 5 attempts")
        except BaseException:
            self.stop()
            raise

    def _start_on(self, port: int) -> bool:
        """Start on ``port``: True once up, False if the port was taken meanwhile (the
        free port was only free when we looked), RuntimeError on any other failure."""
        assert self.dir is not None
        self.port = port
        options = (f"-p {port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300 -c shared_buffers=64MB")
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log_size = len(self._log_tail())
        try:
            self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.dir / "data"),
                      "-l", str(self.dir / "log"), "-o", options, "start")
        except RuntimeError as exc:
            log = self._log_tail(log_size)
            if "already in use" in log:
                return False
            lines = " | ".join(log.strip().splitlines()[-5:])
            raise RuntimeError(f"{exc}; server log: {lines}") from None
        return True

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``) and remove its folder; idempotent."""
        atexit.unregister(self.stop)
        if self.dir is None:
            return
        if (self.dir / "data" / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w",
                          "stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- databases --

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DBNAME`` (trust: no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (from template1) and return its URL."""
        if self.dir is None:
            raise RuntimeError("PgServer not started")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  name, as_server=False, timeout=60)
        return self.url(name)
