"""ZooKeeper digest ACLs against a real server: what the services create, an anonymous client can
neither read, create, set nor delete; a reader reads only; the identity survives a reconnection;
a wrong password is said plainly at start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiozk import ZKClient, exc

from taskcore.coord import acl
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings
from taskerman_dev.launchers import ZooKeeperServer

SERVICE = ("service", "s3cret-service")
READER = ("reader", "s3cret-reader")
RULES = (acl.entry(*SERVICE, acl.SERVICE_PERMS), acl.entry(*READER, acl.READER_PERMS))


def settings(zk_server: ZooKeeperServer, chroot: str, tmp_path: Path, who: tuple[str, str]) -> Settings:
    auth = tmp_path / f"zk-{who[0]}.pw"
    auth.write_text(f"{who[0]}:{who[1]}\n")
    return Settings(
        zk_hosts=zk_server.hosts, zk_chroot=chroot, zk_session_timeout=6.0, zk_auth=auth, zk_acl=RULES
    )


@pytest.fixture
async def service(zk_server: ZooKeeperServer, prefix: str, tmp_path: Path) -> AsyncIterator[ZkSession]:
    async with ZkSession.from_settings(settings(zk_server, f"/{prefix}-acl", tmp_path, SERVICE)) as zk:
        yield zk


@pytest.fixture
async def anonymous(zk_server: ZooKeeperServer, prefix: str) -> AsyncIterator[ZKClient]:
    client = ZKClient(zk_server.hosts, chroot=f"/{prefix}-acl", session_timeout=6.0)
    await client.session.start()  # not `start`: that would create the chroot
    yield client
    await client.close()


async def test_an_anonymous_client_can_neither_read_create_set_nor_delete(
    service: ZkSession, anonymous: ZKClient
) -> None:
    sem = FairSemaphore(service, "/leases/tasks/t1", 1)
    slot = await sem.acquire("n1")
    await service.client.create("/breaker", data=b"{}")
    with pytest.raises(exc.NoAuth):
        await anonymous.get_data("/breaker")
    with pytest.raises(exc.NoAuth):
        await anonymous.set_data("/breaker", b'{"state": "closed"}')
    with pytest.raises(exc.NoAuth):
        await anonymous.create("/leases/tasks/t1/h/intruder~x", data=b"x")
    with pytest.raises(exc.NoAuth):
        await anonymous.delete(slot.path)
    with pytest.raises(exc.NoAuth):
        await anonymous.create("/planted", data=b"x")  # not even at the top of the chroot
    await sem.verify(slot)  # still ours
    await sem.release(slot)


async def test_a_reader_reads_and_changes_nothing(
    service: ZkSession, zk_server: ZooKeeperServer, prefix: str, tmp_path: Path
) -> None:
    await service.client.create("/budget", data=b"2")
    async with ZkSession.from_settings(settings(zk_server, f"/{prefix}-acl", tmp_path, READER)) as reader:
        assert await reader.client.get_data("/budget") == b"2"
        with pytest.raises(exc.NoAuth):
            await reader.client.set_data("/budget", b"100")
        with pytest.raises(exc.NoAuth):
            await reader.client.delete("/budget")


async def test_the_identity_is_sent_again_on_a_new_connection(service: ZkSession) -> None:
    conn = service.client.session.conn
    conn.writer.transport.abort()  # the connection drops: aiozk connects again, same session
    for _ in range(100):
        if service.client.session.conn is not conn and service.is_safe():
            break
        await asyncio.sleep(0.1)
    assert service.client.session.conn is not conn
    await service.client.create("/after-reconnect", data=b"ok")  # NoAuth, unless sent again
    assert await service.client.get_data("/after-reconnect") == b"ok"


async def test_a_wrong_password_is_said_plainly_at_start(
    service: ZkSession, zk_server: ZooKeeperServer, prefix: str, tmp_path: Path
) -> None:
    wrong = settings(zk_server, f"/{prefix}-acl", tmp_path, ("service", "not-the-password"))
    with pytest.raises(acl.ZkAuthError, match="refuses 'service' access"):
        async with ZkSession.from_settings(wrong):
            pass


def test_malformed_settings_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(acl.ZkAuthError, match="not an ACL entry"):
        acl.parse(["service=rwcda"])
    with pytest.raises(acl.ZkAuthError, match="not an ACL entry"):
        acl.parse([acl.entry("a", "b", "rwx")])
    bad = tmp_path / "auth"
    bad.write_text("no-colon\n")
    with pytest.raises(acl.ZkAuthError, match="user:password"):
        acl.read_auth(bad)
    with pytest.raises(acl.ZkAuthError, match="cannot read"):
        acl.read_auth(tmp_path / "missing")
