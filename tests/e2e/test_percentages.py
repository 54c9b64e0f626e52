"""`limit` and `max_failures` as percentages of the task's nodes, through real router and runner
processes: the router resolves them once it knows the nodes, the runners hold the numbers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final

NODES = [f"n{i}" for i in range(1, 9)]


async def test_a_limit_of_25_percent_over_8_nodes_runs_2_at_once(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES)
    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=NODES,
            limit="25%",
            task_id="quarter",
            taskerman_params={"action_args": {"seconds": 0.5}},
        ),
    )
    view = await wait_final(status, "quarter", stack=stack)
    assert view.state == "succeeded", view
    mine = [i for i in stack.intervals() if i["task_id"] == "quarter"]
    assert sorted(i["node"] for i in mine) == NODES
    assert max_concurrency(mine) == 2  # 25% of 8: held, and used
    assert (view.limit, view.limit_asked) == (2, "25%")
    shown = stack.cli("status", "quarter")
    assert "limit 2 (25%)" in shown.stdout, shown.stdout + shown.stderr
    assert json.loads(stack.cli("status", "quarter", "--json").stdout)["limit"] == 2


async def test_max_failures_of_25_percent_stops_after_the_third_failure_of_8(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES)
    failing = ["n2", "n4", "n6", "n8"]
    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=NODES,
            task_id="quarter-fails",
            taskerman_params={
                "action_args": {"seconds": 0.05, "fail_nodes": failing},
                "workqueue_args": {"retry_count": 0},
                "max_failures": "25%",
            },
        ),
    )
    view = await wait_final(status, "quarter-fails", stack=stack)
    assert view.state == "failed", view
    states = {n: r.state for n, r in view.nodes.items()}
    # limit 1 in plan order: n2, n4 and n6 die; the third of them is more than 25% of 8 (2)
    assert states == {
        **dict.fromkeys(["n1", "n3", "n5"], "succeeded"),
        **dict.fromkeys(["n2", "n4", "n6"], "dead"),
        **dict.fromkeys(["n7", "n8"], "skipped"),
    }, states
    assert view.error is not None
    assert "3 failed node(s), max_failures 2" in view.error


async def serving_plans(nc: NATS, within: float = 30) -> None:
    """Wait until a router answers plan requests (an empty request gets its error reply)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await nc.request(subjects.PLAN_SUBJECT, b"{}", timeout=5)
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no router served plans within {within}s")


async def test_the_cli_takes_percentages_and_plan_shows_what_they_resolve_to(
    stack: Stack, js: tuple[NATS, JetStreamContext]
) -> None:
    stack.router()
    await serving_plans(js[0])
    nodes = [arg for n in NODES for arg in ("--node", n)]
    out = stack.cli(
        "plan", "test:sleep", "--cluster", "c1", *nodes, "--limit", "25%", "--max-failures", "10%"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "limit 2 = 25% of 8 node(s) (rounded down, at least 1)" in out.stdout
    assert "max_failures 1 = 10% of 8 node(s)" in out.stdout
    assert "at most 2 of the task's 8 node(s) at once" in out.stdout
    planned = json.loads(
        stack.cli("plan", "test:sleep", "--cluster", "c1", *nodes, "--limit", "25%", "--json").stdout
    )
    assert (planned["task"]["limit"], planned["asked"], planned["concurrency"]) == (2, {"limit": "25%"}, 2)
    bad = stack.cli("submit", "test:sleep", "--cluster", "c1", *nodes, "--limit", "150%")
    assert bad.returncode == 2
    assert "limit: '150%': a percentage of the task's nodes must be 1%..100%" in bad.stderr
    assert "Traceback" not in bad.stderr
    worse = stack.cli("submit", "test:sleep", "--cluster", "c1", "--limit", "half")
    assert worse.returncode == 2
    assert "expected a whole number or a percentage" in worse.stderr
