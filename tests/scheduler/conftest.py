"""Scheduler tests use the end-to-end fixtures: a fresh nats-server per test, the session's
ZooKeeper under a per-test chroot, and `Stack` for real processes; plus a ZooKeeper session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings
from tests.e2e.conftest import js, nats_fresh, settings, stack, status

__all__ = ["js", "nats_fresh", "settings", "stack", "status", "zk"]


@pytest.fixture
async def zk(settings: Settings) -> AsyncIterator[ZkSession]:
    async with ZkSession.from_settings(settings) as session:
        yield session
