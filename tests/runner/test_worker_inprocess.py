"""A NodeWorker run in the test's own event loop (no runner process) against the session's real
nats-server and ZooKeeper: one item published as the router would, one drain, then the record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiozk import exc as zk_exc
from nats import errors as nats_errors
from nats.js import JetStreamContext

from taskcore.bus import audit, deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.coord.leases import lease_path
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core import signing, subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.model import NodeRecord, TaskermanParams, WorkItem, WorkqueueArgs
from taskcore.core.model import Task as TaskSpec
from taskcore.core.settings import Settings
from taskerman_dev.launchers import NatsServer, ZooKeeperServer
from taskerman_runner import attempt
from taskerman_runner.worker import NodeWorker

NODE = "n1"


class CountingStatus(StatusStore):
    """The real store, counting the reads and writes of node records."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.node_writes: list[NodeRecord] = []
        self.node_reads = 0

    async def put_node(self, task_id: str, node: str, rec: NodeRecord) -> None:
        self.node_writes.append(rec)
        await super().put_node(task_id, node, rec)

    async def get_node(self, task_id: str, node: str) -> NodeRecord | None:
        self.node_reads += 1
        return await super().get_node(task_id, node)


@pytest.fixture
def settings(
    nats_server: NatsServer,
    zk_server: ZooKeeperServer,
    prefix: str,
    tmp_path: Path,
    signing_keys: dict[str, Any],
) -> Settings:
    return Settings(
        **signing_keys,
        nats_url=nats_server.url,
        zk_hosts=zk_server.hosts,
        zk_chroot=f"/{prefix}",
        home=tmp_path,
        ack_wait=6.0,
    )


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.provision(js, settings)
    yield js
    await bus.close(nc)


@pytest.fixture
async def zk(settings: Settings) -> AsyncIterator[ZkSession]:
    async with ZkSession.from_settings(settings) as zk:
        yield zk


async def drain_one(
    js: JetStreamContext, zk: ZkSession, settings: Settings, cluster: str, task: TaskSpec
) -> tuple[int, CountingStatus]:
    """Publish the task's item for NODE as the router does, then drain the node once."""
    status = CountingStatus(await bus.status_bucket(js))
    worker = NodeWorker(
        js=js,
        status=status,
        zk=zk,
        registry=ActionRegistry.installed(),
        settings=settings,
        cluster=cluster,
        node=NODE,
    )
    await worker.start()
    item = WorkItem(task=task, node=NODE, routed_at=time.time())
    await bus.publish_work(  # signed, as the router does
        js,
        signing.signer_for(settings),
        subjects.node_subject(cluster, NODE),
        msgspec.json.encode(item),
        subjects.work_msg_id(task.task_id, NODE),
    )
    return await worker.drain(), status


def sleep_task(prefix: str, cluster: str, name: str, retries: int = 3, **args: Any) -> TaskSpec:
    params = TaskermanParams(action_args={"seconds": 0.1, **args}, workqueue_args=WorkqueueArgs(retries))
    task_id = f"{prefix}-{name}"
    return TaskSpec(action="test:sleep", cluster_name=cluster, task_id=task_id, taskerman_params=params)


async def test_happy_path_reads_the_record_once_and_writes_it_three_times(
    js: JetStreamContext, zk: ZkSession, settings: Settings, prefix: str
) -> None:
    cluster = f"{prefix}-c"
    task = sleep_task(prefix, cluster, "ok")
    unsettled, status = await drain_one(js, zk, settings, cluster, task)

    assert unsettled == 0
    rec = await status.get_node(task.task_id, NODE)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.failures, rec.error) == ("succeeded", 1, 0, None)
    assert rec.started_at is not None
    assert rec.finished_at is not None
    assert rec.finished_at >= rec.started_at
    assert rec.first_attempt_at == rec.started_at
    assert rec.token is not None
    # exactly three writes: running, the side effect done (before post_check), then the outcome
    running, executed, succeeded = status.node_writes
    assert (running.state, running.attempts, running.finished_at, running.executed) == (
        "running",
        1,
        None,
        False,
    )
    assert running.token == rec.token
    assert (executed.state, executed.executed) == ("running", True)
    assert succeeded == rec
    assert status.node_reads == 2  # the attempt's one read, and ours above
    kinds = [e.kind for e in await audit.task_events(js, task.task_id)]
    assert kinds == [
        "lease-acquired",
        "pre_check-passed",
        "execute_action-passed",
        "post_check-passed",
        "succeeded",
    ]
    assert not [d for _, d in await deadletter.entries(js) if d.task_id == task.task_id]


