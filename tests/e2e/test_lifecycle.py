"""Task lifecycle on real processes: failure thresholds, post_check stops, cancel, crash recovery,
the reconciler, replay after a fix, poison items, and the audit trail that records it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit, deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.model import Task, WorkItem
from taskcore.core.settings import Settings
from taskcore.core.signing import Signer
from taskerman_router.router import Router

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final

NODES = [f"n{i}" for i in range(1, 9)]


def sleep_task(task_id: str, nodes: list[str], limit: int = 1, **params: object) -> bytes:
    args = params.pop("args", {})
    return task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=nodes,
        limit=limit,
        task_id=task_id,
        taskerman_params={"action_args": args, **params},
    )


async def wait_for(check: object, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_max_failures_stops_task_and_skips_the_rest(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES)
    failing = ["n2", "n5", "n7"]
    await publish_raw(
        js[1],
        sleep_task(
            "mf",
            NODES,
            args={"seconds": 0.1, "fail_nodes": failing},
            workqueue_args={"retry_count": 0},
            max_failures=1,
        ),
    )
    view = await wait_final(status, "mf", stack=stack)
    assert view.state == "failed"
    states = {n: r.state for n, r in view.nodes.items()}
    dead = [n for n, s in states.items() if s == "dead"]
    skipped = [n for n, s in states.items() if s == "skipped"]
    assert len(dead) == 2, states  # stopped after the 2nd failure (max_failures 1)
    assert set(states.values()) <= {"dead", "skipped", "succeeded"}
    ran = {i["node"] for i in stack.intervals() if i["task_id"] == "mf"}
    assert not ran & set(skipped)  # no skipped node ran the action
    assert len(ran) + len(skipped) == len(NODES)
    kinds = [e.kind for e in await audit.task_events(js[1], "mf")]
    assert kinds.count("dead-lettered") == 2
    assert "stopped" in kinds
    assert kinds.count("skipped") == len(skipped)


async def test_post_check_failure_stops_the_task_at_once(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES[:4])
    await publish_raw(
        js[1],
        sleep_task(
            "fire",
            NODES[:4],
            args={"seconds": 0.1, "post_check_fail_nodes": NODES[:4]},
            workqueue_args={"retry_count": 3},
            max_failures=10,
        ),
    )
    view = await wait_final(status, "fire", stack=stack)
    assert view.state == "failed"
    states = sorted(r.state for r in view.nodes.values())
    assert states == ["dead", "skipped", "skipped", "skipped"], states  # no retry, nobody else started
    stop = await status.stopped("fire")
    assert stop is not None
    assert stop.reason == "post_check"
    out = stack.cli("breaker", "status", "c1", "--json")
    assert out.returncode == 0, out.stderr
    assert "open" in out.stdout  # the cluster may be on fire: its breaker tripped


async def test_cancel_while_rolling(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES[:6])
    await publish_raw(js[1], sleep_task("cx", NODES[:6], args={"seconds": 1.0}))

    async def two_started() -> bool:
        return len([i for i in stack.intervals() if i["task_id"] == "cx"]) >= 1

    await wait_for(two_started)
    out = stack.cli("cancel", "cx", "--reason", "operator said so")
    assert out.returncode == 0, out.stderr
    assert stack.cli("cancel", "cx").returncode == 0  # idempotent
    view = await wait_final(status, "cx", stack=stack)
    assert view.state == "cancelled"
    shown = stack.cli("status", "cx", "--json")
    assert json.loads(shown.stdout)["state"] == "cancelled", shown.stderr
    assert "state cancelled" in stack.cli("status", "cx").stdout
    watched = stack.cli("watch", "cx")
    assert watched.returncode == 1, watched.stdout  # not a success
    assert "[cancelled]" in watched.stdout
    assert "stopped: cancelled operator said so" in watched.stdout
    states = [r.state for r in view.nodes.values()]
    assert states.count("cancelled") >= 3, states
    assert set(states) <= {"succeeded", "cancelled"}
    ran = {i["node"] for i in stack.intervals() if i["task_id"] == "cx"}
    cancelled = {n for n, r in view.nodes.items() if r.state == "cancelled"}
    assert not ran & cancelled
    await asyncio.sleep(2)
    assert {i["node"] for i in stack.intervals() if i["task_id"] == "cx"} == ran  # nothing more ran


async def test_pause_mid_rollout_lets_running_nodes_finish_and_starts_nothing_until_resume(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", NODES[:6])
    await publish_raw(js[1], sleep_task("px", NODES[:6], limit=2, args={"seconds": 1.5}))

    async def two_running() -> bool:
        view = await status.view("px")
        return view is not None and [r.state for r in view.nodes.values()].count("running") == 2

    await wait_for(two_running)
    out = stack.cli("pause", "px", "--reason", "look at the graphs")
    assert out.returncode == 0, out.stderr
    assert "taskerman resume px" in out.stdout
    paused_at = time.time()
    assert "already paused" in stack.cli("pause", "px").stdout

    async def settled() -> bool:  # the two that ran have finished, and nothing else started
        view = await status.view("px")
        return view is not None and not any(r.state == "running" for r in view.nodes.values())

    await wait_for(settled)
    await asyncio.sleep(3)  # room for a node that should not start to start
    view = await status.view("px")
    assert view is not None
    assert view.state == "paused"
    assert view.paused is not None
    assert view.paused.reason == "look at the graphs"
    assert sorted(r.state for r in view.nodes.values()) == ["pending"] * 4 + ["succeeded"] * 2
    shown = stack.cli("status", "px")
    assert "state paused" in shown.stdout
    assert "`taskerman resume px`" in shown.stdout
    assert json.loads(stack.cli("status", "px", "--json").stdout)["state"] == "paused"
    resumed_at = time.time()
    ran = [i for i in stack.intervals() if i["task_id"] == "px"]
    assert len(ran) == 2  # the two that were running finished, and only they ran
    assert all(i["start"] < paused_at for i in ran)

    out = stack.cli("resume", "px")
    assert out.returncode == 0, out.stderr
    assert "task px resumed" in out.stdout
    assert "is not paused" in stack.cli("resume", "px").stdout
    view = await wait_final(status, "px", stack=stack)
    assert view.state == "succeeded"
    ran = [i for i in stack.intervals() if i["task_id"] == "px"]
    assert sorted(i["node"] for i in ran) == NODES[:6]  # each once
    assert all(i["start"] < paused_at or i["start"] > resumed_at for i in ran)
    assert max_concurrency(ran) <= 2
    kinds = [e.kind for e in await audit.task_events(js[1], "px")]
    assert kinds.count("paused") == 1
    assert kinds.count("resumed") == 1
    ended = stack.cli("pause", "px")
    assert ended.returncode == 1
    assert "has ended (succeeded)" in ended.stderr
    assert stack.cli("pause", "nope").returncode == 1


async def test_runner_killed_mid_action_is_redelivered_and_not_counted(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    victim = stack.runner("c1", ["n1"])
    await publish_raw(
        js[1], sleep_task("crash", ["n1"], args={"seconds": 2.0}, workqueue_args={"retry_count": 0})
    )

    async def running() -> bool:
        rec = await status.get_node("crash", "n1")
        return rec is not None and rec.state == "running"

    await wait_for(running)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stack.runner("c1", ["n1"])  # restarted; the item comes back after ack_wait
    view = await wait_final(status, "crash", within=60, stack=stack)
    assert view.state == "succeeded"  # retry_count 0, yet the crash did not burn the only attempt
    assert view.nodes["n1"].attempts == 2
    assert view.nodes["n1"].failures == 0

    async def trail_ended() -> bool:  # the audit event follows the ack, after the record says so
        return (await audit.task_events(js[1], "crash"))[-1].kind == "succeeded"

    await wait_for(trail_ended, within=10)
    assert "attempt-lost" in [e.kind for e in await audit.task_events(js[1], "crash")]


async def test_reconciler_dead_letters_what_no_advisory_reported(
    settings: Settings, js: tuple[NATS, JetStreamContext], status: StatusStore, signer: Signer
) -> None:
    """Max deliveries reached while no router listened for the advisory: the reconciler finds it."""
    capped = msgspec.structs.replace(settings, max_deliver=2, ack_wait=1.0)
    durable = await bus.ensure_runner_consumer(js[1], capped, "c1", "lost")
    task = Task(action="test:sleep", cluster_name="c1", task_id="rec-1", nodes=("lost",))
    item = WorkItem(task=task, node="lost", routed_at=time.time())
    subject = subjects.node_subject("c1", "lost")
    await bus.publish_work(js[1], signer, subject, msgspec.json.encode(item), "rec-1:lost")
    sub = await js[1].pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
    for _ in range(2):
        assert len(await sub.fetch(1, timeout=5)) == 1  # never acked: a runner that keeps dying
        await asyncio.sleep(1.2)
    with contextlib.suppress(TimeoutError):  # a live fetcher: the server gives up on the item now
        await sub.fetch(1, timeout=1)
    router = Router(js[0], js[1], status, ActionRegistry.installed(), {}, signer=signer)
    assert await router.reconcile() == 1
    letters = [d for _, d in await deadletter.entries(js[1]) if d.task_id == "rec-1"]
    assert len(letters) == 1
    assert "reconciler" in letters[0].reason
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 0
    assert await router.reconcile() == 0  # and only once


async def test_replay_after_the_cause_is_fixed(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, tmp_path: Path
) -> None:
    marker = tmp_path / "disk-full"
    marker.write_text("the operator's fault, fixed below")
    stack.router()
    stack.runner("c1", ["n1", "n2"], packs={"test": {"fail_marker": str(marker)}})
    await publish_raw(
        js[1],
        sleep_task("fix", ["n1"], args={"seconds": 0.05}, workqueue_args={"retry_count": 1, "backoff": 0.1}),
    )
    view = await wait_final(status, "fix", stack=stack)
    assert view.state == "dead"
    [seq] = [s for s, d in await deadletter.entries(js[1]) if d.task_id == "fix"]
    letter = await deadletter.get(js[1], seq)
    assert letter is not None
    assert letter.attempts == 2
    assert letter.first_attempt_at is not None
    assert letter.last_attempt_at is not None
    assert letter.first_attempt_at <= letter.last_attempt_at
    assert "disk-full" in letter.reason
    marker.unlink()  # the cause is fixed
    out = stack.cli("dlq", "replay", str(seq))
    assert out.returncode == 0, out.stderr

    async def succeeded() -> bool:
        v = await status.view("fix")
        return v is not None and v.state == "succeeded"

    await wait_for(succeeded)
    events = stack.cli("events", "fix")
    assert events.returncode == 0, events.stderr
    kinds = [e["kind"] for e in json.loads(stack.cli("events", "fix", "--json").stdout)]
    assert kinds.index("dead-lettered") < kinds.index("replayed") < kinds.index("succeeded")
    assert kinds[0] == "routed"


async def test_each_kind_of_poison_is_terminated_on_first_delivery(
    stack: Stack, js: tuple[NATS, JetStreamContext], signer: Signer
) -> None:
    stack.runner("c1", ["n1"])
    await asyncio.sleep(1.5)  # the runner creates its consumer
    good = WorkItem(task=Task(action="test:sleep", cluster_name="c1", task_id="x"), node="n1", routed_at=0.0)
    raw = msgspec.to_builtins(good)
    poison = {
        "p-undecodable": b"\xff\xfe not json",
        "p-schema": msgspec.json.encode({**raw, "node": 42, "task": {**raw["task"], "task_id": "p-schema"}}),
        "p-action": msgspec.json.encode(
            {**raw, "task": {**raw["task"], "task_id": "p-action", "action": "no:pe"}}
        ),
        "p-version": msgspec.json.encode(
            {**raw, "task": {**raw["task"], "task_id": "p-version", "version": 9.0}}
        ),
    }
    for i, payload in enumerate(poison.values()):
        await bus.publish_work(js[1], signer, subjects.node_subject("c1", "n1"), payload, f"poison-{i}")

    async def all_dead() -> bool:
        return len(await deadletter.entries(js[1])) == len(poison)

    await wait_for(all_dead)
    letters = [d for _, d in await deadletter.entries(js[1])]
    assert all(d.deliveries == 1 for d in letters)
    reasons = " | ".join(d.reason for d in letters)
    for needle in ("not valid JSON", "node", "unknown action", "not compatible"):
        assert needle in reasons, reasons
    assert not stack.intervals()  # none of them ran


async def test_runner_killed_after_the_side_effect_resumes_with_post_check_only(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """execute_action is recorded done before post_check starts: a runner killed during post_check
    is replaced and the node's action does not run again (the witness has one interval)."""
    stack.router()
    victim = stack.runner("c1", ["n1"])
    await publish_raw(
        js[1],
        sleep_task("resume", ["n1"], args={"seconds": 0.2, "post_check_seconds": 3.0}),
    )

    async def checking() -> bool:
        rec = await status.get_node("resume", "n1")
        return rec is not None and rec.executed

    await wait_for(checking)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stack.runner("c1", ["n1"])
    view = await wait_final(status, "resume", within=60, stack=stack)
    assert view.state == "succeeded", view
    assert view.nodes["n1"].attempts == 2
    assert [i["attempt"] for i in stack.intervals() if i["task_id"] == "resume"] == [1]


