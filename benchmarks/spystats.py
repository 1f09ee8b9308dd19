"""Summarize a py-spy ``--format raw`` profile (collapsed stacks) as plain text.

    py-spy record --threads [--idle] --format raw -r 500 -o prof.txt -- \\
        python benchmarks/profile_case.py e2e -n 4000 --spawn 16
    python benchmarks/spystats.py prof.txt [--exclude prequeue,importlib] [--top 30]

Prints samples per thread, then, over the kept samples, the functions with the most
samples on top of the stack (self) and in the stack at all (inclusive), as a share of
all kept samples of the main thread and of all threads.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['func']} ({match['file']})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--exclude", default="prequeue,_find_and_load,Sink.__init__,checked,"
                        "mkdtemp,rmtree,Runner.close,shutdown_default_executor")
    parser.add_argument("--only", default="", help="keep only stacks with one of these")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    exclude = [e for e in args.exclude.split(",") if e]
    only = [o for o in args.only.split(",") if o]
    threads: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    main_total = 0
    total = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        if any(e in stack for e in exclude) or (only and not any(o in stack for o in only)):
            continue
        is_main = "MainThread" in thread or "run_forever" in stack
        name = "main" if is_main else "other threads"
        threads[name] += count
        total += count
        if is_main:
            main_total += count
        names = [frame_name(f) for f in frames[1:]]
        if names:
            self_time[("" if is_main else "[thread] ") + names[-1]] += count
        for n in set(names):
            inclusive[("" if is_main else "[thread] ") + n] += count
    print(f"samples kept: {total} ({dict(threads)})")
    print("\nself (top of stack), % of main-thread samples [% of all]:")
    for name, count in self_time.most_common(args.top):
        print(f"  {100 * count / max(main_total, 1):5.1f}% [{100 * count / total:5.1f}%]  {name}")
    print("\ninclusive, % of main-thread samples [% of all]:")
    for name, count in inclusive.most_common(args.top * 2):
        print(f"  {100 * count / max(main_total, 1):5.1f}% [{100 * count / total:5.1f}%]  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
