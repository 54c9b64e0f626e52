"""The dead-letter queue on `tasks.dead.>`: writing, listing, replaying and purging dead letters."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.model import DeadLetter, NodeRecord
from taskcore.obs import tracing

NO_NAME = "-"  # stands for the cluster or node of a task too broken to name them


async def send(js: JetStreamContext, letter: DeadLetter, msg_id: str) -> None:
    """Publish a dead letter once (its message id makes a repeat harmless)."""
    subject = subjects.dead_subject(letter.cluster or NO_NAME, letter.node or NO_NAME)
    await bus.publish(js, subject, msgspec.json.encode(letter), msg_id=f"dead:{msg_id}")


async def entries(js: JetStreamContext) -> list[tuple[int, DeadLetter]]:
    """Every dead letter still in the stream, with its stream sequence as its id."""
    info = await js.stream_info(subjects.DEAD_STREAM)
    out: list[tuple[int, DeadLetter]] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        letter = await get(js, seq)
        if letter is not None:
            out.append((seq, letter))
    return out


async def get(js: JetStreamContext, seq: int) -> DeadLetter | None:
    """One dead letter by id, or None when there is none."""
    try:
        raw = await js.get_msg(subjects.DEAD_STREAM, seq)
    except NotFoundError:
        return None
    if raw.data is None:
        return None
    return msgspec.json.decode(raw.data, type=DeadLetter)


async def remove(js: JetStreamContext, seq: int) -> bool:
    """Delete one dead letter; False when it was not there."""
    try:
        return await js.delete_msg(subjects.DEAD_STREAM, seq)
    except NotFoundError:
        return False


async def purge(js: JetStreamContext) -> int:
    """Remove every dead letter; returns how many there were."""
    info = await js.stream_info(subjects.DEAD_STREAM)
    await js.purge_stream(subjects.DEAD_STREAM)
    return int(info.state.messages)


async def replay(js: JetStreamContext, status: StatusStore, seq: int) -> DeadLetter | None:
    """Republish a dead letter's original payload where it came from, with a fresh attempt budget
    (its node's record starts over), then remove the dead letter. None when there is none."""
    letter = await get(js, seq)
    if letter is None:
        return None
    if letter.task_id and letter.node:
        await status.put_node(letter.task_id, letter.node, NodeRecord(state="pending"))
        await status.forgive(letter.task_id)
    subject = letter.source_subject or subjects.GLOBAL
    with tracing.tracer(__name__).start_as_current_span(
        "replay",
        links=tracing.link_to(letter.trace_id, letter.span_id),
        attributes={"task_id": letter.task_id, "node": letter.node, "replayed_trace_id": letter.trace_id},
    ):
        await bus.publish(js, subject, letter.payload.encode(), msg_id=f"replay:{seq}:{letter.task_id}")
    await remove(js, seq)
    return letter
