"""Submitting a validated task: record it as pending, then publish it with its id as Nats-Msg-Id."""

from __future__ import annotations

import contextlib
import time

import msgspec
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Audit
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.model import Task, TaskRecord, same_task


class SubmitReply(msgspec.Struct, frozen=True, omit_defaults=True):
    """The reply of `taskerman.api.submit`: the task id, or the error naming the field. A
    `retryable` error is the bus failing over, not the task: the same submission may be sent again
    (its task id makes a repeat a duplicate)."""

    task_id: str = ""
    duplicate: bool = False
    error: str = ""
    field: str | None = None
    retryable: bool = False


async def submit(
    js: JetStreamContext, status: StatusStore, task: Task, by: str, kind: str = "submitted"
) -> SubmitReply:
    """Record and publish a task that has its id; a task id seen before is a duplicate, not resent
    (unless it is still pending: then it is published again, under the same message id). If the
    publish fails the pending record is removed, so a retry is not taken for a duplicate."""
    record = TaskRecord(task=task, state="pending", created_at=time.time())
    if not await status.create_task(task.task_id, record):
        known = await status.get_task(task.task_id)
        if known is not None and known.task is not None and not same_task(known.task, task):
            return SubmitReply(
                task_id=task.task_id,
                error=f"task_id {task.task_id!r} is already another task's (submitted at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(known.created_at))}, now {known.state}, "
                "with other settings): submit this one with a new task id",
                field="task_id",
            )
        if known is not None and known.state == "pending":
            # an earlier try may have recorded it and lost its publish (the bus failed over before
            # the pending record could be removed): publish again; if it did land, JetStream drops
            # this copy by its message id
            await bus.publish(js, subjects.GLOBAL, msgspec.json.encode(task), msg_id=task.task_id)
        return SubmitReply(task_id=task.task_id, duplicate=True)
    try:
        await bus.publish(js, subjects.GLOBAL, msgspec.json.encode(task), msg_id=task.task_id)
    except Exception:
        with contextlib.suppress(Exception):
            await status.delete_task(task.task_id)
        raise
    await Audit(js, by).record(
        "submitted", task_id=task.task_id, cluster=task.cluster_name, detail=task.action
    )
    return SubmitReply(task_id=task.task_id)
