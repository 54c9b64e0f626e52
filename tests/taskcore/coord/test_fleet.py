"""The fleet read model on a real ZooKeeper: cluster names, recorded breakers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskcore.coord import clusters, fleet
from taskcore.coord.clusters import BreakerPolicy
from taskcore.coord.session import ZkSession
from taskerman_dev.launchers import ZooKeeperServer

POLICY = BreakerPolicy(threshold=2, window=60.0, cooldown=0.0)


@pytest.fixture
async def zk(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> AsyncIterator[ZkSession]:
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as session:
        yield session


async def test_an_empty_fleet(zk: ZkSession) -> None:
    assert await fleet.children(zk, "/clusters") == []
    assert await fleet.cluster_names(zk) == []
    assert await fleet.breakers(zk, POLICY, time.time()) == []
    assert (await fleet.breaker(zk, "c", POLICY, time.time())).state == "closed"


async def test_breakers_of_every_cluster_that_recorded_one(zk: ZkSession) -> None:
    await clusters.set_budget(zk, "no breaker", 2)  # a cluster znode without a breaker
    tripped = clusters.Breaker(zk, "cass geo:ü", POLICY)
    await tripped.record_failure("post_check failed", trip=True)
    await clusters.Breaker(zk, "once", POLICY).record_failure("one failure")
    await zk.client.create("/clusters/not=a=token")  # foreign: left out
    await zk.client.create(clusters.cluster_path("corrupt"))
    await zk.client.create(clusters.cluster_path("corrupt", "breaker"), data=b"{not json")

    assert set(await fleet.cluster_names(zk)) == {"no breaker", "cass geo:ü", "once", "corrupt"}
    readings = {b.cluster: b for b in await fleet.breakers(zk, POLICY, time.time())}
    assert set(readings) == {"cass geo:ü", "once"}  # no record, and an unreadable one, are left out
    assert readings["cass geo:ü"].state == "open"
    assert readings["cass geo:ü"].record.reason == "post_check failed"
    assert readings["once"].state == "closed"
    assert fleet.znode_name("not=a=token") == "not=a=token"
