"""The fair semaphore on a real ZooKeeper: the limit, arrival and plan order, strictly increasing
fencing tokens, shared owners, no herd (requests per release do not grow with the waiters), and
nothing left behind by cancelled waits."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import pytest

from taskcore.coord import watches
from taskcore.coord.leases import Lease, LeaseSet, QueuedLease
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import Slot, ZkSession
from taskcore.core.errors import LeaseLost
from taskerman_dev.launchers import ZooKeeperServer
from taskerman_dev.zkstats import packets_received


@pytest.fixture
def zk(zk_session: ZkSession) -> ZkSession:
    return zk_session


async def _queued(sem: FairSemaphore, n: int) -> None:
    """Until `n` waiters are in the queue."""
    for _ in range(500):
        if await sem.waiting() >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} waiters never queued")


async def test_two_hundred_acquirers_limit_five_in_arrival_order(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    sessions = [ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) for _ in range(8)]
    for s in sessions:
        await s.__aenter__()
    holding = 0
    peak = 0
    granted: list[tuple[int, int]] = []  # (arrival index, token) in grant order
    try:
        sems = [FairSemaphore(s, "/leases/fair", 5) for s in sessions]

        async def acquirer(i: int) -> None:
            nonlocal holding, peak
            sem = sems[i % len(sems)]
            slot = await sem.acquire(f"w{i}", max_wait=120)
            holding += 1
            peak = max(peak, holding)
            granted.append((i, slot.token))
            await asyncio.sleep(0.002)
            holding -= 1
            await sem.release(slot)

        tasks = []
        for i in range(200):  # each queues before the next starts: arrival order is i
            tasks.append(asyncio.create_task(acquirer(i)))
            for _ in range(200):
                if len(granted) + await sems[0].waiting() >= i + 1:
                    break
                await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    finally:
        for s in sessions:
            await s.__aexit__(None, None, None)
    assert peak <= 5
    assert len(granted) == 200
    order = [i for i, _ in granted]
    # served in arrival order; the five that hold at once may record their grant in any order
    assert all(abs(pos - i) < 5 for pos, i in enumerate(order)), order
    tokens = sorted(t for _, t in granted)
    assert len(set(tokens)) == 200
    by_arrival = [t for _, t in sorted(granted)]
    assert all(a < b for a, b in itertools.pairwise(by_arrival))  # tokens follow the turns


async def test_plan_positions_are_served_in_order(zk: ZkSession) -> None:
    sem = FairSemaphore(zk, "/leases/plan", 1)
    first = await sem.acquire("blocker")
    order: list[int] = []
    positions = list(range(1, 21))
    random.Random(7).shuffle(positions)

    async def waiter(position: int) -> None:
        slot = await sem.acquire(f"n{position}", position=position, max_wait=60)
        order.append(position)
        await sem.release(slot)

    tasks = [asyncio.create_task(waiter(p)) for p in positions]
    await _queued(sem, 20)
    await sem.release(first)
    await asyncio.gather(*tasks)
    assert order == sorted(positions)


async def test_tokens_increase_and_a_stale_slot_fails_verify(zk: ZkSession) -> None:
    sem = FairSemaphore(zk, "/leases/t", 1)
    first = await sem.acquire("a")
    with pytest.raises(TimeoutError):
        await sem.acquire("b", max_wait=0.3)
    await sem.release(first)
    second = await sem.acquire("b")
    assert second.token > first.token
    with pytest.raises(LeaseLost):
        await sem.verify(first)
    await sem.verify(second)
    await sem.release(second)
    assert not await zk.client.exists("/leases/t")  # the last one out cleaned up


async def test_shared_owner_joins_and_other_owners_wait(zk: ZkSession) -> None:
    sem = FairSemaphore(zk, "/leases/excl", 1)
    a1 = await sem.acquire("n1", owner="taskA")
    a2 = await sem.acquire("n2", owner="taskA", max_wait=5)  # same owner: joins at once
    b = asyncio.create_task(sem.acquire("m1", owner="taskB", max_wait=30))
    await _queued(sem, 1)
    await asyncio.sleep(0.2)
    assert not b.done()
    assert set(await sem.holders()) == {"taskA"}
    await sem.release(a1)
    await asyncio.sleep(0.2)
    assert not b.done()  # taskA still holds through n2
    await sem.release(a2)
    slot = await asyncio.wait_for(b, 10)
    assert set(await sem.holders()) == {"taskB"}
    await sem.release(slot)


async def test_cancelled_waits_leave_no_nodes_and_no_callbacks(zk: ZkSession) -> None:
    sem = FairSemaphore(zk, "/leases/cancel", 1)
    held = await sem.acquire("holder")
    before = watches.callback_count(zk.client)
    for _ in range(3):
        waiters = [asyncio.create_task(sem.acquire(f"w{i}")) for i in range(30)]
        await _queued(sem, 30)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    assert await sem.waiting() == 0
    assert watches.callback_count(zk.client) == before
    assert len(zk.client.session.watch_callbacks) <= 2  # nothing accumulates per path either
    await sem.release(held)


async def test_a_wait_cancelled_while_it_queues_leaves_no_waiter_behind(
    zk: ZkSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancellation lands after the queue node was created but before its name came back
    (the CI run's 26 waiters left by a cancelled task): the node is found by its id and deleted,
    or it would stand at the head of the queue and keep everyone behind it waiting for ever."""
    sem = FairSemaphore(zk, "/leases/cancel-queueing", 1)
    held = await sem.acquire("holder")
    create = zk.client.create

    async def created_then_cancelled(path: str, *args: object, **kwargs: object) -> str:
        name: str = await create(path, *args, **kwargs)  # type: ignore[arg-type]
        if path.startswith(f"{sem.queue}/"):
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        return name

    monkeypatch.setattr(zk.client, "create", created_then_cancelled)
    with pytest.raises(asyncio.CancelledError):
        await sem.acquire("w")
    monkeypatch.undo()
    assert await sem.waiting() == 0
    later = asyncio.create_task(sem.acquire("later"))
    await _queued(sem, 1)
    await sem.release(held)
    await sem.release(await asyncio.wait_for(later, 10))


