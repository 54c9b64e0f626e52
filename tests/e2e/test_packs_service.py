"""The `service` pack on a real service through real router and runner processes: it restarts the
service and waits for its probe, a service that never comes back stops the task, and arguments
can only name what the node config allows."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.model import Task, TaskermanParams, WorkItem
from taskcore.core.signing import Signer
from taskcore.runtime import procs
from taskerman_dev import demo_fleet
from taskerman_dev.launchers.ports import free_port

from .conftest import Stack, publish_raw, wait_final
from .node_runners import kinds, node_config, runner, task, wait_for


class Demo:
    """One real demo service (an HTTP server with /health) and the allowed commands that start and
    stop it, as a node operator would write them: argv lists, no shell."""

    def __init__(self, tmp: Path, node: str = "n1") -> None:
        self.port = free_port()
        self.dir = tmp / f"demo-{node}"
        self.node = node
        demo_fleet.start_service(self.port, self.dir, node)

    def service(self, **extra: Any) -> dict[str, Any]:
        code = "from pathlib import Path; from taskerman_dev import demo_fleet as d; "
        here = f"Path({str(self.dir)!r})"
        return {
            "start": [sys.executable, "-c", code + f"d.start_service({self.port}, {here}, {self.node!r})"],
            "stop": [sys.executable, "-c", code + f"d.stop_service({here})"],
            "probe": {"http": f"http://127.0.0.1:{self.port}/health"},
            "health_timeout": 10,
            **extra,
        }

    async def pid(self, within: float = 10) -> int:
        return (await demo_fleet.wait_healthy(self.port, within)).pid

    def stop(self) -> None:
        demo_fleet.stop_service(self.dir, timeout=5)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    yield d
    d.stop()


async def test_service_restart_restarts_a_real_process_and_waits_for_its_probe(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, demo: Demo
) -> None:
    before = await demo.pid()
    stack.router()
    runner(stack, ["n1"], node_config(stack, "c1", {"service": {"services": {"web": demo.service()}}}))
    await publish_raw(js[1], task("svc", "service:restart", ["n1"], args={"service": "web"}))
    view = await wait_final(status, "svc", stack=stack)
    assert view.state == "succeeded", view
    after = await demo.pid(within=1)
    assert after != before  # a new process answers its probe
    assert not procs.alive(before)
    events = await kinds(js[1], "svc", through="succeeded")
    assert events.index("pre_check-passed") < events.index("execute_action-passed")
    assert (
        events.index("execute_action-passed") < events.index("post_check-passed") < events.index("succeeded")
    )


async def test_a_service_that_never_comes_back_fails_post_check_and_stops_the_task(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, demo: Demo
) -> None:
    broken = demo.service(start=["true"], health_timeout=1.5)  # "starts" nothing
    stack.router()
    runner(stack, ["n1", "n2"], node_config(stack, "c1", {"service": {"services": {"web": broken}}}))
    await publish_raw(
        js[1],
        task(
            "never",
            "service:restart",
            ["n1", "n2"],
            args={"service": "web"},
            workqueue_args={"retry_count": 3},
            max_failures=5,
        ),
    )
    view = await wait_final(status, "never", stack=stack)
    assert view.state == "failed"
    states = sorted(r.state for r in view.nodes.values())
    assert states == ["dead", "skipped"], states  # no retry, and nobody else went on
    [dead] = [r for r in view.nodes.values() if r.state == "dead"]
    assert dead.error is not None
    assert "post_check" in dead.error
    assert "not healthy within 1.5s" in dead.error
    stop = await status.stopped("never")
    assert stop is not None
    assert stop.reason == "post_check"
    breaker = stack.cli("breaker", "status", "c1", "--json")
    assert "open" in breaker.stdout


async def test_arguments_are_rejected_before_any_step_with_the_reason(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, demo: Demo, signer: Signer
) -> None:
    before = await demo.pid()
    stack.router()
    conf = {"service": {"services": {"web": demo.service()}}}
    runner(stack, ["n1"], node_config(stack, "c1", conf))
    bad = {
        "unknown-arg": {"service": "web", "unit": "sshd.service"},
        "wrong-type": {"service": 7},
        "not-allowed": {"service": "sshd"},
    }
    for task_id, args in bad.items():
        await publish_raw(js[1], task(task_id, "service:restart", ["n1"], args=args))
    # the runner checks by itself too: an item published straight to its subject, past the router
    raw = Task(
        action="service:restart",
        cluster_name="c1",
        task_id="direct",
        taskerman_params=TaskermanParams(action_args={"service": "web", "force": True}),
    )
    item = WorkItem(task=raw, node="n1", routed_at=time.time())
    subject = subjects.node_subject("c1", "n1")
    await bus.publish_work(js[1], signer, subject, msgspec.json.encode(item), "direct:n1")
    for task_id in bad:
        view = await wait_final(status, task_id, stack=stack)
        assert view.state == "dead", (task_id, view)

    async def direct_dead() -> bool:
        rec = await status.get_node("direct", "n1")
        return rec is not None and rec.state == "dead"

    await wait_for(direct_dead)
    reasons = {d.task_id: d.reason for _, d in await deadletter.entries(js[1])}
    assert "unknown field `unit`" in reasons["unknown-arg"]
    assert "Expected `str`, got `int`" in reasons["wrong-type"]
    assert (
        "service 'sshd' is not in this node's [packs.service] config (allowed: web)" in reasons["not-allowed"]
    )
    assert "unknown field `force`" in reasons["direct"]
    for task_id in [*bad, "direct"]:
        events = await kinds(js[1], task_id)
        assert not {"lease-acquired", "pre_check-passed", "pre_check-failed"} & set(events), (task_id, events)
    assert await demo.pid(within=1) == before  # nothing was restarted
