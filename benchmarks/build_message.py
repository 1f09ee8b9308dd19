"""CPU per ``build_message`` on the fast path (``fastbuild``) and the standard library's
``email`` path, per message shape, and the effect on durable enqueue (issue 11 item 3).

    python benchmarks/build_message.py [-n 2000] [--enqueue 3000] [--dir ./.bench_tmp]

"build" is CPU time (``time.process_time``) per call of ``build_message`` (validation,
headers and MIME), best of 5 rounds of n calls; "mime" the MIME part alone (what the fast
path replaces). Enqueue: ``await Manager.create_work`` from 50 concurrent tasks and sync
``Client.create_work`` from one thread, each with the fast path on and off (off: the
module's ``fast_mime`` answers None, so every message takes the standard library's path),
messages/s and process CPU per message, alternating off/on twice.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ess_async import Client, Manager
from ess_async import message as message_module
from ess_async.config import parse_config
from ess_async.fastbuild import fast_mime
from ess_async.htmltext import html_to_text
from ess_async.message import _attachment, build_message

BODY = "".join(f"{line}\n" for line in textwrap.wrap(
    "The quick brown fox jumps over the lazy dog. " * 45, 72))[:2000] + "\n"
UNICODE = "Grüße aus Köln, schöne Tage! Ça va? 你好，世界。 😀\n" * 30  # noqa: RUF001
HTML = "".join(f"<p>{line}</p>\n" for line in BODY.splitlines())
ATTACHMENT = ("report.pdf", bytes(range(256)) * 40, "application/pdf")  # 10 KB
SHAPES: dict[str, dict[str, Any]] = {
    "text 2 KB (as run.py)": {"body": BODY},
    "text non-ASCII 2 KB": {"body": UNICODE, "subject": "Grüße 😀",
                            "to": "Zoë Ångström <zoe@example.com>"},
    "text + HTML": {"body": BODY, "html": HTML},
    "HTML alone (text derived)": {"html": HTML},
    "text + 10 KB attachment": {"body": BODY, "attachments": [ATTACHMENT]},
    "text + HTML + attachment": {"body": BODY, "html": HTML, "attachments": [ATTACHMENT]},
}
BASE = {"to": "user@example.com", "from_": "bench@example.com", "subject": "Hello"}


def cpu_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def _stdlib_bytes(text: str, html: str | None, atts: list[Any]) -> bytes:
    render = message_module._RENDER_POLICY
    return message_module._stdlib_message(text, html, atts, render).as_bytes(policy=render)


def builds(n: int) -> None:
    print(f"{'shape':28} {'build fast':>11} {'build email':>12} {'x':>5}"
          f" {'mime fast':>10} {'mime email':>11} {'x':>5}   (CPU us per message)")
    for name, shape in SHAPES.items():
        attrs = {**BASE, **shape}
        fast = cpu_us(partial(build_message, attrs), n)
        slow = cpu_us(partial(build_message, attrs, fast=False), n)
        atts = [_attachment(i, a) for i, a in enumerate(attrs.get("attachments", []))]
        html = attrs.get("html")
        text = attrs.get("body") or (html_to_text(html) if html else "")
        mime_fast = cpu_us(partial(fast_mime, text, html, atts), n)
        mime_slow = cpu_us(partial(_stdlib_bytes, text, html, atts), n)
        print(f"{name:28} {fast:11.0f} {slow:12.0f} {slow / fast:5.1f}"
              f" {mime_fast:10.0f} {mime_slow:11.0f} {mime_slow / mime_fast:5.1f}")


def _set_fast(on: bool) -> None:
    message_module.fast_mime = fast_mime if on else (lambda *_a: None)  # type: ignore


def enqueue(base: Path, n: int) -> None:
    config = parse_config({"message": {"from": "bench@example.com"},
                           "transport": {"smtp": {"host": "127.0.0.1", "port": 1}}})

    def attrs(i: int) -> dict[str, Any]:
        return {"to": f"user{i % 100}@example.com", "subject": f"m{i}", "body": BODY}

    async def tasks(ws: Path) -> None:
        manager = Manager(ws, config=config)

        async def caller(offset: int) -> None:
            for i in range(offset, n, 50):
                await manager.create_work(**attrs(i))

        await asyncio.gather(*(caller(k) for k in range(50)))

    def sync(ws: Path) -> None:
        client = Client(ws, config=config)
        for i in range(n):
            client.create_work(**attrs(i))

    runs: list[tuple[str, Callable[[Path], None]]] = [
        ("await create_work, 50 tasks", lambda ws: asyncio.run(tasks(ws))),
        ("sync Client.create_work", sync)]
    for label, fn in runs:
        for on in (False, True, False, True):
            _set_fast(on)
            ws = Path(tempfile.mkdtemp(dir=base))
            cpu0, t0 = time.process_time(), time.perf_counter()
            fn(ws)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            print(f"enqueue {label:28} fast={'on ' if on else 'off'}: {n / wall:7,.0f} msgs/s,"
                  f" CPU {cpu / n * 1e6:5.0f} us/msg")
            shutil.rmtree(ws, ignore_errors=True)
    _set_fast(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="builds per round")
    parser.add_argument("--enqueue", type=int, default=3000, help="messages per enqueue run "
                        "(0: skip)")
    parser.add_argument("--dir", type=Path, default=Path.cwd() / ".bench_tmp")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}")
    builds(args.n)
    if args.enqueue:
        args.dir.mkdir(exist_ok=True)
        enqueue(args.dir, args.enqueue)


if __name__ == "__main__":
    main()
