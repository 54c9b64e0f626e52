"""Canary waves on real processes: the first k nodes of the plan run alone and must all succeed
before the rest start at the task's limit; a canary that fails stops the task."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final
from .test_percentages import serving_plans

NODES = ["n1", "n2", "n3", "n4", "n5"]


def canary_task(task_id: str, canary: int, limit: int = 3, **args: Any) -> bytes:
    return task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=NODES,
        limit=limit,
        task_id=task_id,
        taskerman_params={
            "action_args": {"seconds": 0.5, **args},
            "canary": canary,
            "workqueue_args": {"retry_count": 0},
        },
    )


async def test_the_canary_runs_alone_then_the_rest_at_the_limit(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES)
    await serving_plans(js[0])
    plan = stack.cli(
        "plan",
        "test:sleep",
        "--cluster",
        "c1",
        *[a for n in NODES for a in ("--node", n)],
        "--limit",
        "3",
        "--canary",
        "1",
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "canary" in plan.stdout, plan.stdout
    await publish_raw(js[1], canary_task("can", canary=1))

    async def said() -> dict[str, str]:  # while n1 acts, the others say what they wait for
        view = await status.view("can")
        return {n: r.waiting_for.reason for n, r in (view.nodes.items() if view else ()) if r.waiting_for}

    deadline = time.monotonic() + 30
    while len(waiting := await said()) < len(NODES) - 1:
        assert time.monotonic() < deadline, (waiting, stack.logs())
        await asyncio.sleep(0.1)
    assert set(waiting.values()) == {"canary: n1 to succeed first"}, waiting

    view = await wait_final(status, "can", within=60, stack=stack)
    assert view.state == "succeeded", view
    intervals = {i["node"]: i for i in stack.intervals()}
    assert all(intervals["n1"]["end"] <= intervals[n]["start"] for n in NODES[1:]), intervals
    rest = [i for n, i in intervals.items() if n != "n1"]
    assert max_concurrency(rest) == 3  # the rest at the task's limit


async def test_a_failed_canary_stops_the_task_and_nothing_else_runs(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES)
    await publish_raw(js[1], canary_task("sick", canary=2, fail_nodes=["n2"]))
    view = await wait_final(status, "sick", within=60, stack=stack)
    assert view.state == "failed", view
    assert view.nodes["n2"].state == "dead", view
    stop = await status.stopped("sick")
    assert stop is not None
    assert stop.reason == "canary", stop
    assert {view.nodes[n].state for n in NODES[2:]} == {"skipped"}, view
    assert {i["node"] for i in stack.intervals()} <= {"n1", "n2"}  # none of the rest ran
