"""Reading back what the scheduler published on `tasks.global`."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.core import subjects
from taskcore.core.model import Task, decode_task
from taskerman_scheduler.slots import CLUSTER_SEP, SLOT_ID_PREFIX, SLOT_TIME_FORMAT


async def published(js: JetStreamContext) -> list[tuple[str, Task]]:
    """(Nats-Msg-Id, task) of every message in the TASKS stream, in stream order (no router runs,
    so nothing has been consumed)."""
    info = await js.stream_info(subjects.TASKS_STREAM)
    out = []
    for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
        try:
            msg = await js.get_msg(subjects.TASKS_STREAM, seq)
        except NotFoundError:
            continue
        out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), decode_task(msg.data or b"")))
    return out


def slot_of(task_id: str, name: str) -> datetime | None:
    """The slot time of a task id made by `slot_task_id(name, ...)` (with or without a `~<cluster>`
    suffix), or None for another schedule's or a manual run's."""
    prefix = f"{SLOT_ID_PREFIX}{name}-"
    if not task_id.startswith(prefix):
        return None
    stamp = task_id.removeprefix(prefix).split(CLUSTER_SEP, 1)[0]
    if "-" in stamp or "." in stamp:
        return None
    return datetime.strptime(stamp, SLOT_TIME_FORMAT).replace(tzinfo=UTC)
