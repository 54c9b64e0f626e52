"""The heartbeat canary through real processes (scheduler, router, one runner) and `taskerman health`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus.tracking import StatusStore
from taskcore.coord import schedule_control as control
from taskcore.coord.session import ZkSession
from tests.e2e.conftest import Stack

CLUSTER = "canary:ü"  # any characters are valid in a cluster name


async def _health(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(stack.cli, "health", *args, timeout=60)


async def _health_until(stack: Stack, code: int, within: float, *args: str) -> dict[str, Any]:
    """`taskerman health --json ARGS` once it exits with `code`; its report."""
    deadline = time.monotonic() + within
    while True:
        res = await _health(stack, "--json", *args)
        if res.returncode == code:
            report: dict[str, Any] = json.loads(res.stdout)
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"health did not exit {code} within {within}s: {res}\n{stack.logs()}")
        await asyncio.sleep(0.5)


async def test_canary_pings_through_the_pipeline_and_health_notices_a_stall(
    stack: Stack, js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    stack.router({CLUSTER: ["n1"]})
    runner = stack.runner(CLUSTER, ["n1"], away_grace=600)  # pings queue for it once it stopped
    stack.spawn("taskerman-scheduler", "--canary-cluster", CLUSTER, "--canary-every", "1")

    report = await _health_until(stack, 0, 45, "--max-age", "5")
    canary = report["canary"]
    assert report["healthy"] is True
    assert report["problems"] == []
    assert canary["cluster"] == CLUSTER
    assert 0 <= canary["age_s"] <= 5
    assert 0 < canary["latency_s"] < 5
    assert canary["last_completed_task_id"].startswith("canary-")
    assert report["runners_registered"] == 1
    assert report["stale_runners"] == []
    assert report["open_breakers"] == []
    assert [(q["cluster"], q["node"]) for q in report["queues"]["runners"]] == [(CLUSTER, "n1")]

    # The ping is a task like any other: tracked, routed, run on the node, audited with its slot.
    done = report["canary"]["last_completed_task_id"]
    view = await status.view(done)
    assert view is not None
    assert (view.state, view.action, list(view.nodes)) == ("succeeded", "taskerman:ping", ["n1"])
    kinds = [e.kind for e in await audit.task_events(js[1], done)]
    assert kinds[0] == "emitted"
    assert "routed" in kinds
    state = await control.read_canary(zk)
    assert state is not None
    assert state.latency is not None
    assert state.last_completed_at is not None

    listed = await asyncio.to_thread(stack.cli, "tasks", "--json")  # the pings fill no task list
    assert [t["task_id"] for t in json.loads(listed.stdout)] == [], listed.stdout
    listed = await asyncio.to_thread(stack.cli, "tasks", "--json", "--canary")
    assert done in [t["task_id"] for t in json.loads(listed.stdout)], listed.stdout

    text = await _health(stack)
    assert text.returncode == 0, text
    assert text.stdout.startswith("pipeline  healthy: last ping completed ")

    runner.terminate()
    assert runner.wait(15) == 0
    stalled = await _health_until(stack, 1, 30, "--max-age", "2")
    assert stalled["healthy"] is False
    assert "more than the max age 2s" in stalled["problems"][0]
    assert f"no live runner is registered for the canary cluster {CLUSTER!r}" in stalled["warnings"][0]
    (queue,) = stalled["queues"]["runners"]
    assert queue["num_pending"] >= 1  # pings wait for the stopped runner
    text = await _health(stack, "--max-age", "2")
    assert text.returncode == 1
    assert text.stdout.startswith("pipeline  STALE: the last ping completed ")
    late = await _late_events(js[1], within=30)  # 3 periods without a completed ping: audited once
    assert len(late) == 1, late
    assert late[0].detail.startswith(f"no ping to {CLUSTER} completed for ")
    state = await control.read_canary(zk)
    assert state is not None
    assert state.late_since is not None


async def _late_events(js: JetStreamContext, within: float) -> list[audit.Event]:
    deadline = time.monotonic() + within
    while True:
        events = [e for e in await audit.read(js, audit.cluster_subject(CLUSTER)) if e.kind == "canary-late"]
        if events or time.monotonic() > deadline:
            await asyncio.sleep(2)  # room for a second alarm that should not come
            return [
                e for e in await audit.read(js, audit.cluster_subject(CLUSTER)) if e.kind == "canary-late"
            ]
        await asyncio.sleep(0.5)