async def test_failure_without_retries_ends_dead_with_a_dead_letter(
    js: JetStreamContext, zk: ZkSession, settings: Settings, prefix: str
) -> None:
    cluster = f"{prefix}-c"
    task = sleep_task(prefix, cluster, "fail", retries=0, fail=True)
    unsettled, status = await drain_one(js, zk, settings, cluster, task)

    assert unsettled == 1
    rec = await status.get_node(task.task_id, NODE)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.failures) == ("dead", 1, 1)
    assert rec.error is not None
    assert rec.error.startswith("ActionFailed: ")
    assert "told to fail on n1" in rec.error
    assert [w.state for w in status.node_writes] == ["running", "running", "dead"]  # started, counted, dead
    [letter] = [d for _, d in await deadletter.entries(js) if d.task_id == task.task_id]
    assert (letter.cluster, letter.node, letter.deliveries) == (cluster, NODE, 1)
    assert letter.reason == rec.error
    assert letter.first_attempt_at == rec.first_attempt_at
    kinds = [e.kind for e in await audit.task_events(js, task.task_id)]
    assert kinds[-3:] == ["execute_action-failed", "dead-lettered", "stopped"]  # max_failures 0
    assert "retried" not in kinds


async def test_a_zookeeper_failure_in_the_lease_wait_is_not_a_failure_and_keeps_the_side_effect(
    js: JetStreamContext, zk: ZkSession, settings: Settings, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos run's one duplicate: a delivery resumed after its side effect (record `running`,
    `executed`) met a ZooKeeper timeout in its lease wait, which was counted as a failure and
    cleared `executed`, so the retry ran execute_action again. Now it goes back uncounted, and the
    retry resumes at post_check."""
    cluster = f"{prefix}-c"
    task = sleep_task(prefix, cluster, "resumed")
    status = StatusStore(await bus.status_bucket(js))
    lost = NodeRecord(state="running", attempts=1, executed=True, started_at=time.time())
    await status.put_node(task.task_id, NODE, lost)  # what a runner that lost its ack left
    real = attempt.clusters.read_config
    calls = 0

    async def flaky(zk: ZkSession, cluster: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise zk_exc.TimeoutError("zookeeper did not answer")
        return await real(zk, cluster)

    monkeypatch.setattr(attempt.clusters, "read_config", flaky)
    unsettled, _ = await drain_one(js, zk, settings, cluster, task)
    assert unsettled == 0
    rec = await status.get_node(task.task_id, NODE)
    assert rec is not None
    assert (rec.state, rec.failures, rec.executed) == ("succeeded", 0, True)
    kinds = [e.kind for e in await audit.task_events(js, task.task_id)]
    assert "released" in kinds, kinds
    assert "execute_action-passed" not in kinds, kinds  # the side effect did not run again
    assert kinds[-2:] == ["post_check-passed", "succeeded"], kinds


async def test_a_failed_look_after_the_leases_were_taken_releases_them(
    js: JetStreamContext, zk: ZkSession, settings: Settings, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The short chaos run's stuck node: the look at the task's stop and pause records right after
    the leases were taken timed out on NATS; the leases stayed held by the live session, and the
    item's next delivery waited for its own slot (limit 1) for ever. Now they are released with
    the item, and the next delivery takes them and succeeds."""
    cluster = f"{prefix}-c"
    task = sleep_task(prefix, cluster, "look")
    real = attempt.Attempt._stop_or_pause
    calls = 0

    async def flaky(self: attempt.Attempt) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the look after the take (the first is the lease wait's own)
            raise nats_errors.TimeoutError
        return await real(self)

    monkeypatch.setattr(attempt.Attempt, "_stop_or_pause", flaky)
    unsettled, status = await asyncio.wait_for(drain_one(js, zk, settings, cluster, task), 60)
    assert unsettled == 0
    rec = await status.get_node(task.task_id, NODE)
    assert rec is not None
    assert (rec.state, rec.failures, rec.attempts) == ("succeeded", 0, 1)
    assert calls >= 3  # the look failed once, then the released item came back
    assert not await FairSemaphore(zk, lease_path(task.task_id), 1).holder_ids()
