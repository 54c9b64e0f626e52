"""Submitting on a real nats-server: recorded pending, then published under the task id; a retry
after a lost publish publishes it again, and a task id reused for another task is refused."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus import submission
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.model import Task, TaskRecord, decode_task
from taskcore.core.settings import Settings
from taskerman_dev.launchers import NatsServer


@pytest.fixture
async def bus_of_its_own(
    tmp_path: Path, nats_users: dict[str, str], signing_keys: dict[str, Any]
) -> AsyncIterator[tuple[JetStreamContext, StatusStore]]:
    """A server of this test's own: it counts the messages on tasks.global."""
    with NatsServer(tmp_path / "nats", users=nats_users) as server:
        settings = Settings(**signing_keys, nats_url=server.url, home=tmp_path)
        nc = await bus.connect(settings, "test")
        try:
            js = nc.jetstream()
            await bus.provision(js, settings)
            yield js, StatusStore(await bus.status_bucket(js))
        finally:
            await bus.close(nc)


TASK = decode_task(b'{"action": "test:sleep", "cluster_name": "c1", "nodes": ["n1"], "task_id": "sub-1"}')


async def queued(js: JetStreamContext) -> int:
    return (await js.stream_info(subjects.TASKS_STREAM)).state.messages


async def test_a_pending_record_whose_publish_was_lost_is_published_on_the_retry(
    bus_of_its_own: tuple[JetStreamContext, StatusStore],
) -> None:
    js, status = bus_of_its_own
    # what a try leaves when the bus fails over after the record and before the publish lands
    await status.create_task(TASK.task_id, TaskRecord(task=TASK, state="pending", created_at=time.time()))
    assert await queued(js) == 0
    reply = await submission.submit(js, status, TASK, by="test")
    assert (reply.duplicate, reply.error) == (True, "")
    assert await queued(js) == 1  # published this time
    again = await submission.submit(js, status, TASK, by="test")
    assert again.duplicate
    assert await queued(js) == 1  # the same message id: JetStream dropped the copy


async def test_a_task_id_reused_for_another_task_is_refused(
    bus_of_its_own: tuple[JetStreamContext, StatusStore],
) -> None:
    js, status = bus_of_its_own
    assert not (await submission.submit(js, status, TASK, by="test")).duplicate
    other: Task = msgspec.structs.replace(TASK, limit=3)
    reply = await submission.submit(js, status, other, by="test")
    assert reply.field == "task_id"
    assert "is already another task's" in reply.error
    assert await queued(js) == 1
