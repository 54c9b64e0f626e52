"""Session-wide real servers (secured), keys and per-test name prefixes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskcore.bus import jetstream as bus
from taskcore.coord import acl
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings
from taskcore.core.signing import Signer
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.launchers import NatsServer, ZooKeeperServer


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's keys live (`taskerman_dev.secrets`), as under a dev stack's home."""
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def nats_users(stack_home: Path) -> dict[str, str]:
    """Role → public nkey: the NATS users every test server is secured with."""
    return stack_secrets.nats_users(stack_home)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, nats_users: dict[str, str]) -> Iterator[NatsServer]:
    """A real nats-server with JetStream, shared by the whole session, secured as every stack is:
    a user per role with its permissions (tests connect as admin, each process as its role)."""
    with NatsServer(tmp_path_factory.mktemp("nats"), users=nats_users) as server:
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


@pytest.fixture(scope="session")
def zk_credentials(signing_keys: dict[str, Any]) -> dict[str, Any]:
    """`ZkSession(...)` keywords of the harness' ZooKeeper identity and the stacks' ACL: a test
    that opens its own session does so authenticated, and what it creates is closed to anyone
    else, as on every stack (`taskcore/coord/acl.py`)."""
    return {
        "auth": acl.read_auth(signing_keys["zk_auth"]),
        "acl": acl.parse(signing_keys["zk_acl"]),
    }


@pytest.fixture
async def zk_session(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> AsyncIterator[ZkSession]:
    """An authenticated ZooKeeper session (6 s) in this test's own chroot."""
    async with ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) as session:
        yield session


@pytest.fixture(scope="session")
def signing_keys(stack_home: Path) -> dict[str, Any]:
    """The Settings fields of signed work items (a router and an admin seed, both trusted) and of
    the harness' NATS user (admin), made as `taskerman dev up` makes them: every test's settings
    carry them, so the whole suite runs signed and authenticated."""
    return stack_secrets.generate(stack_home)


@pytest.fixture(scope="session")
def signer(signing_keys: dict[str, Any]) -> Signer:
    """The router's signer, for a test that publishes a work item itself, as the router would."""
    return Signer.load(signing_keys["router_seed_file"])


@pytest.fixture(scope="session")
def nats_auth(signing_keys: dict[str, Any]) -> dict[str, str]:
    """`nats.connect` options that authenticate as the harness (admin), for a test's own client."""
    return bus.credentials(Settings(**signing_keys))
