"""The runner's pure decisions: the attempt budget, retry or dead letter, and backoff."""

from __future__ import annotations

import pytest

from taskcore.core.errors import InvalidTask
from taskcore.core.model import WorkqueueArgs, decode_task
from taskerman_runner.policy import MAX_BACKOFF, after_failure, attempt_budget, backoff_delay, retry_delay


def test_attempt_budget_is_first_attempt_plus_retries() -> None:
    assert attempt_budget(0) == 1
    assert attempt_budget(2) == 3
    assert attempt_budget(50) == 51


@pytest.mark.parametrize(
    ("deliveries", "expected"),
    [(1, "retry"), (2, "retry"), (3, "dead"), (4, "dead"), (100, "dead")],
)
def test_after_failure_boundary_with_two_retries(deliveries: int, expected: str) -> None:
    assert after_failure(deliveries, retry_count=2) == expected


def test_no_retries_means_dead_after_the_first_failure() -> None:
    assert after_failure(1, retry_count=0) == "dead"


def test_each_retry_count_gets_exactly_its_budget() -> None:
    for retry_count in range(6):
        outcomes = [after_failure(d, retry_count) for d in range(1, retry_count + 3)]
        assert outcomes == ["retry"] * retry_count + ["dead", "dead"]


def test_backoff_doubles() -> None:
    assert [backoff_delay(1.0, d) for d in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert [backoff_delay(0.5, d) for d in range(1, 4)] == [0.5, 1.0, 2.0]


def test_backoff_before_any_delivery_is_the_base() -> None:
    assert backoff_delay(1.5, 0) == 1.5


def test_backoff_is_capped() -> None:
    assert MAX_BACKOFF == 300.0
    assert backoff_delay(1.0, 9) == 256.0
    assert backoff_delay(1.0, 10) == MAX_BACKOFF
    assert backoff_delay(1.0, 1000) == MAX_BACKOFF
    assert backoff_delay(3600.0, 1) == MAX_BACKOFF


def test_backoff_zero_base() -> None:
    assert backoff_delay(0.0, 7) == 0.0


def test_backoff_is_a_float() -> None:
    assert isinstance(backoff_delay(1, 3), float)


def test_retry_delay_from_a_list_repeats_its_last_value() -> None:
    args = WorkqueueArgs(retry_count=5, backoff=[0.5, 2.0, 10.0])
    assert [retry_delay(args, f) for f in range(1, 6)] == [0.5, 2.0, 10.0, 10.0, 10.0]


def test_retry_delay_base_factor_and_max() -> None:
    args = WorkqueueArgs(backoff=1.0, backoff_factor=3.0, backoff_max=20.0)
    assert [retry_delay(args, f) for f in range(1, 5)] == [1.0, 3.0, 9.0, 20.0]


def test_backoff_list_is_validated_on_the_wire() -> None:
    with pytest.raises(InvalidTask) as e:
        decode_task(
            b'{"action": "a:b", "cluster_name": "c", '
            b'"taskerman_params": {"workqueue_args": {"backoff": [1, -2]}}}'
        )
    assert e.value.field is not None
    assert "backoff" in e.value.field
