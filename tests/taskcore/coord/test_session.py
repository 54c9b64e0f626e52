"""A ZooKeeper session and its watches keep a cancellation, however it is timed: Python 3.11's
`asyncio.wait_for` loses one that arrives just as its awaitable completes (a CI teardown waited
for ever on a liveness monitor that had swallowed its cancellation)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiozk import WatchEvent

from taskcore.coord import watches
from taskcore.coord.session import ZkSession
from taskerman_dev.launchers import ZooKeeperServer


async def test_closing_stops_the_monitor_cancelled_just_as_its_ping_answers(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    session = ZkSession(zk_server.hosts, f"/{prefix}", 3.0, **zk_credentials)
    await session.__aenter__()
    monitor = session._monitor
    assert monitor is not None
    exists = session.client.exists

    async def ping_then_cancel_the_monitor(path: str) -> Any:
        answer = await exists(path)
        monitor.cancel()  # the ping has answered: its result and the cancellation arrive together
        return answer

    session.client.exists = ping_then_cancel_the_monitor  # type: ignore[method-assign]
    for _ in range(100):  # until the monitor pings again (every timeout/6 s)
        if monitor.done():
            break
        await asyncio.sleep(0.05)
    assert monitor.cancelled(), "the monitor lost its cancellation and pings on"
    await asyncio.wait_for(session.__aexit__(None, None, None), 10)


async def test_a_watch_cancelled_just_as_it_fires_is_cancelled(zk_session: ZkSession) -> None:
    await zk_session.client.ensure_path("/watched")
    pending_when_cancelled = 0
    for turns in range(4):  # the cancellation comes 0..3 loop turns after the event
        watch = watches.Watch(zk_session.client, [WatchEvent.DATA_CHANGED], "/watched")
        waiting = asyncio.create_task(watch.wait(backstop=30))
        await asyncio.sleep(0.01)
        watch._fire("/watched")
        for _ in range(turns):
            await asyncio.sleep(0)
        if waiting.done():  # it saw the event before the cancellation: nothing to lose
            watch.close()
            continue
        pending_when_cancelled += 1
        waiting.cancel()
        await asyncio.wait({waiting}, timeout=5)
        watch.close()
        assert waiting.cancelled(), f"cancelled {turns} turn(s) after the event, the wait returned"
    assert pending_when_cancelled >= 1
