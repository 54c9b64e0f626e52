"""A real runner process: a step past its timeout is cancelled, cron mode exits with the status
of its items, and SIGTERM shuts down gracefully (a short action finishes; past the grace the
item is handed back unacked)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects

from .conftest import BIN, Stack, publish_raw, wait_final
from .node_runners import kinds, task, wait_for


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


def cron(stack: Stack, nodes: list[str], timeout: float = 60, **env: str) -> tuple[int, float]:
    """Run `taskerman-runner --once` for `nodes`; its exit status and how long it took. Its node
    config has an `away_grace`, as a cron runner's must: between runs its nodes stay served."""
    conf = stack.tmp / "cron.toml"
    conf.write_text('cluster = "c1"\naway_grace = 3600\n')
    args = [str(BIN / "taskerman-runner"), "--once", "--config", str(conf)]
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
    assert cron(stack, ["n1", "n2"])[0] == 0  # the first run: nothing due, leaves the away notes
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

    # an item waiting for its lease is not done: the cron run waits with it (in-progress acks, no
    # release) and runs it, instead of ending early with 0
    daemon = stack.runner("c1", ["n1"])
    await publish_raw(js[1], task("c-wait", "test:sleep", ["n1", "n2"], limit=1, args={"seconds": 2.5}))

    async def n1_running() -> bool:
        rec = await status.get_node("c-wait", "n1")
        return rec is not None and rec.state == "running"

    await wait_for(n1_running)
    code, _ = cron(stack, ["n2"])
    assert code == 0, (await status.view("c-wait"), stack.logs())
    view = await status.view("c-wait")
    assert view is not None
    assert view.state == "succeeded"
    assert "released" not in await kinds(js[1], "c-wait")  # it waited; nothing was handed back
    n1, n2 = (
        next(i for i in stack.intervals() if i["task_id"] == "c-wait" and i["node"] == n)
        for n in ("n1", "n2")
    )
    assert n2["start"] >= n1["end"]  # limit 1 held
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0


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


async def test_overlapping_cron_runs_never_act_on_one_node_at_once(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    assert cron(stack, ["n1"])[0] == 0  # registers n1 and leaves its away note
    for task_id in ("ov-a", "ov-b"):  # two tasks: no task slot keeps them apart, only the node lock
        await publish_raw(js[1], task(task_id, "test:sleep", ["n1"], args={"seconds": 2}))
        await routed(status, task_id)
    first = asyncio.create_task(asyncio.to_thread(cron, stack, ["n1"]))

    async def acting() -> bool:
        for task_id in ("ov-a", "ov-b"):
            rec = await status.get_node(task_id, "n1")
            if rec is not None and rec.state == "running":
                return True
        return False

    await wait_for(acting)
    code, _ = cron(stack, ["n1"])  # overlaps the first: skips the node
    assert code == 0
    assert "node=n1 skipped: another cron run holds its lock" in (stack.tmp / "cron.log").read_text()
    assert (await first)[0] == 0, stack.logs()
    for task_id in ("ov-a", "ov-b"):
        assert (await status.view(task_id)).state == "succeeded"  # type: ignore[union-attr]
    a, b = sorted((i for i in stack.intervals() if i["node"] == "n1"), key=lambda i: i["start"])
    assert b["start"] >= a["end"], (a, b)
