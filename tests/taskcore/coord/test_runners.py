"""Which nodes are served, on a real ZooKeeper: a registered runner, an away note still valid, or
neither (`unserved`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskcore.coord import runners
from taskcore.coord.runners import Registration
from taskcore.coord.session import ZkSession
from taskerman_dev.launchers import ZooKeeperServer


@pytest.fixture
async def zk(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> AsyncIterator[ZkSession]:
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as session:
        yield session


async def test_a_node_without_a_runner_is_unserved(zk: ZkSession) -> None:
    assert await runners.unserved(zk, "c", ["a", "b"], time.time()) == ["a", "b"]
    await Registration(zk, "c", "a", "1", []).register()
    assert await runners.unserved(zk, "c", ["b", "a", "ü b"], time.time()) == ["b", "ü b"]
    assert await runners.unserved(zk, "other", ["a"], time.time()) == ["a"]  # per cluster


async def test_many_names_are_answered_from_one_listing_as_few_are_one_by_one(zk: ZkSession) -> None:
    """Past LOOKUPS_UP_TO names `unserved` lists the registry instead of looking each up: the same
    answer, in the order asked."""
    names = [f"n{i:02d}" for i in range(runners.LOOKUPS_UP_TO + 4)]
    for name in names[::2]:
        await Registration(zk, "c", name, "1", []).register()
    now = time.time()
    expected = names[1::2]
    assert await runners.unserved(zk, "c", names[::-1], now) == expected[::-1]  # one listing
    few = names[: runners.LOOKUPS_UP_TO]
    assert await runners.unserved(zk, "c", few, now) == [n for n in expected if n in few]  # lookups


async def test_an_away_note_keeps_a_node_served_for_its_grace(
    zk_credentials: dict[str, Any], zk: ZkSession, zk_server: ZooKeeperServer, prefix: str
) -> None:
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as runner_zk:
        reg = Registration(runner_zk, "c", "cron", "1", [], away_grace=60)
        await reg.register()
        await reg.leave()
        none = Registration(runner_zk, "c", "plain", "1", [])  # no away_grace: no note
        await none.register()
        await none.leave()
    # both runners' sessions are closed: their registrations are gone, only the note is left
    now = time.time()
    assert await runners.unserved(zk, "c", ["cron", "plain"], now) == ["plain"]
    assert await runners.unserved(zk, "c", ["cron"], now + 61) == ["cron"]  # the note expired
    await Registration(zk, "c", "cron", "1", []).register()  # back: the note is removed
    assert await zk.client.exists(runners.away_path("c", "cron")) is False
