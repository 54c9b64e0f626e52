"""Hooks: every overriding observer runs in order; a contained observer's failure is logged, not raised."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest

from taskcore.core.model import Task, WorkItem
from taskerman_runner.hooks import AttemptObserver, AttemptState, Hooks


def state() -> AttemptState:
    item = WorkItem(task=Task(action="test:sleep", cluster_name="c1", task_id="t"), node="n1", routed_at=0.0)
    return AttemptState(item=item, cluster="c1", node="n1")


class Recorder(AttemptObserver):
    def __init__(self, seen: list[str], name: str) -> None:
        self.seen = seen
        self.name = name

    async def after_step_passed(self, s: AttemptState, step: str) -> None:
        self.seen.append(f"{self.name}:{step}")


class Broken(AttemptObserver):
    async def after_step_passed(self, s: AttemptState, step: str) -> None:
        raise RuntimeError("observer bug")


class Essential(Broken):
    contained = False


async def test_a_contained_failure_is_logged_and_the_rest_still_run(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    hooks = Hooks([Recorder(seen, "a"), Broken(), Recorder(seen, "b")])
    with caplog.at_level(logging.ERROR):
        await hooks.emit(AttemptObserver.after_step_passed, state(), "pre_check")
        await hooks.emit(AttemptObserver.after_succeeded, state())  # nobody overrides it
    assert seen == ["a:pre_check", "b:pre_check"]
    assert "unexpected failure in after_step_passed of Broken" in caplog.text


async def test_an_uncontained_failure_is_the_attempts() -> None:
    seen: list[str] = []
    hooks = Hooks([Recorder(seen, "a"), Essential(), Recorder(seen, "b")])
    with pytest.raises(RuntimeError, match="observer bug"):
        await hooks.emit(AttemptObserver.after_step_passed, state(), "pre_check")
    assert seen == ["a:pre_check"]


class Flaky(AttemptObserver):
    """Keeps the record: fails its first `fails` calls, as a write during a bus failover would."""

    contained = False

    def __init__(self, seen: list[str], fails: int) -> None:
        self.seen = seen
        self.fails = fails

    async def after_step_passed(self, s: AttemptState, step: str) -> None:
        if self.fails:
            self.fails -= 1
            raise ConnectionError("bus down")
        self.seen.append(f"flaky:{step}")


async def test_a_retried_observer_does_not_repeat_those_before_it() -> None:
    """emit_through retries each observer's call on its own: the audit event written before a
    failed record write is not appended again when the write is retried."""
    seen: list[str] = []
    hooks = Hooks([Recorder(seen, "audit"), Flaky(seen, fails=2), Recorder(seen, "metrics")])

    async def retried(call: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                return await call()
            except ConnectionError:
                seen.append("retry")

    await hooks.emit_through(retried, AttemptObserver.after_step_passed, state(), "execute_action")
    assert seen == [
        "audit:execute_action",
        "retry",
        "retry",
        "flaky:execute_action",
        "metrics:execute_action",
    ]
