"""Waiting and routing at scale on real processes: a wait longer than max_deliver times ack_wait, a
wait past the task's deadline, a cancel heard by 100 waiters at once, a task of 10,000 nodes with
a bounded status bucket, and the reconciler past the first page of consumers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus import deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore, StopRecord
from taskcore.coord.leases import lease_path
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.model import Task, WorkItem
from taskcore.core.settings import Settings
from taskerman_router.router import Router

from .conftest import QUICK_EXIT, Stack, away, publish_raw, task_json, wait_final

MAX_KV_VALUE = 300 * 1024


def sleep_task(task_id: str, nodes: list[str], seconds: float, limit: int = 1, **params: object) -> bytes:
    return task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=nodes,
        limit=limit,
        task_id=task_id,
        taskerman_params={"action_args": {"seconds": seconds}, **params},
    )


async def until(check: object, within: float, what: str, stack: Stack | None = None) -> float:
    """Poll `check` until true; returns the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if await check():  # type: ignore[operator]
            return time.monotonic() - began
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {within}s\n{stack.logs() if stack else ''}")


async def test_a_wait_longer_than_max_deliver_times_ack_wait_still_runs(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Waiting keeps the item claimed with in-progress acks, which are no deliveries: a node that
    waits longer than max_deliver times ack_wait runs on its first delivery."""
    stack.settings = msgspec.structs.replace(stack.settings, ack_wait=2.0, max_deliver=3)
    budget = stack.settings.ack_wait * stack.settings.max_deliver  # 6 s
    stack.router()
    stack.runner("c1", ["a", "b"])
    await publish_raw(
        js[1], sleep_task("long-wait", ["a", "b"], seconds=budget + 3, workqueue_args={"retry_count": 0})
    )
    view = await wait_final(status, "long-wait", within=50, stack=stack)
    assert view.state == "succeeded", (view, stack.logs())
    assert [r.attempts for r in view.nodes.values()] == [1, 1]
    assert [r.failures for r in view.nodes.values()] == [0, 0]
    first, second = sorted(
        (i for i in stack.intervals() if i["task_id"] == "long-wait"), key=lambda i: i["start"]
    )
    assert second["start"] >= first["end"]  # limit 1
    waited = second["start"] - first["start"]
    print(f"the second node waited {waited:.1f}s, max_deliver × ack_wait = {budget:.0f}s")
    assert waited > budget
    assert not await deadletter.entries(js[1])
    for node in ("a", "b"):  # each item was delivered once, and only once
        info = await js[1].consumer_info(subjects.WORK_STREAM, subjects.runner_durable("c1", node))
        assert info.delivered is not None
        assert (info.delivered.consumer_seq, info.num_redelivered) == (1, 0), info
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 0


async def test_a_wait_past_the_deadline_expires_unrun(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["a", "b"])
    await publish_raw(js[1], sleep_task("late", ["a", "b"], seconds=8, deadline_s=2))

    async def one_expired() -> bool:
        view = await status.view("late")
        return view is not None and any(r.state == "expired" for r in view.nodes.values())

    await until(one_expired, 20, "a node expired", stack)
    view = await status.view("late")
    assert view is not None
    [(late, rec)] = [(n, r) for n, r in view.nodes.items() if r.state == "expired"]
    [(ran, running)] = [(n, r) for n, r in view.nodes.items() if n != late]
    assert running.state == "running"  # the holder still holds: the deadline ends waits only
    assert rec.error is not None
    assert "expired" in rec.error
    assert "deadline of 2s" in rec.error, rec.error
    assert rec.attempts == 0
    info = await js[1].consumer_info(subjects.WORK_STREAM, subjects.runner_durable("c1", late))
    assert info.num_pending == 0
    assert info.num_ack_pending == 0  # acked, not left to redeliver
    try:
        raw = await js[1].get_msg(
            subjects.WORK_STREAM, 1, subject=subjects.node_subject("c1", late), next=True
        )
    except NotFoundError:
        raw = None
    assert raw is None, f"the expired node's item is still in WORK: {raw}"
    view = await wait_final(status, "late", within=30, stack=stack)
    assert view.state == "failed"
    assert view.nodes[ran].state == "succeeded"
    assert {i["node"] for i in stack.intervals() if i["task_id"] == "late"} == {ran}  # no interval for it


async def test_a_cancel_reaches_a_hundred_waiters_at_once(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, settings: Settings
) -> None:
    nodes = [f"w{i:03d}" for i in range(101)]
    stack.router()
    stack.runner("c1", nodes, extra_env=QUICK_EXIT)
    await publish_raw(js[1], sleep_task("herd", nodes, seconds=40))
    async with ZkSession.from_settings(settings) as zk:
        slot = FairSemaphore(zk, lease_path("herd"), 1)

        async def all_wait() -> bool:
            return await slot.waiting() == 100 and len(await slot.holder_ids()) == 1

        took = await until(all_wait, 45, "100 waiters and one holder", stack)
        print(f"100 nodes waiting {took:.1f}s after the publish")
        [holder] = await slot.holder_ids()
        acting = holder.split("#", 1)[0]
        rec = StopRecord(reason="cancelled", detail="scale test", by="test", at=time.time())
        began = time.monotonic()
        assert await status.stop("herd", rec)
        waiters = [n for n in nodes if n != acting]

        async def all_cancelled() -> bool:
            found = await status.get_nodes("herd", waiters)
            return len(found) == 100 and all(r.state == "cancelled" for r in found.values())

        await until(all_cancelled, 5, "100 waiters cancelled", stack)
        heard = time.monotonic() - began
        print(f"100 waiters cancelled {heard:.2f}s after the stop")
        assert await slot.waiting() == 0
    view = await status.view("herd")
    assert view is not None
    assert view.nodes[acting].state == "running"  # a started node finishes on its own
    assert {i["node"] for i in stack.intervals()} <= {acting}


async def test_ten_thousand_nodes_route_with_bounded_records(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    nodes = [f"n{i:05d}" for i in range(10_000)]
    shuffled = random.Random(7).sample(nodes, len(nodes))
    await away(stack.settings, "c1", nodes)  # no runners: the test reads the items in WORK
    stack.router()
    began = time.monotonic()
    await publish_raw(js[1], sleep_task("big", shuffled, seconds=0.1, limit=50))

    async def routed() -> bool:
        rec = await status.get_task("big")
        work = (await js[1].stream_info(subjects.WORK_STREAM)).state.messages
        return rec is not None and rec.state == "routed" and work == 10_000

    try:
        took = await until(routed, 50, "10,000 items routed", stack)
        print(f"10,000 nodes routed in {took:.1f}s (from publish: {time.monotonic() - began:.1f}s)")
        rec = await status.get_task("big")
        assert rec is not None
        assert rec.node_count == 10_000
        assert rec.plan_chunks == 20
        view = await status.view("big")
        assert view is not None
        assert len(view.nodes) == 10_000
        assert view.state == "routed"
        assert [n for w in view.plan for n in w.nodes] == nodes  # the name routing's order
        out = await asyncio.to_thread(stack.cli, "status", "big", "--json")
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert [n for w in shown["plan"] for n in w["nodes"]] == nodes
        sizes = {}
        for key in await status.kv.keys():
            entry = await status.kv.get(key)
            sizes[key] = len(entry.value or b"")
        assert f"task.{subjects.encode_token('big')}" in sizes
        assert sum(k.startswith("plan.") for k in sizes) == 20
        print(f"largest status value {max(sizes.values())} bytes of {len(sizes)} keys")
        assert max(sizes.values()) < MAX_KV_VALUE, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        args = ["plan", "test:sleep", "--cluster", "c1", "--limit", "50", "--json"]
        for n in shuffled:
            args += ["--node", n]
        preview = await asyncio.to_thread(stack.cli, *args)
        assert preview.returncode == 0, preview.stderr
        waves = json.loads(preview.stdout)["waves"]
        assert [n for w in waves for n in w["nodes"]] == nodes
    finally:
        await js[1].purge_stream(subjects.WORK_STREAM, subject="tasks.cluster.>")
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 0


async def test_a_task_that_cannot_be_routed_is_dead_with_its_reason(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router({"c1": ["n1"]})
    await publish_raw(js[1], sleep_task("no-plugin", ["n1"], seconds=0.1, routing="fastest_first"))
    await publish_raw(
        js[1],
        task_json(action="test:sleep", cluster_name="nowhere", task_id="no-cluster", taskerman_params={}),
    )
    for task_id, needle in (
        ("no-plugin", "unknown routing plugin 'fastest_first'"),
        ("no-cluster", "unknown cluster 'nowhere'"),
    ):
        view = await wait_final(status, task_id, within=20, stack=stack)
        assert view.state == "dead"
        assert view.error is not None
        assert needle in view.error, view.error
        out = await asyncio.to_thread(stack.cli, "status", task_id)
        assert "dead" in out.stdout
        assert needle in out.stdout, out.stdout


async def test_the_reconciler_looks_past_the_first_page_of_consumers(
    settings: Settings, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Max deliveries reached on the 301st consumer while no router heard the advisory."""
    capped = msgspec.structs.replace(settings, max_deliver=2, ack_wait=1.0)
    window = asyncio.Semaphore(32)

    async def consumer(node: str) -> str:
        async with window:
            return await bus.ensure_runner_consumer(js[1], capped, "c1", node)

    await asyncio.gather(*(consumer(f"n{i:03d}") for i in range(300)))
    durable = await consumer("zz-lost")  # sorts after every other one
    first_page = await js[1].consumers_info(subjects.WORK_STREAM)
    assert durable not in {c.name for c in first_page}  # one page would miss it
    task = Task(action="test:sleep", cluster_name="c1", task_id="far", nodes=("zz-lost",))
    item = WorkItem(task=task, node="zz-lost", routed_at=time.time())
    subject = subjects.node_subject("c1", "zz-lost")
    await bus.publish(js[1], subject, msgspec.json.encode(item), msg_id="far:zz-lost")
    sub = await js[1].pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
    for _ in range(2):
        assert len(await sub.fetch(1, timeout=5)) == 1  # never acked
        await asyncio.sleep(1.2)
    with contextlib.suppress(TimeoutError):  # a live fetcher: the server gives up on the item now
        await sub.fetch(1, timeout=1)
    router = Router(js[0], js[1], status, ActionRegistry.installed(), {}, signer=None)  # reconciles only
    began = time.monotonic()
    assert await router.reconcile() == 1
    print(f"reconciled 301 consumers in {time.monotonic() - began:.2f}s")
    letters = [d for _, d in await deadletter.entries(js[1]) if d.task_id == "far"]
    assert len(letters) == 1
    assert "reconciler" in letters[0].reason
    assert durable in letters[0].reason
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 0
