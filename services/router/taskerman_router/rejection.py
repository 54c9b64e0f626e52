"""Rejected tasks and their records: a record is written only by its own task. A task rejected by
the router is recorded as dead unless its task id is already another task's; a valid task whose id
is another task's is refused (`TaskIdTaken`) instead of routed under that task's record."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from taskcore.bus.tracking import StatusStore
from taskcore.core import model
from taskcore.core.errors import InvalidTask
from taskcore.core.model import Task, TaskRecord


class TaskIdTaken(InvalidTask):
    """The task's id is already another task's: its record is left alone."""


def taken(task_id: str, known: TaskRecord) -> str:
    at = datetime.fromtimestamp(known.created_at, UTC).isoformat(timespec="seconds")
    return (
        f"task_id {task_id!r} already used by a task submitted at {at} (now {known.state}): "
        "this message is dead-lettered on its own; send it again with a new task_id"
    )


def same_task(known: TaskRecord, task: Task | None, reason: str = "") -> bool:
    """Whether a record is this task's own: the same task (its nodes aside, which the routed
    record keeps in its plan), or, for a task that never decoded, its own rejection."""
    if task is None or known.task is None:
        return task is None and known.task is None and known.error == reason
    return model.same_task(known.task, task)


async def record_dead(status: StatusStore, task_id: str, task: Task | None, reason: str) -> str | None:
    """Record the task as dead, by compare-and-set, if the record is absent or this task's own
    (its pending record from submit, or an earlier rejection of it). None when recorded;
    otherwise why not (the id is another task's)."""
    for _ in range(3):
        entry = await status.get_task_entry(task_id)
        known, revision = entry if entry else (None, None)
        if known is not None and not same_task(known, task, reason):
            return taken(task_id, known)
        if known is not None and known.state not in ("pending", "dead"):
            return None  # its own routed record: the nodes it published are tracked there
        record = TaskRecord(
            task=task,
            state="dead",
            created_at=known.created_at if known else time.time(),
            error=reason,
        )
        if await status.commit_task(task_id, record, revision):
            return None
    return f"task_id {task_id!r}: its record kept changing, not recorded"
