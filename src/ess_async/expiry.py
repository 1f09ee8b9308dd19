"""Message expiry (issue 14 part 6): ``create_work(expires_at=datetime)`` or
``expires_in=seconds``. A message not delivered by then is never sent: when a sender
claims it (the first attempt or a retry) after its ``expires_at``, it goes to
``failed/`` with ``result.reason = "expired"``. A retry that would fall after the expiry
is timed for the expiry instead, so the message is failed then, not later.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from .errors import MessageError

__all__ = ("clamp_due", "expire", "is_expired", "parse_expiry")


def _seconds(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(field, f"must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise MessageError(field, f"must be finite, not {str(value)[:40]}")
    return number


def parse_expiry(expires_at: object, expires_in: object, *, now: float,
                 send_at: float | None) -> float | None:
    """The expiry time of a new message (POSIX seconds), or None; MessageError if it is
    malformed, already past, or not after ``send_at``."""
    if expires_at is None and expires_in is None:
        return None
    if expires_at is not None and expires_in is not None:
        raise MessageError("expires_in", "give expires_at or expires_in, not both")
    if expires_in is not None:
        seconds = _seconds(expires_in, "expires_in")
        if seconds <= 0:
            raise MessageError("expires_in", f"must be positive, not {expires_in!r}")
        when, field = now + seconds, "expires_in"
    else:
        field = "expires_at"
        if isinstance(expires_at, datetime):
            when = expires_at.timestamp()  # a naive datetime is local time
        else:
            when = _seconds(expires_at, "expires_at")
        if when <= now:
            raise MessageError("expires_at", "is already past")
    if send_at is not None and when <= send_at:
        raise MessageError(field, "is not after send_at: the message could never be sent")
    return when


def _expires_at(record: dict[str, Any]) -> float | None:
    value = record.get("expires_at")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # absent (or malformed: the message never expires)
    try:
        return float(value)
    except OverflowError:
        return None


def is_expired(record: dict[str, Any], now: float) -> bool:
    expires = _expires_at(record)
    return expires is not None and now >= expires


def clamp_due(record: dict[str, Any], due: float) -> float:
    """A retry time no later than the message's expiry."""
    expires = _expires_at(record)
    return due if expires is None or expires >= due else max(expires, 0.0)


def expire(record: dict[str, Any], now: float) -> dict[str, Any]:
    """Make ``record`` the final record of an expired message (state failed)."""
    error = record.get("last_error") or {}
    record.update(state="failed", finished_at=now, next_attempt_at=None, result={
        "code": None, "message": "expired before it could be delivered",
        "reason": "expired", "phase": None, "expires_at": record.get("expires_at"),
        "last_error": error or None, "refused": record.get("refused", {})})
    return record
