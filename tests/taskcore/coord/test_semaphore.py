"""The lease semaphore as m-of-n on a real ZooKeeper: never more than m holders, fencing tokens,
ghost creates, crash recovery, clean-up."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from typing import Any

import pytest

from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core.errors import LeaseLost
from taskerman_dev.launchers import ZooKeeperServer


async def test_twenty_acquirers_limit_three(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    holders = 0
    peak = 0
    tokens: list[int] = []
    sessions = [ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) for _ in range(4)]
    for s in sessions:
        await s.__aenter__()
    try:

        async def worker(i: int) -> None:
            nonlocal holders, peak
            sem = FairSemaphore(sessions[i % len(sessions)], "/leases/sem", 3)
            for _ in range(3):
                slot = await sem.acquire(f"w{i}", max_wait=60)
                holders += 1
                peak = max(peak, holders)
                tokens.append(slot.token)
                await sem.verify(slot)
                await asyncio.sleep(0.01)
                holders -= 1
                await sem.release(slot)

        await asyncio.gather(*(worker(i) for i in range(20)))
    finally:
        for s in sessions:
            await s.__aexit__(None, None, None)
    assert peak == 3
    assert len(tokens) == 60
    assert len(set(tokens)) == 60  # every grant has its own fencing token


async def test_fencing_tokens_increase_and_stale_slot_fails_verify(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as zk:
        sem = FairSemaphore(zk, "/leases/t", 1)
        first = await sem.acquire("a")
        await sem.release(first)
        second = await sem.acquire("b")
        assert second.token > first.token
        with pytest.raises(LeaseLost):
            await sem.verify(first)  # the old holder may not act on the slot any more
        await sem.verify(second)
        with pytest.raises(TimeoutError):
            await sem.acquire("c", max_wait=0.5)
        await sem.release(second)
        assert await sem.holder_ids() == []


async def test_ghost_create_is_found_again(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    """A take that landed but whose reply was lost (aiozk retries it, and the retry fails) must
    find its own holder node again, not take a second one."""
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as zk:
        sem = FairSemaphore(zk, "/leases/ghost", 2)
        await zk.client.ensure_path("/leases/ghost/h")
        await zk.client.create("/leases/ghost/h/own~abc", data=b"me#abc", ephemeral=True)  # the ghost
        slot = await sem._take(0, "own", "abc", "me#abc")  # the version moved: only our node decides
        assert slot is not None
        assert slot.path.endswith("/h/own~abc")
        assert await sem.holder_ids() == ["me#abc"]


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from taskcore.coord.semaphore import FairSemaphore
    from taskcore.coord.session import ZkSession
    from taskcore.core.settings import Settings

    async def main():
        hosts, chroot, auth, acl = sys.argv[1:]
        settings = Settings(
            zk_hosts=hosts,
            zk_chroot=chroot,
            zk_session_timeout=2.0,
            zk_auth=Path(auth),
            zk_acl=tuple(acl.split(",")),
        )
        async with ZkSession.from_settings(settings) as zk:
            sem = FairSemaphore(zk, "/leases/crash", 1)
            await sem.acquire("victim")
            print("held", flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def test_killed_holder_frees_its_slot_within_session_timeout(
    zk_credentials: dict[str, Any], signing_keys: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    secured = (str(signing_keys["zk_auth"]), ",".join(signing_keys["zk_acl"]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, zk_server.hosts, f"/{prefix}", *secured, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"held"
        async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as zk:
            sem = FairSemaphore(zk, "/leases/crash", 1)
            with pytest.raises(TimeoutError):
                await sem.acquire("waiter", max_wait=1.0)  # held by the live process
            proc.kill()
            killed = time.monotonic()
            slot = await sem.acquire("waiter", max_wait=30)
            waited = time.monotonic() - killed
            await sem.release(slot)
        # session timeout 2 s (ZooKeeper may round it up to its minimum): the slot frees by expiry
        assert waited < 15, waited
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_emptied_lease_folder_is_reaped(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    """The last holder out deletes the per-task lease folder: finished tasks leave no garbage."""
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as zk:
        sem = FairSemaphore(zk, "/leases/tasks/finished-task", 2)
        first, second = await sem.acquire("n1"), await sem.acquire("n2")
        await sem.release(first)
        assert await zk.client.exists("/leases/tasks/finished-task")  # n2 still holds a slot
        await sem.release(second)
        assert not await zk.client.exists("/leases/tasks/finished-task")
        again = await sem.acquire("n3", max_wait=5)  # a late node of the task recreates it
        await sem.release(again)


async def test_a_partly_cleaned_folder_is_cleaned_up_too(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    async with ZkSession(zk_server.hosts, f"/{prefix}", 4.0, **zk_credentials) as zk:
        sem = FairSemaphore(zk, "/leases/tasks/partial", 1)
        slot = await sem.acquire("n1")
        await zk.client.delete("/leases/tasks/partial/q")  # someone else's clean-up got this far
        await sem.release(slot)
        assert not await zk.client.exists("/leases/tasks/partial")
