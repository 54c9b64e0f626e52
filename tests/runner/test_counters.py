"""The cluster's run counters as a runner feeds them: many nodes finishing at once are added up
into few writes, and none is lost (real ZooKeeper)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from taskcore.coord import clusters
from taskcore.coord.session import ZkSession
from taskcore.core.model import Task, WorkItem
from taskerman_runner.hooks import AttemptState
from taskerman_runner.observers import CountersObserver


@pytest.fixture
def zk(zk_session: ZkSession) -> ZkSession:
    return zk_session


def finished(node: str) -> AttemptState:
    item = WorkItem(task=Task(action="test:sleep", cluster_name="c1", task_id="t"), node=node, routed_at=0.0)
    return AttemptState(item=item, cluster="c1", node=node)


async def test_two_hundred_nodes_finishing_at_once_are_counted_in_few_writes(
    zk: ZkSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = 0
    real = clusters.count

    async def counting(*args: object) -> clusters.Stats:
        nonlocal writes
        writes += 1
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(clusters, "count", counting)
    counters = CountersObserver(zk)
    await asyncio.gather(
        *(counters.after_step_failed(finished(f"n{i}"), "boom") for i in range(50)),
        *(counters.before_succeeded(finished(f"n{i}")) for i in range(150)),
    )
    for _ in range(200):  # the writes go on after the items have moved on
        if not counters._writers:
            break
        await asyncio.sleep(0.05)
    data = await zk.client.get_data(clusters.stats_path("c1", "test:sleep"))
    stats = msgspec.json.decode(data, type=clusters.Stats)
    assert (stats.executions, stats.failures) == (200, 50)
    assert writes <= 10, writes  # one in flight at a time, each taking what piled up meanwhile
