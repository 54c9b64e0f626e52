"""Real work on real processes through real router and runner processes: the `service` pack restarts a
real service and waits for its probe, a service that never comes back stops the task, arguments can
only name what the node's config allows, the `chaos` pack kills and pauses processes the config
names, a step timeout, cron mode's exit status, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit, deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.model import Task, TaskermanParams, WorkItem
from taskcore.runtime import procs
from taskerman_dev import demo_fleet

from .conftest import BIN, Stack, publish_raw, task_json, wait_final


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def node_config(stack: Stack, cluster: str, packs: dict[str, dict[str, Any]], **top: Any) -> Path:
    """A runner config file with nested pack settings (services, probes, processes)."""
    path = stack.tmp / f"node-{len(stack.procs)}.toml"
    lines = [f"cluster = {json.dumps(cluster)}"] + [f"{k} = {_toml(v)}" for k, v in top.items()]
    for pack, table in packs.items():
        lines.append(f"[packs.{pack}]")
        lines += [f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def runner(stack: Stack, nodes: list[str], conf: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = ["--config", str(conf)]
    for n in nodes:
        args += ["--node", n]
    return stack.spawn("taskerman-runner", *args, *extra)


def task(task_id: str, action: str, nodes: list[str], limit: int = 1, **params: Any) -> bytes:
    args = params.pop("args", {})
    return task_json(
        action=action,
        cluster_name="c1",
        nodes=nodes,
        limit=limit,
        task_id=task_id,
        taskerman_params={"action_args": args, **params},
    )


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


async def kinds(js: JetStreamContext, task_id: str) -> list[str]:
    return [e.kind for e in await audit.task_events(js, task_id)]


# --- the service pack -----------------------------------------------------------------------------------


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
    events = await kinds(js[1], "svc")
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
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, demo: Demo
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
    await bus.publish(js[1], subjects.node_subject("c1", "n1"), msgspec.json.encode(item), msg_id="direct:n1")
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


# --- the chaos pack -------------------------------------------------------------------------------------


def proc_state(pid: int) -> str:
    return procs.state(pid) or "gone"


async def test_chaos_kills_and_pauses_processes_the_config_names(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, tmp_path: Path
) -> None:
    victim = await asyncio.create_subprocess_exec("sleep", "60")
    frozen = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        for name, p in (("victim", victim), ("frozen", frozen)):
            (tmp_path / f"{name}.pid").write_text(f"{p.pid}\n")
        processes = {name: {"pidfile": str(tmp_path / f"{name}.pid")} for name in ("victim", "frozen")}
        stack.router()
        runner(stack, ["n1"], node_config(stack, "c1", {"chaos": {"processes": processes, "max_pause": 5}}))
        await publish_raw(js[1], task("kill", "chaos:kill-process", ["n1"], args={"process": "victim"}))
        assert (await wait_final(status, "kill", stack=stack)).state == "succeeded"
        assert await asyncio.wait_for(victim.wait(), 5) == -signal.SIGKILL
        assert frozen.returncode is None

        await publish_raw(
            js[1], task("pause", "chaos:pause-process", ["n1"], args={"process": "frozen", "seconds": 1.5})
        )

        async def stopped() -> bool:
            return proc_state(frozen.pid) == "T"

        await wait_for(stopped, within=20)
        assert (await wait_final(status, "pause", stack=stack)).state == "succeeded"
        assert proc_state(frozen.pid) in ("S", "R")  # resumed
        assert frozen.returncode is None

        too_long = {"process": "frozen", "seconds": 60}
        await publish_raw(js[1], task("too-long", "chaos:pause-process", ["n1"], args=too_long))
        assert (await wait_final(status, "too-long", stack=stack)).state == "dead"
        [letter] = [d for _, d in await deadletter.entries(js[1]) if d.task_id == "too-long"]
        assert "longer than this node allows ([packs.chaos] max_pause = 5)" in letter.reason
    finally:
        for p in (victim, frozen):
            if p.returncode is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            await p.wait()


async def test_a_step_past_its_timeout_is_cancelled_and_fails(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["n1"], actions={"test:sleep": {"timeout": 0.5}})
    await publish_raw(
        js[1], task("slow", "test:sleep", ["n1"], args={"seconds": 5}, workqueue_args={"retry_count": 0})
    )
    view = await wait_final(status, "slow", stack=stack)
    assert view.state == "dead"
    assert "execute_action failed: timed out after 0.5s" in (view.nodes["n1"].error or "")
    [interval] = [i for i in stack.intervals() if i["task_id"] == "slow"]
    assert interval["end"] - interval["start"] < 1.5  # the step was cancelled, not left running


# --- cron mode ------------------------------------------------------------------------------------------


def cron(stack: Stack, nodes: list[str], timeout: float = 60, **env: str) -> tuple[int, float]:
    """Run `taskerman-runner --once` for `nodes`; its exit status and how long it took."""
    args = [str(BIN / "taskerman-runner"), "--once", "--cluster", "c1"]
    for n in nodes:
        args += ["--node", n]
    started = time.monotonic()
    with (stack.tmp / "cron.log").open("ab") as log:
        done = subprocess.run(
            args, env={**stack.env(), **env}, stdout=log, stderr=log, timeout=timeout, check=False
        )
    return done.returncode, time.monotonic() - started


async def routed(status: StatusStore, task_id: str) -> None:
    async def check() -> bool:
        view = await status.view(task_id)
        return view is not None and view.state != "pending"

    await wait_for(check)


async def test_cron_mode_exit_status(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    await publish_raw(js[1], task("c-ok", "test:sleep", ["n1", "n2"], limit=2, args={"seconds": 0.2}))
    await routed(status, "c-ok")
    code, took = cron(stack, ["n1", "n2"])
    assert code == 0, stack.logs()
    assert (await status.view("c-ok")).state == "succeeded"  # type: ignore[union-attr]

    # a failure whose retry is due only in a minute: exit 1 now, without waiting for the backoff
    failing = {"seconds": 0.1, "fail_nodes": ["n2"]}
    backoff = {"retry_count": 2, "backoff": 60}
    await publish_raw(
        js[1], task("c-fail", "test:sleep", ["n1", "n2"], limit=2, args=failing, workqueue_args=backoff)
    )
    await routed(status, "c-fail")
    code, took = cron(stack, ["n1", "n2"])
    assert code == 1
    assert took < 30  # a delayed nak does not make it hang
    view = await status.view("c-fail")
    assert view is not None
    assert view.nodes["n1"].state == "succeeded"
    assert view.nodes["n2"].state == "retrying"
    assert view.nodes["n2"].failures == 1

    # an item released back (it waited too long for its lease) is not a success: the run waits for
    # it to come back and runs it, instead of ending early with 0
    daemon = stack.runner("c1", ["n1"])
    await publish_raw(js[1], task("c-wait", "test:sleep", ["n1", "n2"], limit=1, args={"seconds": 2.5}))

    async def n1_running() -> bool:
        rec = await status.get_node("c-wait", "n1")
        return rec is not None and rec.state == "running"

    await wait_for(n1_running)
    code, _ = cron(stack, ["n2"], TASKERMAN_LEASE_WAIT="1")
    assert code == 0, (await status.view("c-wait"), stack.logs())
    view = await status.view("c-wait")
    assert view is not None
    assert view.state == "succeeded"
    assert "released" in await kinds(js[1], "c-wait")
    n1, n2 = (
        next(i for i in stack.intervals() if i["task_id"] == "c-wait" and i["node"] == n)
        for n in ("n1", "n2")
    )
    assert n2["start"] >= n1["end"]  # limit 1 held
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0


# --- graceful shutdown ----------------------------------------------------------------------------------


async def test_sigterm_lets_a_short_action_finish(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    proc = stack.runner("c1", ["n1"])
    await publish_raw(js[1], task("finish", "test:sleep", ["n1"], args={"seconds": 1.5}))

    async def running() -> bool:
        rec = await status.get_node("finish", "n1")
        return rec is not None and rec.state == "running"

    await wait_for(running)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    view = await status.view("finish")
    assert view is not None
    assert view.state == "succeeded"  # within the default 30 s grace: finished and acked
    assert view.nodes["n1"].attempts == 1


async def test_sigterm_past_the_grace_hands_the_item_back_unacked(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.router()
    monkeypatch.setenv("TASKERMAN_SHUTDOWN_GRACE", "1")
    proc = stack.runner("c1", ["n1"])
    await publish_raw(
        js[1], task("long", "test:sleep", ["n1"], args={"seconds": 4}, workqueue_args={"retry_count": 0})
    )

    async def running() -> bool:
        rec = await status.get_node("long", "n1")
        return rec is not None and rec.state == "running"

    await wait_for(running)
    await asyncio.sleep(0.5)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    assert time.monotonic() - signalled < 8  # the 1 s grace, then cancelled: not the 4 s action
    rec = await status.get_node("long", "n1")
    assert rec is not None
    assert rec.state != "succeeded"
    assert rec.failures == 0  # not counted as a failure
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 1  # nothing acked
    [cut] = [i for i in stack.intervals() if i["task_id"] == "long"]
    assert cut["end"] - cut["start"] < 3.5
    assert "released" in await kinds(js[1], "long")

    monkeypatch.delenv("TASKERMAN_SHUTDOWN_GRACE")
    stack.runner("c1", ["n1"])  # restarted: the item comes back and completes
    view = await wait_final(status, "long", stack=stack)
    assert view.state == "succeeded"  # retry_count 0, and still it ran to the end
    assert view.nodes["n1"].attempts == 2
    assert view.nodes["n1"].failures == 0
    full = [i for i in stack.intervals() if i["task_id"] == "long"][-1]
    assert full["end"] - full["start"] >= 3.9
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 0