async def test_runner_killed_while_a_failed_node_holds_its_slot_in_backoff(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Limit 1: n1 fails and keeps its slot through a 5 s backoff; its runner is killed -9 then.
    The failed node is still down: its down markers keep the slot after the old session is gone,
    so n2 and n3, served again at once by a new runner, do not start (past the session timeout and
    the redelivery) until n1's own runner is back, retries and succeeds. Fails without the markers:
    n2 takes the slot once the old session expires."""
    stack.router()
    victim = stack.runner("c1", ["n1", "n2", "n3"])
    # a second each: n1 is queued (first in the plan) before whichever node came first is done
    args = {"seconds": 1.0, "fail_nodes": ["n1"], "fail_attempts": 1}
    await publish_raw(
        js[1],
        sleep_task(
            "held", ["n1", "n2", "n3"], args=args, workqueue_args={"retry_count": 3, "backoff": [5.0]}
        ),
    )

    async def in_backoff() -> bool:
        rec = await status.get_node("held", "n1")
        return rec is not None and rec.state == "retrying" and rec.failures == 1

    await wait_for(in_backoff)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stack.runner("c1", ["n2", "n3"])
    await asyncio.sleep(4.0 + 6.0 + 2.0)  # the old session's timeout, a redelivery, and some
    failed_at = next(i["end"] for i in stack.intervals() if i["task_id"] == "held" and i["node"] == "n1")
    assert not [i for i in stack.intervals() if i["task_id"] == "held" and i["start"] > failed_at]
    stack.runner("c1", ["n1"])
    view = await wait_final(status, "held", within=60, stack=stack)
    assert view.state == "succeeded", view
    assert (view.nodes["n1"].attempts, view.nodes["n1"].failures) == (2, 1)
    runs = [i for i in stack.intervals() if i["task_id"] == "held"]
    n1_done = max(i["end"] for i in runs if i["node"] == "n1")
    later = [i for i in runs if i["node"] != "n1" and i["start"] > failed_at]
    assert later  # the others ran after n1 failed
    assert all(i["start"] >= n1_done for i in later)  # n1 counted as down until it succeeded
    assert max_concurrency(stack.intervals()) == 1
