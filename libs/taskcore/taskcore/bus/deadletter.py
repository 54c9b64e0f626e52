"""The dead-letter queue on `tasks.dead.>`: building, writing, listing, replaying and purging dead letters.

A dead letter is bounded, so it always fits in a NATS message (1 MB by default) whatever it carries:
a payload beyond PAYLOAD_LIMIT bytes is kept truncated, with its full size and sha256 digest, and
such a letter cannot be replayed; a reason beyond REASON_LIMIT characters is cut."""

from __future__ import annotations

import hashlib

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.errors import TaskermanError
from taskcore.core.model import DeadLetter, NodeRecord
from taskcore.core.signing import Signer
from taskcore.obs import tracing

NO_NAME = "-"  # stands for the cluster or node of a task too broken to name them
# Escaped as JSON, a payload can grow up to sixfold (control bytes become \u00XX): 64 KiB of payload
# and 2 KiB of reason stay far below NATS' 1 MB.
PAYLOAD_LIMIT = 64 * 1024  # bytes of the original payload a dead letter keeps
REASON_LIMIT = 2 * 1024  # characters of the reason a dead letter keeps
CUT = " [...]"


class TruncatedPayload(TaskermanError):
    """The dead letter keeps only the start of its payload: replaying that would send something else."""

    def __init__(self, seq: int, letter: DeadLetter) -> None:
        self.seq = seq
        self.size = letter.payload_size
        self.sha256 = letter.payload_sha256
        super().__init__(
            f"dead letter {seq} keeps only {PAYLOAD_LIMIT} of its {self.size} payload bytes "
            f"(sha256 {self.sha256}): not replaying a truncated payload; publish the original again"
        )


class UnverifiedLetter(TaskermanError):
    """The dead letter is a work item a runner refused for its signature: it may be forged, and a
    replay would sign it as the admin's own."""

    def __init__(self, seq: int, letter: DeadLetter) -> None:
        self.seq = seq
        super().__init__(
            f"dead letter {seq} is a work item refused for its signature ({letter.reason[:300]}): it may "
            f"be forged, and replaying it would sign it with your key. Read it (`taskerman dlq show "
            f"{seq}`); submit the task again if it is genuine, or replay it with --force if you are sure"
        )


def is_work_item(letter: DeadLetter) -> bool:
    """Whether the letter's payload came from a node's subject (a work item), not `tasks.global`."""
    return letter.source_subject.startswith(f"{subjects.CLUSTER_PREFIX}.")


def letter(
    *,
    data: bytes,
    subject: str,
    deliveries: int,
    reason: str,
    attempts: int = 0,
    task_id: str = "",
    cluster: str = "",
    node: str = "",
    first_attempt_at: float | None = None,
    last_attempt_at: float | None = None,
) -> DeadLetter:
    """The dead letter of a message (its `data` from `subject`), in the current trace, bounded: a
    payload beyond PAYLOAD_LIMIT bytes keeps its start, size and digest; a long reason is cut."""
    truncated = len(data) > PAYLOAD_LIMIT
    if len(reason) > REASON_LIMIT:
        reason = reason[: REASON_LIMIT - len(CUT)] + CUT
    return DeadLetter(
        task_id=task_id,
        cluster=cluster,
        node=node,
        reason=reason,
        deliveries=deliveries,
        attempts=attempts,
        payload=data[:PAYLOAD_LIMIT].decode(errors="replace"),
        trace_id=tracing.current_trace_id(),
        span_id=tracing.current_span_id(),
        source_subject=subject,
        first_attempt_at=first_attempt_at,
        last_attempt_at=last_attempt_at,
        payload_size=len(data) if truncated else None,
        payload_sha256=hashlib.sha256(data).hexdigest() if truncated else None,
        payload_truncated=truncated,
    )


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


async def replay(
    js: JetStreamContext,
    status: StatusStore,
    seq: int,
    signer: Signer | None = None,
    force: bool = False,
) -> DeadLetter | None:
    """Republish a dead letter's original payload where it came from, with a fresh attempt budget
    (its node's record starts over), then remove the dead letter. A work item is signed anew with
    `signer` (an admin's key the runners trust: the router's signature covered the old message id;
    None, unsigned, only in insecure mode). None when there is no such letter; TruncatedPayload, and
    UnverifiedLetter for an item refused for its signature (unless `force`), leave it in place."""
    letter = await get(js, seq)
    if letter is None:
        return None
    if letter.payload_truncated:
        raise TruncatedPayload(seq, letter)
    work = is_work_item(letter)
    refused = work and letter.reason.startswith("signature:")  # never ran, never counted
    if refused and not force:
        raise UnverifiedLetter(seq, letter)
    if letter.task_id and letter.node:
        await status.put_node(letter.task_id, letter.node, NodeRecord(state="pending"))
        if not refused:
            await status.forgive(letter.task_id)
    subject = letter.source_subject or subjects.GLOBAL
    msg_id = f"replay:{seq}:{letter.task_id}"
    payload = letter.payload.encode()
    with tracing.tracer(__name__).start_as_current_span(
        "replay",
        links=tracing.link_to(letter.trace_id, letter.span_id),
        attributes={"task_id": letter.task_id, "node": letter.node, "replayed_trace_id": letter.trace_id},
    ):
        if work:
            await bus.publish_work(js, signer, subject, payload, msg_id)
        else:
            await bus.publish(js, subject, payload, msg_id=msg_id)
    await remove(js, seq)
    return letter
