"""Command line: ``python -m ess_async COMMAND [--workspace DIR] ...`` (also ``ess-async``).

Only this module configures logging. Errors print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .client import Client
from .config import load_config, parse_config, parse_listen
from .delivery import WorkloadSummary
from .errors import EssError, MessageError
from .lock import lock_holder
from .manager import Manager, default_workspace, store_url
from .metrics import oldest_queued, read_last_error
from .ops import PURGEABLE, MessageInfo
from .spool import STATES

__all__ = ("cli", "main")

logger = logging.getLogger("ess_async.cli")


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", type=Path, default=None,
                   help="spool folder (default: $ESS_DATA, else ./ess_data)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="postgresql://user@host:port/db: the PostgreSQL store "
                        "(default: $ESS_STORE_URL, else [store] url, else the spool folder)")


_LOOPS = ("auto", "asyncio", "uvloop")


def _add_loop(p: argparse.ArgumentParser) -> None:
    # Checked in main (not with choices): a bad value is one line on stderr, exit 2.
    p.add_argument("--loop", default="auto", metavar="{auto,asyncio,uvloop}",
                   help="event loop: uvloop if installed (auto, the default), or asyncio")


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``--loop``: None for asyncio's own. ``auto`` is uvloop when it
    is installed (``pip install 'ess_async[speed]'``); ``uvloop`` requires it."""
    if name not in _LOOPS:
        raise _UsageError(f"--loop: unknown event loop {name!r} (auto, asyncio or uvloop)")
    if name == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if name == "uvloop":
            raise _UsageError("--loop uvloop: uvloop is not installed "
                              "(pip install 'ess_async[speed]')") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class _UsageError(ValueError):
    pass


