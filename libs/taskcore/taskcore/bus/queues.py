"""Queue lengths as JetStream reports them, read in one place for `taskerman health` and the fleet
gauges: messages per stream, and what each consumer has waiting and unacked. Consumer listings
are paged (JetStream answers at most `CONSUMER_PAGE` per request), so fleets of any size are whole."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from taskcore.core import subjects
from taskcore.core.errors import InvalidName

CONSUMER_PAGE = 256  # JetStream lists at most this many consumers per request


class ConsumerQueue(msgspec.Struct, frozen=True, kw_only=True):
    """One runner consumer of the WORK stream: items waiting, delivered but not acked, redelivered."""

    consumer: str
    cluster: str
    node: str
    num_pending: int
    num_ack_pending: int
    num_redelivered: int


class Queues(msgspec.Struct, frozen=True, kw_only=True):
    """Queue lengths: messages in the streams, and the router's and runners' consumers."""

    tasks: int
    router_pending: int
    router_ack_pending: int
    work: int
    dead_letters: int
    runners: list[ConsumerQueue]


async def stream_messages(js: JetStreamContext, stream: str) -> int:
    """Messages in the stream; 0 when it does not exist (yet)."""
    try:
        return (await js.stream_info(stream)).state.messages
    except NotFoundError:
        return 0


async def consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    """Every consumer of the stream, page by page; none when the stream does not exist."""
    found: list[ConsumerInfo] = []
    try:
        while page := await js.consumers_info(stream, offset=len(found) or None):
            found += page
            if len(page) < CONSUMER_PAGE:
                break
    except NotFoundError:
        return []
    return found


def runner_queue(c: ConsumerInfo) -> ConsumerQueue | None:
    """The queue of a runner's consumer (its filter names the node); None for any other consumer."""
    try:
        cluster, node = subjects.parse_node_subject(c.config.filter_subject or "")
    except InvalidName:
        return None
    return ConsumerQueue(
        consumer=c.name,
        cluster=cluster,
        node=node,
        num_pending=c.num_pending or 0,
        num_ack_pending=c.num_ack_pending or 0,
        num_redelivered=c.num_redelivered or 0,
    )


async def read_queues(js: JetStreamContext) -> Queues:
    """The streams' lengths, the router's consumer and every runner's consumer (by cluster, node)."""
    try:
        router = await js.consumer_info(subjects.TASKS_STREAM, subjects.ROUTER_DURABLE)
        router_pending, router_unacked = router.num_pending or 0, router.num_ack_pending or 0
    except NotFoundError:
        router_pending = router_unacked = 0
    runners = [q for c in await consumers(js, subjects.WORK_STREAM) if (q := runner_queue(c))]
    return Queues(
        tasks=await stream_messages(js, subjects.TASKS_STREAM),
        router_pending=router_pending,
        router_ack_pending=router_unacked,
        work=await stream_messages(js, subjects.WORK_STREAM),
        dead_letters=await stream_messages(js, subjects.DEAD_STREAM),
        runners=sorted(runners, key=lambda q: (q.cluster, q.node)),
    )
