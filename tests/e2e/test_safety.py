"""The safety core end to end: a cluster's disruption budget shared by tasks, exclusion groups, a
global lease across clusters and the circuit breaker, through real router and runner processes on
real NATS and ZooKeeper. Every assertion about who acted when comes from the witness file.

Not covered here: a post_check failure tripping the breaker at once. No built-in action has a
failing post_check, so that path is left to the pure `clusters.after_failure(..., trip=True)`."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters, runners
from taskcore.coord.clusters import Breaker
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final

Interval = dict[str, Any]


@pytest.fixture
async def zk(settings: Settings) -> AsyncIterator[ZkSession]:
    """A ZooKeeper session under this test's chroot, to set and read what operators would."""
    async with ZkSession.from_settings(settings) as session:
        yield session


async def wait_registered(
    zk: ZkSession, fleet: dict[str, list[str]], stack: Stack, within: float = 30
) -> None:
    """Wait until every node's runner is registered, i.e. its consumer exists and it pulls."""
    want = {(c, n) for c, nodes in fleet.items() for n in nodes}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if want <= {(r.cluster, r.node) for r in await runners.registered(zk)}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"runners did not register in {within}s\n{stack.logs()}")


async def operator_cli(stack: Stack, *args: str) -> None:
    """Run an operator command as a user would; it must succeed."""
    out = await asyncio.to_thread(stack.cli, *args)
    assert out.returncode == 0, out.stdout + out.stderr


async def set_budget(stack: Stack, zk: ZkSession, cluster: str, budget: int) -> None:
    await operator_cli(stack, "cluster", "budget", cluster, str(budget))
    assert (await clusters.read_config(zk, cluster)).budget == budget


async def reset_breaker(stack: Stack, breaker: Breaker) -> None:
    await operator_cli(stack, "breaker", "reset", breaker.cluster)
    assert await breaker.state() == "closed"


def of(intervals: Iterable[Interval], **match: str) -> list[Interval]:
    return [i for i in intervals if all(i[k] == v for k, v in match.items())]


def overlap(a: Interval, b: Interval) -> bool:
    return bool(a["start"] < b["end"] and b["start"] < a["end"])


def sleep_task(action: str, cluster: str, task_id: str, limit: int, seconds: float) -> bytes:
    return task_json(
        action=action,
        cluster_name=cluster,
        limit=limit,
        task_id=task_id,
        taskerman_params={"action_args": {"seconds": seconds}},
    )


