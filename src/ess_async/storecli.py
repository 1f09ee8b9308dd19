"""The CLI's queue commands (list, show, retry, hold, release, delete, purge) run on the
``Store`` API, for either store; and the PostgreSQL store's own commands (``status``,
``cleanup``, ``db migrate``) when a store URL is set (``--store URL``, ``$ESS_STORE_URL``
or ``[store] url``)."""

from __future__ import annotations

import argparse
import json
import time

from .config import Config
from .errors import EssError
from .ops import parse_duration
from .outcome import message_id
from .store import Store
from .store.postgres import PostgresStore, masked_url

__all__ = ("run_queue_command", "run_store_command", "store_for")

# Commands that need no store at all, or that only the file store has.
FILE_ONLY = {"stop": "stop a PostgreSQL deliverer with SIGTERM (it stops gracefully)"}


def store_for(url: str, config: Config) -> PostgresStore:
    return PostgresStore.from_config(url, config.store, pool_size=4)  # one command: few


async def run_store_command(args: argparse.Namespace, url: str, config: Config) -> int:
    """Run ``args.command`` against the PostgreSQL store at ``url``; the exit status."""

    if args.command in FILE_ONLY:
        raise EssError(f"{args.command}: not for the PostgreSQL store: "
                       f"{FILE_ONLY[args.command]}")
    store = store_for(url, config)
    try:
        if args.command == "db":
            before, after = await store.migrate()
            print(f"schema {config.store.schema!r} at version {after} "
                  f"({'up to date' if before == after else f'was {before}'}) "
                  f"in {masked_url(url)}")
            return 0
        await store.open()
        if args.command == "status":
            counts = await store.counts()
            counts["total"] = sum(counts.values())
            if args.json:
                print(json.dumps({**counts, "server_pid": None, "oldest_queued_age": None,
                                  "last_error": None, "store": "postgres"}))
            else:
                for state, n in counts.items():
                    print(f"{state:>9}  {n}")
                print(f"    store  {masked_url(url)}")
            return 0
        return await run_queue_command(store, args)
    finally:
        await store.close()


async def run_queue_command(store: Store, args: argparse.Namespace) -> int:
    """A queue command on ``store`` (the file store's or PostgreSQL's): same output."""
    from . import cli  # the listing's layout, shared

    command = args.command
    if command == "list":
        infos = await store.list(args.states, args.limit)
        if args.json:
            import dataclasses

            print(json.dumps([dataclasses.asdict(i) for i in infos], ensure_ascii=False))
        else:
            cli._print_infos(infos, time.time())
    elif command == "show":
        print(json.dumps(await store.show(args.id, raw=args.raw), indent=2,
                         ensure_ascii=False))
    elif command == "retry" and args.all:
        print(f"retried {await store.retry_all()} message(s)")
    elif command == "retry":
        print(f"{message_id(await store.retry(args.id))} queued")
    elif command == "hold":
        print(f"{message_id(await store.hold(args.id))} held")
    elif command == "release":
        ref = await store.release(args.id)
        state, _ = await store.find(ref)
        print(f"{message_id(ref)} {state}")
    elif command == "delete":
        print(f"{args.id} deleted (was {await store.delete(args.id)})")
    elif command == "purge":
        older = None if args.older_than is None else parse_duration(args.older_than)
        count = await store.purge(args.state, older, keep=args.keep)
        print(f"purged {count} {args.state} message(s)")
    elif command == "cleanup" and isinstance(store, PostgresStore):
        from .manager import Manager

        print(json.dumps(await Manager(args.workspace, store=store.url).cleanup()))
    else:
        raise EssError(f"{command}: not supported with the {store.kind} store")
    return 0

