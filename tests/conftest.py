"""Session-wide real servers and per-test name prefixes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from taskerman_dev.launchers import NatsServer, ZooKeeperServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server with JetStream, shared by the whole session."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """A real standalone ZooKeeper, shared by the whole session."""
    with ZooKeeperServer(tmp_path_factory.mktemp("zookeeper")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A short unique name for this test's streams, subjects and znode chroot."""
    return "t" + secrets.token_hex(4)
