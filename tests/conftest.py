"""Session-wide real servers, signing keys and per-test name prefixes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from taskcore.core.signing import Signer
from taskerman_dev import secrets as stack_secrets
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


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Settings fields of signed work items (a router and an admin seed, both trusted), made
    as `taskerman dev up` makes them: every test's settings carry them, so the whole suite runs signed."""
    return stack_secrets.generate(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def signer(signing_keys: dict[str, Any]) -> Signer:
    """The router's signer, for a test that publishes a work item itself, as the router would."""
    return Signer.load(signing_keys["router_seed_file"])
