"""Node records with two writers on a real nats-server: a change by compare-and-set never loses
a write that landed in between."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core.model import NodeRecord
from taskerman_dev.launchers import NatsServer


@pytest.fixture
async def status(nats_server: NatsServer, nats_auth: dict[str, str]) -> AsyncIterator[StatusStore]:
    nc = await nats.connect(nats_server.url, **nats_auth)
    try:
        yield StatusStore(await bus.status_bucket(nc.jetstream()))
    finally:
        await nc.close()


async def test_concurrent_updates_of_one_node_record_all_land(status: StatusStore, prefix: str) -> None:
    task_id = f"{prefix}-cas"
    await status.put_node(task_id, "n1", NodeRecord(state="running", attempts=1))
    # one writer settles the node, the other counts failures, many times over and interleaved
    await asyncio.gather(
        *(status.update_node(task_id, "n1", error=f"reason {i}") for i in range(10)),
        *(status.update_node(task_id, "n1", state="dead") for _ in range(10)),
    )
    rec = await status.get_node(task_id, "n1")
    assert rec is not None
    assert (rec.state, rec.attempts) == ("dead", 1)
    assert rec.error is not None
    assert rec.error.startswith("reason ")


async def test_an_update_creates_a_missing_record(status: StatusStore, prefix: str) -> None:
    rec = await status.update_node(f"{prefix}-new", "n1", state="dead", error="max deliveries")
    assert rec == NodeRecord(state="dead", error="max deliveries")
    assert await status.get_node(f"{prefix}-new", "n1") == rec
