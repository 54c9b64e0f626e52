"""ZooKeeper ACLs on a running stack (real router and runner processes, each with its own ZooKeeper
identity from the stack's settings): what they create (the chroot, registrations, leases, the
breaker, the cluster's config) is closed to an anonymous client, readable by the reader identity
only as a reader, and a runner given a wrong password says so and exits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from aiozk import ZKClient, exc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore
from taskcore.coord import acl, clusters
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings
from taskerman_dev import secrets as stack_secrets

from .conftest import BIN, Stack, publish_raw, wait_final
from .node_runners import task


async def test_what_the_stack_creates_is_closed_to_anonymous_clients(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, settings: Settings
) -> None:
    stack.router()
    stack.runner("c1", ["n1", "n2"])
    await publish_raw(js[1], task("acl-1", "test:sleep", ["n1", "n2"], args={"seconds": 0.05}))
    assert (await wait_final(status, "acl-1", stack=stack)).state == "succeeded"
    async with ZkSession.from_settings(settings) as admin:
        await clusters.set_budget(admin, "c1", 2)
        created = [
            p for p in ("/registry", "/registry-processes", "/clusters") if await admin.client.exists(p)
        ]
        assert created  # the services made their folders
        for path in ["/", *created]:
            assert all(a.id.scheme == "digest" for a in await admin.client.get_acl(path)), path
    anonymous = ZKClient(settings.zk_hosts, chroot=settings.zk_chroot, session_timeout=6.0)
    await anonymous.session.start()
    try:
        for path in ["/", *created]:
            with pytest.raises(exc.NoAuth):
                await anonymous.get_children(path)
        with pytest.raises(exc.NoAuth):
            await anonymous.create("/clusters/planted", data=b"{}")
    finally:
        await anonymous.close()
    reader = stack_secrets.as_role(settings, "observer")
    async with ZkSession.from_settings(reader) as observer:
        assert await observer.client.get_children("/")
        with pytest.raises(exc.NoAuth):
            await clusters.set_budget(observer, "c1", 100)


def test_a_runner_with_a_wrong_zookeeper_password_says_so_and_exits(stack: Stack, tmp_path: Path) -> None:
    wrong = tmp_path / "zk-wrong.pw"
    wrong.write_text("service:not-the-password\n")
    done = subprocess.run(
        [str(BIN / "taskerman-runner"), "--cluster", "c1", "--node", "n1"],
        env={**stack.env(), acl.AUTH_ENV: str(wrong)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "ZooKeeper refuses 'service' access" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
