"""Retry policy: pure functions of attempts, age and a random draw (no clock, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import RetryConfig

__all__ = ("RetryPolicy",)


@dataclass(frozen=True)
class RetryPolicy:
    min_backoff: float = 60.0
    max_backoff: float = 3600.0
    max_age: float = 5 * 24 * 3600.0
    max_attempts: int = 0  # 0: no limit but max_age

    @classmethod
    def from_config(cls, config: RetryConfig) -> RetryPolicy:
        return cls(config.min_backoff, config.max_backoff, config.max_age, config.max_attempts)

    def backoff(self, attempts: int, rand: float) -> float:
        """Delay before attempt ``attempts + 1``: doubling from min_backoff, capped, with
        up to 25% jitter so deferred messages do not return in one burst."""
        base = self.min_backoff * 2.0 ** max(0, min(attempts - 1, 60))
        return max(self.min_backoff, min(self.max_backoff, base * (1.0 + 0.25 * rand)))

    def next_attempt(self, *, created_at: float, attempts: int, now: float,
                     rand: float) -> float | None:
        """When to try again after ``attempts`` failed attempts, or None to give up."""
        if self.max_attempts and attempts >= self.max_attempts:
            return None
        due = now + self.backoff(attempts, rand)
        if due - created_at > self.max_age:
            return None
        return due
