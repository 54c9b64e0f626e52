"""Consumer listings are whole past JetStream's page of 256 (a fleet of more runners than that)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, StreamConfig

from taskcore.bus import queues
from taskcore.core import subjects
from taskerman_dev.launchers import NatsServer

NODES = 300  # more than one page (queues.CONSUMER_PAGE)


@pytest.fixture
async def js(nats_server: NatsServer, nats_auth: dict[str, str]) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url, **nats_auth)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def test_consumers_are_listed_past_one_page(js: JetStreamContext, prefix: str) -> None:
    stream = f"{prefix}-WORK"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
    started = time.monotonic()
    sem = asyncio.Semaphore(50)

    async def add(i: int) -> None:
        config = ConsumerConfig(
            durable_name=f"n{i:03d}", filter_subject=f"{prefix}.n{i:03d}", ack_policy=AckPolicy.EXPLICIT
        )
        async with sem:
            await js.add_consumer(stream, config)

    try:
        await asyncio.gather(*(add(i) for i in range(NODES)))
        assert len(await js.consumers_info(stream)) == queues.CONSUMER_PAGE  # one request: one page
        found = await queues.consumers(js, stream)
        assert sorted(c.name for c in found) == [f"n{i:03d}" for i in range(NODES)]
        assert time.monotonic() - started < 10
    finally:
        await js.delete_stream(stream)


async def test_no_stream_no_consumers(js: JetStreamContext, prefix: str) -> None:
    assert await queues.consumers(js, f"{prefix}-NONE") == []
    assert await queues.stream_messages(js, f"{prefix}-NONE") == 0


def _info(name: str, filter_subject: str) -> ConsumerInfo:
    return ConsumerInfo(
        name=name,
        stream_name=subjects.WORK_STREAM,
        config=ConsumerConfig(durable_name=name, filter_subject=filter_subject),
        created=datetime.now(UTC),
        num_pending=3,
        num_ack_pending=1,
    )


def test_only_runner_consumers_have_a_runner_queue() -> None:
    runner = queues.runner_queue(_info("r", subjects.node_subject("demo:web", "node 1")))
    assert runner is not None
    assert (runner.cluster, runner.node, runner.num_pending, runner.num_ack_pending) == (
        "demo:web",
        "node 1",
        3,
        1,
    )
    assert runner.num_redelivered == 0
    assert queues.runner_queue(_info("other", "tasks.global")) is None
