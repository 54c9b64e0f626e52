"""A node waiting for its task's slot, in the test's own event loop against the session's real
nats-server and ZooKeeper: while it waits it sends ZooKeeper nothing about its leases and spends
no JetStream deliveries, and a stop of its task ends the wait at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore, StopRecord
from taskcore.coord.leases import lease_path
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core import signing, subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.model import Task as TaskSpec
from taskcore.core.model import TaskermanParams, WorkItem
from taskcore.core.settings import Settings
from taskerman_dev.launchers import NatsServer, ZooKeeperServer
from taskerman_runner.worker import NodeWorker

NODE = "n1"


@pytest.fixture
def settings(
    nats_server: NatsServer,
    zk_server: ZooKeeperServer,
    prefix: str,
    tmp_path: Path,
    signing_keys: dict[str, Any],
) -> Settings:
    """A short ack wait and few deliveries: a wait of a few seconds outlasts them all."""
    return Settings(
        **signing_keys,
        nats_url=nats_server.url,
        zk_hosts=zk_server.hosts,
        zk_chroot=f"/{prefix}",
        home=tmp_path,
        ack_wait=1.0,
        max_deliver=2,
    )


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.provision(js, settings)
    yield js
    await bus.close(nc)


def counting(zk: ZkSession) -> list[str]:
    """Record the path (or type) of every request the session sends from now on."""
    sent: list[str] = []
    session = zk.client.session
    send: Callable[[Any], Any] = session.send

    async def counted(request: Any) -> Any:
        sent.append(getattr(request, "path", type(request).__name__))
        return await send(request)

    session.send = counted
    return sent


async def wait_until(check: Callable[[], Any], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met in {within}s")


async def test_a_waiting_node_costs_nothing_and_a_stop_ends_its_wait(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    cluster = f"{prefix}-c"
    params = TaskermanParams(action_args={"seconds": 0.1})
    task = TaskSpec(
        action="test:sleep", cluster_name=cluster, task_id=f"{prefix}-wait", taskerman_params=params
    )
    status = StatusStore(await bus.status_bucket(js))
    async with ZkSession.from_settings(settings) as ours, ZkSession.from_settings(settings) as theirs:
        slot = FairSemaphore(ours, lease_path(task.task_id), 1)
        held = await slot.acquire("someone-else")  # the slot is taken: the node must wait
        worker = NodeWorker(
            js=js,
            status=status,
            zk=theirs,
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
        draining = asyncio.create_task(worker.drain())

        async def queued() -> bool:
            return await slot.waiting() == 1

        await wait_until(queued, 10)
        sent = counting(theirs)
        window = 3 * settings.ack_wait * settings.max_deliver  # 6 s: three times what deliveries allow
        await asyncio.sleep(window)
        chroot = settings.zk_chroot
        paths = sorted({p.removeprefix(chroot) or "/" for p in sent})
        print(f"while waiting {window:.0f}s the node sent {len(sent)} ZooKeeper request(s): {paths}")
        # the session's liveness pings of the root and the registry heartbeat, nothing about leases
        assert all(p == "/" or p.startswith("/registry") for p in paths), paths
        assert len(sent) <= window
        info = await js.consumer_info(subjects.WORK_STREAM, subjects.runner_durable(cluster, NODE))
        assert info.delivered is not None
        assert (info.delivered.consumer_seq, info.num_redelivered, info.num_ack_pending) == (1, 0, 1), info
        assert not draining.done()

        began = time.monotonic()
        await status.stop(task.task_id, StopRecord(reason="cancelled", by="test", at=time.time()))

        async def cancelled() -> bool:
            rec = await status.get_node(task.task_id, NODE)
            return rec is not None and rec.state == "cancelled"

        await wait_until(cancelled, 5)
        print(f"the stop ended the wait in {time.monotonic() - began:.2f}s")
        unsettled = await asyncio.wait_for(draining, 10)
        assert unsettled == 0
        rec = await status.get_node(task.task_id, NODE)
        assert rec is not None
        assert (rec.state, rec.attempts) == ("cancelled", 0)
        assert await slot.waiting() == 0
        assert (await js.stream_info(subjects.WORK_STREAM)).state.messages == 0  # acked unrun
        await slot.release(held)