async def _requests_per_release(zk_server: ZooKeeperServer, zk: ZkSession, path: str, waiters: int) -> float:
    sem = FairSemaphore(zk, path, 1)
    held = await sem.acquire("first")
    slots: asyncio.Queue[Slot] = asyncio.Queue()

    async def waiter(i: int) -> None:
        await slots.put(await sem.acquire(f"w{i}"))

    tasks = [asyncio.create_task(waiter(i)) for i in range(waiters)]
    await _queued(sem, waiters)
    await asyncio.sleep(0.3)
    idle_before = packets_received(zk_server.hosts)
    await asyncio.sleep(1.0)
    idle = packets_received(zk_server.hosts) - idle_before
    assert idle <= 5, f"{idle} requests while {waiters} waiters slept"  # only the liveness pings
    hand_offs = 10
    before = packets_received(zk_server.hosts)
    slot = held
    for _ in range(hand_offs):
        await sem.release(slot)
        slot = await slots.get()
    spent = packets_received(zk_server.hosts) - before
    await sem.release(slot)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    while not slots.empty():
        await sem.release(slots.get_nowait())
    return spent / hand_offs


async def test_requests_per_release_do_not_grow_with_waiters(
    zk_server: ZooKeeperServer, zk: ZkSession
) -> None:
    few = await _requests_per_release(zk_server, zk, "/leases/herd-few", 10)
    many = await _requests_per_release(zk_server, zk, "/leases/herd-many", 150)
    print(f"requests per release: {few:.1f} at 10 waiters, {many:.1f} at 150")
    assert many <= few * 1.3 + 2, (few, many)
    assert many < 20, many


async def test_a_lease_set_reports_the_lease_it_waits_for_once_before_queueing(zk: ZkSession) -> None:
    """`on_blocked` is how a waiting node says why it waits: not called for a lease granted at
    once, called once for the lease that is not, before the waiter queues (its read of the
    holders adds nothing to the wait)."""
    free = FairSemaphore(zk, "/leases/free", 1)
    full = FairSemaphore(zk, "/leases/full", 1)
    taken = await full.acquire("someone-else")
    reports: list[tuple[str, list[str], int]] = []

    async def blocked(lease: Lease) -> None:
        holders = [h.holder for h in await lease.holders()]
        reports.append((lease.name, holders, await full.waiting()))

    leases = LeaseSet([QueuedLease("free", free, "me", "me"), QueuedLease("full", full, "me", "me")])
    waiting = asyncio.create_task(leases.acquire(on_blocked=blocked))
    await _queued(full, 1)
    assert reports == [("full", [taken.holder], 0)]  # once, for the full one, before it queued
    assert not waiting.done()
    await full.release(taken)
    await asyncio.wait_for(waiting, 10)
    assert reports == [("full", [taken.holder], 0)]  # the wait itself reports nothing more
    assert [lease.name for lease, _slot in leases.held] == ["free", "full"]
    await leases.release()


async def test_a_down_node_occupies_a_slot_whatever_the_limit(zk: ZkSession) -> None:
    """`occupy`: counted at once even over the limit; others wait until it leaves, its own owner
    joins it (a down node's repair takes its own slot)."""
    sem = FairSemaphore(zk, "/leases/budget", 1)
    busy = await sem.acquire("t1/n1", owner="n1")
    down = await sem.occupy("(down)/n2", owner="n2")  # over the limit: both count
    assert sorted(await sem.holders()) == ["n1", "n2"]
    await sem.release(busy)
    with pytest.raises(TimeoutError):  # n2 is down: the budget of 1 is spent
        await sem.acquire("t2/n3", owner="n3", max_wait=0.5)
    repair = await sem.acquire("t3/n2", owner="n2", max_wait=5)  # the down node itself joins
    await sem.release(repair)
    await sem.release(down)  # healthy again
    third = await sem.acquire("t2/n3", owner="n3", max_wait=5)
    assert down.token < third.token
    await sem.release(third)


