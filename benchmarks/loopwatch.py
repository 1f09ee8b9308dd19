"""Where the event loop is when it is late: a diagnostic for the backlog benchmark.

``ESS_BENCH_WATCHDOG=1 python benchmarks/run.py --scale N`` starts, in the serving child,
a thread that samples the loop thread's stack every 5 ms while the 10 ms ticker is more
than 40 ms late, and prints the most frequent stacks (innermost frames last) to stderr.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback

__all__ = ("Watchdog",)


class Watchdog:
    def __init__(self, *, late: float = 0.04, depth: int = 8) -> None:
        self.late = late
        self.depth = depth
        self.last_tick = time.monotonic()
        self.loop_thread = threading.get_ident()
        self.stacks: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            if time.monotonic() - self.last_tick < self.late:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            if frame is None:
                continue
            frames = traceback.extract_stack(frame)[-self.depth:]
            self.stacks[" <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
                                    for f in reversed(frames))] += 1

    def report(self, top: int = 12) -> None:
        self._stop.set()
        self._thread.join()
        total = sum(self.stacks.values())
        print(f"watchdog: {total} samples while the loop was > {self.late * 1000:.0f} ms late",
              file=sys.stderr)
        for stack, count in self.stacks.most_common(top):
            print(f"  {count:5d}  {stack}", file=sys.stderr)