async def test_cluster_budget_is_shared_by_tasks(
    stack: Stack, zk: ZkSession, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    nodes = [f"n{i}" for i in range(1, 7)]
    stack.router({"kafka:main": nodes})
    stack.runner("kafka:main", nodes[:3])
    stack.runner("kafka:main", nodes[3:])
    await set_budget(stack, zk, "kafka:main", 2)
    for task_id in ("budget-a", "budget-b"):
        await publish_raw(js[1], sleep_task("test:sleep", "kafka:main", task_id, limit=3, seconds=0.5))
    for task_id in ("budget-a", "budget-b"):
        view = await wait_final(status, task_id, stack=stack)
        assert view.state == "succeeded", view
    intervals = stack.intervals()
    for task_id in ("budget-a", "budget-b"):
        mine = of(intervals, task_id=task_id)
        assert sorted(i["node"] for i in mine) == nodes  # each node ran each task once
        assert max_concurrency(mine) <= 3
    assert len(intervals) == 12
    assert max_concurrency(intervals) <= 2  # the budget binds across tasks, not per task
    assert max_concurrency(intervals) == 2  # and it was used, not serialised


async def test_status_intervals_of_two_tasks_under_budget_1_never_overlap(
    stack: Stack, zk: ZkSession, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """What an auditor reads: the recorded [started_at, finished_at] of the nodes (not the
    witness) of two tasks sharing a budget of 1 never overlap, because a node's finish is recorded
    before its leases are released. The action also takes a global lease, released after the
    budget: a finish recorded after the release overlapped the next node's start every time."""
    nodes = [f"n{i}" for i in range(1, 7)]
    stack.router({"kafka:main": nodes})
    stack.runner("kafka:main", nodes, actions={"test:sleep": {"global_limit": 2}})
    await set_budget(stack, zk, "kafka:main", 1)
    task_ids = ["held-a", "held-b"]
    for task_id in task_ids:
        await publish_raw(js[1], sleep_task("test:sleep", "kafka:main", task_id, limit=2, seconds=0.05))
    recorded = []
    for task_id in task_ids:
        view = await wait_final(status, task_id, stack=stack)
        assert view.state == "succeeded", view
        for node, rec in view.nodes.items():
            assert rec.started_at is not None, (node, rec)
            assert rec.finished_at is not None, (node, rec)
            recorded.append({"node": node, "start": rec.started_at, "end": rec.finished_at})
    assert len(recorded) == 2 * len(nodes)
    assert max_concurrency(recorded) == 1, sorted((i["start"], i["end"]) for i in recorded)


async def test_exclusion_group_within_a_cluster_but_not_across(
    stack: Stack, zk: ZkSession, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    fleet = {
        "cass:shared": ["s1", "s2", "s3", "s4"],
        "cass:east": ["e1", "e2"],
        "cass:west": ["w1", "w2"],
    }
    stack.router(fleet)
    for cluster, nodes in fleet.items():
        stack.runner(cluster, nodes)
    await wait_registered(zk, fleet, stack)
    tasks = {
        "shared-backup": ("test:backup", "cass:shared", 0.5),
        "shared-repair": ("test:repair", "cass:shared", 0.5),
        "east-backup": ("test:backup", "cass:east", 1.0),
        "west-repair": ("test:repair", "cass:west", 1.0),
    }
    for task_id, (action, cluster, seconds) in tasks.items():
        await publish_raw(js[1], sleep_task(action, cluster, task_id, limit=2, seconds=seconds))
    for task_id, (_, cluster, _) in tasks.items():
        view = await wait_final(status, task_id, stack=stack)
        assert view.state == "succeeded", view
        ran = of(stack.intervals(), task_id=task_id)
        assert sorted(i["node"] for i in ran) == fleet[cluster]
        assert max_concurrency(ran) <= 2
    intervals = stack.intervals()
    backup, repair = of(intervals, task_id="shared-backup"), of(intervals, task_id="shared-repair")
    clashes = [(b, r) for b, r in itertools.product(backup, repair) if overlap(b, r)]
    assert clashes == []
    east, west = of(intervals, task_id="east-backup"), of(intervals, task_id="west-repair")
    assert any(overlap(e, w) for e, w in itertools.product(east, west))  # the groups are per cluster


async def test_global_lease_lets_one_cluster_act_at_a_time(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    fleet = {f"redis:{c}": [f"{c}-1", f"{c}-2"] for c in ("a", "b", "c")}
    stack.router(fleet)
    for cluster, nodes in fleet.items():
        stack.runner(cluster, nodes, actions={"test:sleep": {"global_limit": 1}})
    for cluster in fleet:
        await publish_raw(js[1], sleep_task("test:sleep", cluster, f"g-{cluster}", limit=2, seconds=0.5))
    for cluster, nodes in fleet.items():
        view = await wait_final(status, f"g-{cluster}", stack=stack)
        assert view.state == "succeeded", view
        assert sorted(i["node"] for i in of(stack.intervals(), task_id=f"g-{cluster}")) == nodes
    intervals = stack.intervals()
    clashes = [
        (a, b)
        for a, b in itertools.combinations(intervals, 2)
        if a["cluster"] != b["cluster"] and overlap(a, b)
    ]
    assert clashes == []


async def test_breaker_opens_on_failures_and_holds_work_until_reset(
    settings: Settings,
    tmp_path: Path,
    zk: ZkSession,
    js: tuple[NATS, JetStreamContext],
    status: StatusStore,
) -> None:
    low = msgspec.structs.replace(settings, breaker_threshold=2)
    stack = Stack(low, tmp_path)
    try:
        fleet = {"pg:sick": ["p1", "p2"], "pg:well": ["q1", "q2"]}
        stack.router(fleet)
        for cluster, nodes in fleet.items():
            stack.runner(cluster, nodes)
        breaker = Breaker(zk, "pg:sick", clusters.breaker_policy(low))

        await publish_raw(
            js[1],
            task_json(
                action="test:sleep",
                cluster_name="pg:sick",
                limit=2,
                task_id="fails",
                taskerman_params={
                    "action_args": {"seconds": 0.1, "fail": True},
                    "workqueue_args": {"retry_count": 0},
                },
            ),
        )
        view = await wait_final(status, "fails", stack=stack)
        assert view.state == "dead", view
        assert len(of(stack.intervals(), task_id="fails")) == 2  # one attempt per node
        opened = await breaker.read()
        assert opened.state == "open", opened
        assert len(opened.failures) == 2

        await publish_raw(js[1], sleep_task("test:sleep", "pg:sick", "held", limit=2, seconds=0.2))
        await publish_raw(js[1], sleep_task("test:sleep", "pg:well", "other", limit=2, seconds=0.2))
        view = await wait_final(status, "other", stack=stack)
        assert view.state == "succeeded", view  # another cluster's breaker is its own
        deadline = time.monotonic() + 30
        while (held := await status.view("held")) is None or held.state == "pending":
            assert time.monotonic() < deadline, f"not routed: {held}\n{stack.logs()}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # runners have had the items in hand for a while by now
        held = await status.view("held")
        assert held is not None
        assert held.state == "routed", held
        assert {n: r.state for n, r in held.nodes.items()} == {"p1": "pending", "p2": "pending"}
        assert of(stack.intervals(), task_id="held") == []

        await reset_breaker(stack, breaker)
        view = await wait_final(status, "held", stack=stack)
        assert view.state == "succeeded", view
        assert sorted(i["node"] for i in of(stack.intervals(), task_id="held")) == ["p1", "p2"]
    finally:
        stack.stop()


def acting_span(intervals: list[Interval], node: str) -> Interval:
    """A node acts from its first attempt's start to its last attempt's end: a failed node in
    backoff is still disrupted."""
    mine = of(intervals, node=node)
    return {"start": min(i["start"] for i in mine), "end": max(i["end"] for i in mine)}


async def test_a_failed_node_keeps_its_slot_through_its_backoff(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Limit 1, both nodes fail their first attempt and retry after 1 s: the second node starts
    only once the first has succeeded, never during its backoff (two nodes down at once)."""
    nodes = ["f1", "f2"]
    stack.router({"pg:flaky": nodes})
    stack.runner("pg:flaky", nodes)
    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="pg:flaky",
            limit=1,
            task_id="flaky",
            taskerman_params={
                "action_args": {"seconds": 0.3, "fail_nodes": nodes, "fail_attempts": 1},
                "workqueue_args": {"retry_count": 2, "backoff": 1.0},
            },
        ),
    )
    view = await wait_final(status, "flaky", stack=stack)
    assert view.state == "succeeded", view
    intervals = of(stack.intervals(), task_id="flaky")
    assert len(intervals) == 4  # two attempts per node
    assert {r.attempts for r in view.nodes.values()} == {2}
    assert not overlap(acting_span(intervals, "f1"), acting_span(intervals, "f2")), intervals


async def test_a_step_that_ignores_its_cancellation_keeps_its_leases_until_it_ends(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Limit 1, a step timeout of 1 s, an action sleeping 7 s in a thread (which no cancellation
    stops): the step fails at 1 s but its side effect goes on past the guard's 5 s of patience, and
    the next node starts only once it has really ended."""
    nodes = ["t1", "t2"]
    stack.router({"pg:thread": nodes})
    stack.runner("pg:thread", nodes, actions={"test:sleep": {"timeout": 1.0}})
    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="pg:thread",
            limit=1,
            task_id="orphan",
            taskerman_params={
                "action_args": {"seconds": 7.0, "in_thread": True},
                "workqueue_args": {"retry_count": 0},
                "max_failures": 2,
            },
        ),
    )
    view = await wait_final(status, "orphan", within=90, stack=stack)
    assert {n: r.state for n, r in view.nodes.items()} == {"t1": "dead", "t2": "dead"}, view
    assert all("timed out" in (r.error or "") for r in view.nodes.values()), view
    runs = of(stack.intervals(), task_id="orphan")
    assert len(runs) == 2, stack.logs()
    first, second = sorted(runs, key=lambda i: i["start"])
    assert not overlap(first, second), (first, second)