async def test_a_down_marker_holds_the_slot_after_its_session_is_gone(
    zk: ZkSession, zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    """A failed node's runner dies in the backoff: its marker keeps the slot, the node's retry
    (another session, same owner) joins it at once although another waiter queued before it, and
    the slot is free for the others only once the retry clears the markers."""
    sem = FairSemaphore(zk, "/leases/down", 1)
    async with ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) as dying:
        failed = await FairSemaphore(dying, "/leases/down", 1).acquire("n1", owner="n1")
        await FairSemaphore(dying, "/leases/down", 1).mark_down(failed, time.time() + 60)
    other = asyncio.create_task(sem.acquire("n2", owner="n2", max_wait=30))
    await _queued(sem, 1)
    await asyncio.sleep(0.3)
    assert not other.done()  # the marker counts: the limit of 1 is spent
    retry = await sem.acquire("n1", owner="n1", max_wait=2)  # joins, ahead of n2's wait
    assert retry.token > failed.token
    assert not other.done()
    await sem.release(retry)
    await asyncio.sleep(0.3)
    assert not other.done()  # released, but the node is still marked down
    await sem.clear_down("n1", "n1")
    slot = await asyncio.wait_for(other, 10)
    await sem.release(slot)
    assert not await zk.client.exists("/leases/down")  # nothing left behind


async def test_a_node_whose_session_went_while_it_acted_takes_its_place_back_unless_taken(
    zk: ZkSession, zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> None:
    """The session that held the slot is gone (the runner froze past its timeout while acting):
    marking the node down through a new session takes the place back while it is free (a waiter
    then waits for the node's retry), and makes nothing once somebody else holds it."""
    sem = FairSemaphore(zk, "/leases/reclaim", 1)
    async with ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) as dying:
        acted = await FairSemaphore(dying, "/leases/reclaim", 1).acquire("n1", owner="n1")
    assert await sem.mark_down(acted, time.time() + 60) is not None  # free: the place is back
    with pytest.raises(TimeoutError):
        await sem.acquire("n2", owner="n2", max_wait=0.5)
    await sem.clear_down("n1", "n1")
    async with ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) as dying:
        acted = await FairSemaphore(dying, "/leases/reclaim", 1).acquire("n1", owner="n1")
    other = await sem.acquire("n2", owner="n2", max_wait=10)  # took the place meanwhile
    assert await sem.mark_down(acted, time.time() + 60) is None
    assert set(await sem.holders()) == {"n2"}  # no second owner beside the limit of 1
    await sem.release(other)
    assert not await zk.client.exists("/leases/reclaim")


async def test_a_down_marker_expires_and_a_waiter_is_woken_by_its_expiry(zk: ZkSession) -> None:
    """A marker nobody clears (the node's runner never came back) counts until it expires; the
    waiter it held back is woken then, not by the 60 s backstop, and the expired marker is gone."""
    sem = FairSemaphore(zk, "/leases/expiry", 1)
    failed = await sem.acquire("n1", owner="n1")
    await sem.mark_down(failed, time.time() + 2)
    await sem.release(failed)  # the ephemeral holder goes; the marker stays
    assert set(await sem.holders()) == {"n1"}
    started = time.monotonic()
    slot = await sem.acquire("n2", owner="n2", max_wait=20)
    assert 0.5 < time.monotonic() - started < 15
    assert set(await sem.holders()) == {"n2"}
    assert await zk.client.get_children("/leases/expiry/h") == [slot.path.rsplit("/", 1)[1]]
    await sem.release(slot)


async def test_a_lease_set_replaces_its_markers_and_clears_them(zk: ZkSession) -> None:
    """Each failure's markers replace the last ones (never a moment without); `clear_down` removes
    the item's markers on every lease, and only its own."""
    task = FairSemaphore(zk, "/leases/set-task", 2)
    budget = FairSemaphore(zk, "/leases/set-budget", 2)
    others = await budget.acquire("t9/n2", owner="n2")
    await budget.mark_down(others, time.time() + 60)  # another node's marker: not ours to clear
    leases = LeaseSet([QueuedLease("task", task, "n1", "n1"), QueuedLease("budget", budget, "t1/n1", "n1")])
    await leases.acquire()
    await leases.mark_down(time.time() + 60)
    first = list(leases.down.values())
    await leases.mark_down(time.time() + 90)
    names = set(await zk.client.get_children("/leases/set-task/h")) | set(
        await zk.client.get_children("/leases/set-budget/h")
    )
    assert not {p.rsplit("/", 1)[1] for p in first} & names  # the first markers are gone
    assert {p.rsplit("/", 1)[1] for p in leases.down.values()} <= names
    await leases.release()
    assert set(await task.holders()) == {"n1"}
    assert set(await budget.holders()) == {"n1", "n2"}
    await leases.clear_down()
    assert set(await budget.holders()) == {"n2"}
    assert not await zk.client.exists("/leases/set-task")
    await budget.release(others)
    await budget.clear_down("t9/n2", "n2")
