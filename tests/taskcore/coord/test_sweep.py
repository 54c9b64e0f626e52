"""The lease folder garbage collector on a real ZooKeeper: folders whose last holder died without
releasing are deleted; a semaphore someone holds or waits in is left alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from taskcore.coord import clusters, sweep
from taskcore.coord.leases import lease_path
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskerman_dev.launchers import ZooKeeperServer


@pytest.fixture
def zk(zk_session: ZkSession) -> ZkSession:
    return zk_session


async def test_abandoned_folders_are_swept_and_used_ones_kept(
    zk_credentials: dict[str, Any], zk: ZkSession, zk_server: ZooKeeperServer, prefix: str
) -> None:
    abandoned = [
        lease_path("dead-task"),
        f"{lease_path('dead-task')}~topology",
        clusters.cluster_path("c1", "budget"),
        clusters.cluster_path("c1", "exclusion", "io"),
        "/global/test%3Asleep",
    ]
    async with ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) as dying:
        for path in abandoned:  # each held when its holder's session ends, never released
            await FairSemaphore(dying, path, 1).acquire("n1", max_wait=10)
    held = FairSemaphore(zk, lease_path("live-task"), 1)
    slot = await held.acquire("n2", max_wait=10)
    waiter = asyncio.create_task(held.acquire("n3", max_wait=30))
    for _ in range(500):
        if await held.waiting() == 1:
            break
        await asyncio.sleep(0.01)
    assert set(await sweep.semaphore_folders(zk)) == {*abandoned, lease_path("live-task")}

    assert await sweep.sweep(zk) == len(abandoned)
    for path in abandoned:
        assert await zk.client.exists(path) is False, path
    assert len(await held.holder_ids()) == 1
    assert await held.waiting() == 1
    await held.release(slot)  # the waiter still gets its turn: nothing of its semaphore was swept
    second = await waiter
    await held.release(second)
    assert await sweep.sweep(zk) == 0  # the last one out cleaned up itself
    assert await sweep.semaphore_folders(zk) == []
