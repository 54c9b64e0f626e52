"""Pure decisions of the runner: what a delivery may do, how long to back off."""

from __future__ import annotations

from typing import Literal

from taskcore.core.model import WorkqueueArgs

MAX_BACKOFF = 300.0  # the default cap (`backoff_max`)


def attempt_budget(retry_count: int) -> int:
    """Attempts a node's item gets: the first plus `retry_count` retries."""
    return retry_count + 1


def after_failure(failures: int, retry_count: int) -> Literal["retry", "dead"]:
    """After its `failures`-th failed attempt a node's item is retried until the budget is spent,
    then dead-lettered (attempts lost to a crash or a lost lease are not failures)."""
    return "dead" if failures >= attempt_budget(retry_count) else "retry"


def retry_delay(args: WorkqueueArgs, failures: int) -> float:
    """The delay before the retry that follows failure number `failures` (1-based)."""
    if isinstance(args.backoff, list):
        if not args.backoff:
            return 0.0
        return float(args.backoff[min(max(failures, 1), len(args.backoff)) - 1])
    return backoff_delay(args.backoff, failures, args.backoff_factor, args.backoff_max)


def backoff_delay(base: float, deliveries: int, factor: float = 2.0, cap: float = MAX_BACKOFF) -> float:
    """Exponential backoff before the next attempt: base, factor·base, factor²·base … up to `cap`."""
    exponent = min(max(deliveries - 1, 0), 64)  # past any cap already; avoids OverflowError
    return float(min(base * factor**exponent, cap))
