"""Connections for short-lived commands: the services reconnect forever, a command must instead
fail within seconds with a clear error naming the server it could not reach."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS

from taskcore.bus import jetstream as bus
from taskcore.coord.session import ZkSession
from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings

CONNECT_TIMEOUT = 15.0


class Unreachable(TaskermanError):
    """A server a command needs did not answer in time."""


async def nats(settings: Settings, name: str = "taskerman-cli") -> NATS:
    """A NATS connection, or Unreachable after CONNECT_TIMEOUT."""
    try:
        return await asyncio.wait_for(bus.connect(settings, name), CONNECT_TIMEOUT)
    except Exception as e:
        raise Unreachable(f"NATS at {settings.nats_url} is unreachable: {e!r}") from e


@contextlib.asynccontextmanager
async def zookeeper(settings: Settings) -> AsyncIterator[ZkSession]:
    """A ZooKeeper session, or Unreachable after CONNECT_TIMEOUT."""
    session = ZkSession.from_settings(settings)
    try:
        await asyncio.wait_for(session.__aenter__(), CONNECT_TIMEOUT)
    except TimeoutError as e:
        await session.__aexit__(None, None, None)
        raise Unreachable(f"ZooKeeper at {settings.zk_hosts} did not answer in {CONNECT_TIMEOUT:g}s") from e
    try:
        yield session
    finally:
        await session.__aexit__(None, None, None)
