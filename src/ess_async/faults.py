"""Crash points for tests: ``ESS_TEST_CRASH_AT=point[:n]`` kills the process with SIGKILL
the n-th time (default 1st) execution passes ``crash_point(point)``.

Read once at import; unset (always, outside tests) every crash point is a no-op. Points:
after_tmp_write, after_queue_rename, after_claim, after_mail_from, during_data,
after_250, after_journal, before_unlink_active (the next state written, active/ not yet
removed), between_key_and_message (an idempotency key written, its message not yet).
"""

from __future__ import annotations

import os
import signal

__all__ = ("CRASH_POINTS", "crash_point")

CRASH_POINTS = frozenset({"after_tmp_write", "after_queue_rename", "after_claim",
                          "after_mail_from", "during_data", "after_250", "after_journal",
                          "before_unlink_active", "between_key_and_message"})


def _default_crash_at() -> tuple[str, int] | None:
    value = os.environ.get("ESS_TEST_CRASH_AT")
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in CRASH_POINTS:
        raise RuntimeError(f"ESS_TEST_CRASH_AT: unknown crash point {name!r}")
    return name, int(count or 1)


_crash_at = _default_crash_at()
_passes = 0


def crash_point(name: str) -> None:
    """SIGKILL this process here if the tests asked for it."""
    global _passes
    if _crash_at is None or _crash_at[0] != name:
        return
    _passes += 1
    if _passes >= _crash_at[1]:
        os.kill(os.getpid(), signal.SIGKILL)
