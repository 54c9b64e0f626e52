"""Pure decisions of the runner: what a delivery may do, how long to back off."""

from __future__ import annotations

from typing import Literal

MAX_BACKOFF = 300.0


def attempt_budget(retry_count: int) -> int:
    """Deliveries a node's item gets: the first attempt plus `retry_count` retries."""
    return retry_count + 1


def after_failure(deliveries: int, retry_count: int) -> Literal["retry", "dead"]:
    """A failed attempt is retried until the budget is spent, then dead-lettered."""
    return "dead" if deliveries >= attempt_budget(retry_count) else "retry"


def backoff_delay(base: float, deliveries: int) -> float:
    """Exponential backoff before the next attempt: base, 2·base, 4·base … capped."""
    exponent = min(max(deliveries - 1, 0), 64)  # past any cap already; avoids OverflowError
    return float(min(base * 2.0**exponent, MAX_BACKOFF))
