"""Fault injection for tests: crash points and error points.

``ESS_TEST_CRASH_AT=point[:n]`` kills the process with SIGKILL the n-th time (default 1st)
execution passes ``crash_point(point)``. ``ESS_TEST_FAIL_AT=point[:n]`` (or
``inject_failure`` in-process) makes the next n passes of ``fail_point(point)`` raise
``OSError(EIO)``, as a failing disk would.

Read once at import; unset (always, outside tests) every point is a no-op. Crash points:
after_tmp_write, after_queue_rename, after_claim_rename (a batched claim's rename into
active/, before its journal line), after_claim, after_mail_from, during_data,
after_250, after_journal, after_next_state (the next state appended to the claimed file
and synced, the file not yet moved out of active/), between_key_and_message (an
idempotency key written, its message not yet),
between_transactions (a message split by a recipient limit: one transaction accepted
and checkpointed, the next not begun).
Error points: journal_write, journal_sync, journal_dir_sync (after a compaction's
rename), spool_commit (a settle's sync), spool_dir_sync (a settle's folders' fsync, its
files moved).
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ("CRASH_POINTS", "FAIL_POINTS", "crash_point", "fail_point", "inject_failure")

CRASH_POINTS = frozenset({"after_tmp_write", "after_queue_rename", "after_claim_rename",
                          "after_claim", "after_mail_from", "during_data", "after_250",
                          "after_journal", "after_next_state", "between_key_and_message",
                          "between_transactions"})
FAIL_POINTS = frozenset({"journal_write", "journal_sync", "journal_dir_sync",
                         "spool_commit", "spool_dir_sync"})


def _parse(variable: str, points: frozenset[str]) -> tuple[str, int] | None:
    value = os.environ.get(variable)
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in points:
        raise RuntimeError(f"{variable}: unknown point {name!r}")
    return name, int(count or 1)


_crash_at = _parse("ESS_TEST_CRASH_AT", CRASH_POINTS)
_passes = 0
_failures: dict[str, int] = dict([_fail] if (_fail := _parse("ESS_TEST_FAIL_AT",
                                                             FAIL_POINTS)) else [])


def crash_point(name: str) -> None:
    """SIGKILL this process here if the tests asked for it."""
    global _passes
    if _crash_at is None or _crash_at[0] != name:
        return
    _passes += 1
    if _passes >= _crash_at[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def fail_point(name: str) -> None:
    """Raise OSError(EIO) here if the tests asked for it."""
    if _failures and _failures.get(name, 0) > 0:
        _failures[name] -= 1
        raise OSError(errno.EIO, f"injected I/O error at {name}")


def inject_failure(name: str, times: int = 1) -> None:
    """Make the next ``times`` passes of ``fail_point(name)`` fail (0 clears it)."""
    if name not in FAIL_POINTS:
        raise ValueError(f"unknown fail point {name!r}")
    _failures[name] = times
