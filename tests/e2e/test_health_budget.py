"""A health-aware budget on real processes: a node whose health probe fails takes a slot of its
cluster's disruption budget until the probe passes again, as a PodDisruptionBudget counts an
unhealthy pod."""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus.tracking import StatusStore
from taskerman_dev.launchers import free_port

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final


def sleep_task(task_id: str, seconds: float) -> bytes:
    return task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=["n1", "n2"],
        limit=2,
        task_id=task_id,
        taskerman_params={"action_args": {"seconds": seconds}},
    )


async def budget_says(stack: Stack, text: str, present: bool, within: float = 30) -> str:
    """`taskerman cluster budget c1` until its output does (or does not) contain `text`."""
    deadline = time.monotonic() + within
    out = ""
    while time.monotonic() < deadline:
        out = (await asyncio.to_thread(stack.cli, "cluster", "budget", "c1")).stdout
        if (text in out) == present:
            return out
        await asyncio.sleep(0.3)
    raise AssertionError(
        f"cluster budget never {'said' if present else 'stopped saying'} {text!r}: {out}\n{stack.logs()}"
    )


async def test_a_node_that_is_down_takes_a_budget_slot_until_it_is_up(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    port = free_port("127.0.0.1")  # nothing listens: n3's probe fails
    conf = stack.tmp / "n3.toml"
    conf.write_text(
        f'cluster = "c1"\n[health]\nprobe = {{tcp = "127.0.0.1:{port}"}}\nevery = 0.3\nfailures = 2\n'
    )
    stack.router()
    stack.runner("c1", ["n1", "n2"])
    stack.spawn("taskerman-runner", "--config", str(conf), "--node", "n3")
    out = stack.cli("cluster", "budget", "c1", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    shown = await budget_says(stack, "1 slot(s) taken by node(s) down (their health probe fails): n3", True)
    assert "c1: budget 2" in shown
    plan = stack.cli("plan", "test:sleep", "--cluster", "c1", "--node", "n1", "--node", "n2", "--limit", "2")
    assert "now 1 slot(s) taken by node(s) down: n3" in plan.stdout, plan.stdout + plan.stderr

    await publish_raw(js[1], sleep_task("while-down", 0.5))
    view = await wait_final(status, "while-down", within=60, stack=stack)
    assert view.state == "succeeded", view
    assert max_concurrency(stack.intervals()) == 1  # n3 down: one slot of two left

    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", port)  # n3 comes up
    try:
        await budget_says(stack, "down", False)
        await publish_raw(js[1], sleep_task("all-up", 1.0))
        view = await wait_final(status, "all-up", within=60, stack=stack)
        assert view.state == "succeeded", view
        later = [i for i in stack.intervals() if i["task_id"] == "all-up"]
        assert max_concurrency(later) == 2
    finally:
        server.close()
        await server.wait_closed()
    kinds = [e.kind for e in await audit.read(js[1], audit.cluster_subject("c1")) if e.node == "n3"]
    assert kinds[:2] == ["node-down", "node-up"], kinds