def _run_with_loop(args: argparse.Namespace,
                   runner: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    factory = _loop_factory(getattr(args, "loop", "asyncio"))
    with asyncio.Runner(loop_factory=factory) as loop_runner:
        logger.debug("event loop: %s", type(loop_runner.get_loop()).__module__)
        return loop_runner.run(runner(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ess-async",
                                     description="A durable asyncio email outbox.")
    parser.add_argument("--log-level", default=os.environ.get("ESS_LOG_LEVEL"), type=str.upper,
                        choices=_LEVELS,
                        help="logging level (default INFO, or $ESS_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="deliver until SIGTERM/SIGINT")
    _add_workspace(p)
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus /metrics and /healthz there ([server] metrics)")
    p.add_argument("--spawn", type=int, default=None, help="concurrent senders")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="deliver through N worker processes, each with --spawn senders "
                        "(default: this process delivers)")
    _add_loop(p)

    p = sub.add_parser("process", help="deliver what is due now, then exit")
    _add_workspace(p)
    p.add_argument("--spawn", type=int, default=None, help="concurrent senders")
    _add_loop(p)

    p = sub.add_parser("email", help="queue one message")
    _add_workspace(p)
    p.add_argument("--to", action="append", default=[], help="recipient (repeatable)")
    p.add_argument("--cc", action="append", default=[])
    p.add_argument("--bcc", action="append", default=[])
    p.add_argument("--from", dest="from_", default=None)
    p.add_argument("--reply-to", dest="reply_to", default=None)
    p.add_argument("--subject", default="")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", default=None, help="text body")
    body.add_argument("--body-file", type=Path, default=None, help="text body file, - for stdin")
    p.add_argument("--html-file", type=Path, default=None)
    p.add_argument("--attach", action="append", default=[], type=Path, help="file to attach")
    p.add_argument("--tag", action="append", default=[], dest="tags")

    p = sub.add_parser("testmail", help="queue N test messages")
    _add_workspace(p)
    p.add_argument("-n", type=int, default=1)
    p.add_argument("--to", action="append", default=[], required=True)
    p.add_argument("--from", dest="from_", default=None)

    p = sub.add_parser("status", help="messages per state")
    _add_workspace(p)
    p.add_argument("--json", action="store_true")

    for name, text in (("cleanup", "requeue messages left claimed by a crash"),
                       ("config", "write a commented config.toml unless one exists"),
                       ("stop", "ask the server delivering this workspace to stop, and wait")):
        _add_workspace(sub.add_parser(name, help=text))

    p = sub.add_parser("demo", help="queue and deliver messages to a built-in local sink")
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--spawn", type=int, default=3)

    p = sub.add_parser("db", help="the PostgreSQL store's schema: db migrate")
    p.add_argument("action", choices=("migrate",), help="create or upgrade the schema")
    _add_workspace(p)

    sub.add_parser("version", help="print the version")
    # Parsed by ess_async.sendmail (sendmail's getopt-style options); listed for --help.
    sub.add_parser("sendmail", add_help=False,
                   help="queue a message read on stdin, as sendmail does "
                        "(-t, -i, -f ADDR, -F NAME, -bp; see ess-sendmail --help)")
    _add_queue_commands(sub)
    _add_suppress_command(sub)
    return parser


def parseargs(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _workspace(args: argparse.Namespace) -> Path:
    return Path(args.workspace).absolute() if args.workspace else default_workspace()


def _read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    return path.read_text(encoding="utf-8")


def _cmd_email(args: argparse.Namespace) -> int:
    attrs: dict[str, Any] = {
        "to": args.to or None, "cc": args.cc or None, "bcc": args.bcc or None,
        "from_": args.from_, "reply_to": args.reply_to, "subject": args.subject,
        "tags": args.tags or None, "attachments": [str(a) for a in args.attach] or None,
    }
    attrs["body"] = args.body
    for field, path in (("body", args.body_file), ("html", args.html_file)):
        if path is not None:
            try:
                attrs[field] = _read_text(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise MessageError(field, f"cannot read {str(path)!r}: {exc}") from None
    with Client(_workspace(args), store=args.store) as client:
        print(client.create_work(**attrs))
    return 0


def _cmd_testmail(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise EssError("-n must be at least 1")
    with Client(_workspace(args), store=args.store) as client:
        for i in range(args.n):
            client.create_work(to=args.to, from_=args.from_, subject=f"ess_async test {i + 1}",
                               body=f"Test message {i + 1} of {args.n}.\n", tags=["testmail"])
    print(f"queued {args.n} test message(s)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    manager = Manager(workspace)
    counts = manager.status()
    counts["total"] = sum(counts.values())
    pid = lock_holder(workspace)
    oldest, _ = oldest_queued(manager.spool, time.time())
    last_error = read_last_error(workspace)
    if args.json:
        print(json.dumps({**counts, "server_pid": pid, "oldest_queued_age": oldest,
                          "last_error": last_error}))
    else:
        for state, n in counts.items():
            print(f"{state:>9}  {n}")
        print(f"   server  {'pid ' + str(pid) if pid else 'not running'}")
        if oldest is not None:
            print(f"   oldest  {_age(oldest)} in queued/")
        if last_error:
            print(f"last error {_age(time.time() - last_error.get('at', 0))} ago: "
                  f"{last_error.get('code') or ''} {last_error.get('message')}".rstrip())
    return 0


def _cmd_stop(args: argparse.Namespace, *, timeout: float = 60.0) -> int:
    workspace = _workspace(args)
    pid = lock_holder(workspace)
    if pid is None:
        print("no server is running", file=sys.stderr)
        return 1
    if pid > 0:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while lock_holder(workspace) is not None:
        if time.monotonic() > deadline:
            raise EssError(f"server pid {pid} did not stop within {timeout:.0f}s")
        time.sleep(0.05)
    print("stopped")
    return 0


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() and total > 0

    def __call__(self, summary: WorkloadSummary) -> None:
        if self.enabled:
            done = summary.total
            width = 30
            filled = int(width * min(done, self.total) / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
                             f"  passed {summary.passed} failed {summary.failed}"
                             f" deferred {summary.deferred}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _print_summary(summary: WorkloadSummary) -> None:
    print(f"passed {summary.passed}, failed {summary.failed}, deferred {summary.deferred}, "
          f"corrupt {summary.corrupt}")


async def _process(args: argparse.Namespace) -> int:
    manager = Manager(_workspace(args), spawn=args.spawn, store=args.store)
    progress = _Progress(manager.spool.count("queued"))
    # SIGTERM/SIGINT (and so `stop`) end the pass gracefully: in-flight sends finish.
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.add(asyncio.ensure_future(
            manager.stop())))
    try:
        summary = await manager.process_workload(progress=progress)
    finally:
        progress.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    _print_summary(summary)
    return 0


async def _serve(args: argparse.Namespace) -> int:
    manager = Manager(_workspace(args), spawn=args.spawn, store=args.store,
                      processes=args.processes)
    if args.metrics is not None:
        parse_listen(args.metrics)  # a bad value: one line, exit 2
        manager.metrics_listen = args.metrics
    summary = await manager.delegate_workload()
    logger.info("stopped: passed %d, failed %d, deferred %d", summary.passed, summary.failed,
                summary.deferred)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from .devsink import DevSink

    async with DevSink() as sink:
        with tempfile.TemporaryDirectory(prefix="ess_demo_") as tmp:
            config = parse_config({"message": {"from": "demo@example.com"},
                                   "transport": {"smtp": {"port": sink.port}}})
            manager = Manager(Path(tmp) / "ess_data", spawn=args.spawn, config=config)
            start = time.perf_counter()
            for i in range(args.n):
                await manager.create_work(to=f"user{i}@example.com", subject=f"demo {i}",
                                          body="Hello from ess_async.\n")
            queued = time.perf_counter()
            summary = await manager.process_workload()
            done = time.perf_counter()
            print(f"queued {args.n} messages in {queued - start:.3f}s; delivered to a local "
                  f"SMTP sink on 127.0.0.1:{sink.port} in {done - queued:.3f}s")
            _print_summary(summary)
            print(f"sink received {sink.count}; spool status: {manager.status()}")
            return 0 if sink.count == args.n == summary.passed else 1

# -- queue operations (mailq / postsuper) -----------------------------------------------

_QUEUE_COMMANDS = ("list", "show", "retry", "hold", "release", "delete", "purge")


def _add_queue_commands(sub: Any) -> None:
    p = sub.add_parser("list", help="list messages, oldest first (like mailq)")
    _add_workspace(p)
    p.add_argument("--state", action="append", dest="states", choices=STATES, default=None,
                   help="only this state (repeatable; default: all)")
    p.add_argument("--limit", type=int, default=None, help="at most N messages")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="print a message's record as JSON")
    _add_workspace(p)
    p.add_argument("id", help="message id (or its spool path)")
    p.add_argument("--raw", action="store_true", help="include the message text")

    p = sub.add_parser("retry", help="send a deferred or failed message again now")
    _add_workspace(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", default=None, help="message id (or its spool path)")
    which.add_argument("--all", action="store_true", help="every deferred and failed message")

    for name, text in (("hold", "keep a queued, scheduled or deferred message from being sent"),
                       ("release", "send a held message (or reschedule it) again"),
                       ("delete", "remove a message (not while it is being sent)")):
        p = sub.add_parser(name, help=text)
        _add_workspace(p)
        p.add_argument("id", help="message id (or its spool path)")

    p = sub.add_parser("purge", help="delete old passed, failed or corrupt messages "
                       "(--older-than and/or --keep)")
    _add_workspace(p)
    p.add_argument("--state", required=True, choices=PURGEABLE)
    p.add_argument("--older-than", default=None, dest="older_than",
                   help="finished more than this long ago: 30s, 10m, 12h, 7d")
    p.add_argument("--keep", type=int, default=0,
                   help="and all but the newest N (passed or failed)")


def _age(seconds: float) -> str:
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _print_infos(infos: list[MessageInfo], now: float) -> None:
    if not infos:
        print("no messages")
        return
    print(f"{'ID':<30} {'STATE':<9} {'AGE':>5} {'TRIES':>5}  {'PRI':<6} RECIPIENTS / SUBJECT")
    for info in infos:
        rcpts = ", ".join(info.recipients[:3]) + (
            f" (+{len(info.recipients) - 3})" if len(info.recipients) > 3 else "")
        print(f"{info.id:<30} {info.state:<9} {_age(info.age):>5} {info.attempts:>5}  "
              f"{info.priority:<6} {rcpts}")
        if info.subject:
            print(f"{'':<60}subject: {info.subject}")
        if info.last_error:
            print(f"{'':<60}last error: {info.last_error}")
        if info.next_attempt_at is not None and info.state in ("deferred", "scheduled"):
            print(f"{'':<60}next attempt in {_age(info.next_attempt_at - now)}")
    print(f"-- {len(infos)} message(s)")


def _cmd_queue(args: argparse.Namespace) -> int:
    from .store.file import FileStore
    from .storecli import run_queue_command

    return asyncio.run(run_queue_command(FileStore(_workspace(args)), args))

def _add_suppress_command(sub: Any) -> None:
    p = sub.add_parser("suppress", help="the suppression list: list, add, remove, check")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("list", help="every listed address")
    _add_workspace(q)
    q.add_argument("--json", action="store_true")
    q = actions.add_parser("add", help="list an address (a bounce, a complaint)")
    _add_workspace(q)
    q.add_argument("address")
    q.add_argument("--reason", default="manual")
    for name, text in (("remove", "take an address off the list (exit 1 if not listed)"),
                       ("check", "exit 0 if the address is listed, 1 if not")):
        q = actions.add_parser(name, help=text)
        _add_workspace(q)
        q.add_argument("address")


def _cmd_suppress(args: argparse.Namespace) -> int:
    from .config import load_config
    from .suppression import SuppressionList

    workspace = _workspace(args)
    config = load_config(workspace / "config.toml")
    suppression = SuppressionList(workspace, ttl_days=config.suppression.ttl_days)
    if args.action == "list":
        entries = suppression.entries()
        if args.json:
            print(json.dumps(entries, ensure_ascii=False))
        for entry in [] if args.json else entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["at"]))
            detail = f"{entry.get('code')} {entry.get('reply')}" if entry.get("code") else ""
            print(f"{entry['address']}  {when}  {entry.get('reason', '')}  {detail}".rstrip())
        return 0
    if args.action == "add":
        added = suppression.add(args.address, reason=args.reason)
        print(f"suppressed {added['address']}")
        return 0
    if args.action == "remove":
        removed = suppression.remove(args.address)
        print(f"{'removed' if removed else 'not listed:'} {args.address}")
        return 0 if removed else 1
    found = suppression.get(args.address)
    if found is None:
        print(f"not listed: {args.address}")
        return 1
    print(f"listed: {found['address']} ({found.get('reason', '')})")
    return 0


# Commands run on the PostgreSQL store's API when a store URL is set (serve, process,
# email and testmail take it through Manager and Client).
_STORE_COMMANDS = {"status", "stop", "cleanup", "db", *_QUEUE_COMMANDS}


def _store_url(args: argparse.Namespace) -> str:
    if not hasattr(args, "workspace"):
        return ""
    return store_url(getattr(args, "store", None),
                     load_config(_workspace(args) / "config.toml"))


def cli(*argv: str) -> int:
    """Run a command as the console script would; returns the exit status."""
    return main(list(argv))


def _sendmail_argv(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``sendmail`` when that is the command (after any
    ``--log-level``), else None: sendmail's options are not argparse's."""
    i = 0
    while i < len(argv) and argv[i].startswith("--log-level"):
        i += 1 if "=" in argv[i] else 2
    if i < len(argv) and argv[i] == "sendmail":
        return list(argv[i + 1:])
    return None


def main(argv: Sequence[str] | None = None) -> int:
    sendmail_argv = _sendmail_argv(sys.argv[1:] if argv is None else argv)
    if sendmail_argv is not None:
        from . import sendmail

        return sendmail.main(sendmail_argv, prog="ess-async sendmail")
    args = parseargs(argv)
    # The demo prints its own summary; everything else logs each event at INFO.
    level = args.log_level or ("WARNING" if args.command == "demo" else "INFO")
    if level not in _LEVELS:  # from $ESS_LOG_LEVEL, which argparse does not check
        print(f"ess-async: error: ESS_LOG_LEVEL: unknown level {level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "version":
            print(__version__)
            return 0
        url = _store_url(args)
        if url and args.command in _STORE_COMMANDS:
            from .storecli import run_store_command

            config = load_config(_workspace(args) / "config.toml")
            return asyncio.run(run_store_command(args, url, config))
        if args.command == "db":
            raise EssError("db migrate: no PostgreSQL store is configured (--store URL, "
                           "$ESS_STORE_URL or [store] url)")
        if args.command == "email":
            return _cmd_email(args)
        if args.command == "testmail":
            return _cmd_testmail(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "suppress":
            return _cmd_suppress(args)
        if args.command == "stop":
            return _cmd_stop(args)
        if args.command in _QUEUE_COMMANDS:
            return _cmd_queue(args)
        if args.command == "config":
            print(Manager(_workspace(args)).create_config())
            return 0
        if args.command == "cleanup":
            print(json.dumps(asyncio.run(Manager(_workspace(args)).cleanup())))
            return 0
        runner = {"serve": _serve, "process": _process, "demo": _demo}[args.command]
        return _run_with_loop(args, runner)
    except (EssError, ValueError, OSError) as exc:
        print(f"ess-async {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
