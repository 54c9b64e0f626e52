"""A task from `tasks.global` through real router and runner processes, on real NATS and ZooKeeper."""

from __future__ import annotations

import json
import time

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final

NODES = [f"node-{i}" for i in range(1, 7)]


async def test_rolling_sleep_respects_limit(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router({"demo:web": NODES})
    stack.runner("demo:web", NODES[:3])
    stack.runner("demo:web", NODES[3:])
    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="demo:web",
            limit=2,
            task_id="roll-1",
            owner="alice",
            taskerman_params={"action_args": {"seconds": 0.6}},
        ),
    )
    view = await wait_final(status, "roll-1", stack=stack)
    assert view.state == "succeeded", view
    assert sorted(view.nodes) == NODES
    for rec in view.nodes.values():
        assert rec.state == "succeeded"
        assert rec.started_at is not None
        assert rec.finished_at is not None
        assert rec.finished_at >= rec.started_at
    intervals = [i for i in stack.intervals() if i["task_id"] == "roll-1"]
    assert sorted(i["node"] for i in intervals) == NODES  # each node ran exactly once
    assert max_concurrency(intervals) <= 2
    assert max_concurrency(intervals) == 2  # and the window was used, not serialised
    tokens = [i["token"] for i in intervals]
    assert len(set(tokens)) == len(tokens)  # every slot grant has its own fencing token

    watched = stack.cli("watch", "roll-1")
    assert watched.returncode == 0, watched.stderr
    assert "6/6 nodes succeeded" in watched.stdout
    listed = json.loads(stack.cli("tasks", "--json", "--state", "succeeded").stdout)
    assert [(t["task_id"], t["owner"]) for t in listed] == [("roll-1", "alice")]
    shown = stack.cli("status", "roll-1").stdout.splitlines()
    assert shown[1].startswith("  created 20"), shown  # one time format: local, with its zone
    assert shown[1].endswith(f" {time.strftime('%Z')}  owner alice"), shown
    assert " started 20" in shown[-1], shown
    assert json.loads(stack.cli("tasks", "--json", "--state", "failed").stdout) == []


async def test_failing_action_dead_letters_after_retries(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["n1"])
    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=["n1"],
            task_id="fail-1",
            taskerman_params={
                "action_args": {"seconds": 0.05, "fail": True},
                "workqueue_args": {"retry_count": 2, "backoff": 0.1},
            },
        ),
    )
    view = await wait_final(status, "fail-1", stack=stack)
    assert view.state == "dead"
    assert view.nodes["n1"].state == "dead"
    assert view.nodes["n1"].attempts == 3
    attempts = [i for i in stack.intervals() if i["task_id"] == "fail-1"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    letters = [d for _, d in await deadletter.entries(js[1]) if d.task_id == "fail-1"]
    assert len(letters) == 1
    assert letters[0].attempts == 3
    assert letters[0].deliveries == 1  # the node retried in place, holding its slot
    assert "told to fail" in letters[0].reason
    assert letters[0].node == "n1"
    assert letters[0].trace_id
    info = await js[1].stream_info(subjects.WORK_STREAM)
    assert info.state.messages == 0  # the work stream no longer holds it

    out = stack.cli("dlq", "list", "--json")
    rows = json.loads(out.stdout)
    assert [(r["task_id"], r["attempts"]) for r in rows] == [("fail-1", 3)]
    listed = stack.cli("dlq", "list").stdout.splitlines()
    assert listed[0].split() == ["ID", "TASK", "NODE", "TRIES", "REASON"], listed
    shown = json.loads(stack.cli("dlq", "show", "fail-1").stdout)  # by task id too
    assert shown["id"] == rows[0]["id"]
    assert shown["payload"]["node"] == "n1"  # the work item as JSON, not an escaped string
    missing = stack.cli("dlq", "show", "nope")
    assert missing.returncode == 1
    assert "no dead letter 'nope' (an ID from `dlq list`, or a task id)" in missing.stderr


async def test_invalid_tasks_become_dead_letters_and_router_keeps_going(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router({"c1": ["n1"]})
    stack.runner("c1", ["n1"])
    bad = {
        "garbage": b"\x00\xffnot json at all",
        "invalid-json": b'{"action": "test:sleep", ',
        "missing": task_json(action="test:sleep"),
        "limit0": task_json(action="test:sleep", cluster_name="c1", limit=0),
        "unknown-action": task_json(action="nope:never", cluster_name="c1"),
        "bad-args": task_json(
            action="test:sleep", cluster_name="c1", taskerman_params={"action_args": {"secs": 1}}
        ),
        "unknown-cluster": task_json(action="test:sleep", cluster_name="no-such-cluster"),
    }
    for payload in bad.values():
        await publish_raw(js[1], payload)
    await publish_raw(js[1], task_json(action="test:sleep", cluster_name="c1", task_id="ok-after"))
    view = await wait_final(status, "ok-after", stack=stack)
    assert view.state == "succeeded"
    letters = [d for _, d in await deadletter.entries(js[1])]
    reasons = [d.reason for d in letters]
    assert len(letters) == len(bad), reasons
    expect = [
        "not valid JSON",
        "not valid JSON",
        "cluster_name",
        "limit",
        "nope:never",
        "secs",
        "no-such-cluster",
    ]
    for needle, reason in zip(expect, reasons, strict=True):
        assert needle in reason, (needle, reason)
    assert all(d.payload for d in letters)  # the original payload is kept


async def test_same_task_id_runs_once_per_node(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router({"c1": ["n1", "n2"]})
    stack.runner("c1", ["n1", "n2"])
    payload = task_json(
        action="test:sleep",
        cluster_name="c1",
        limit=2,
        task_id="twice",
        taskerman_params={"action_args": {"seconds": 0.1}},
    )
    await publish_raw(js[1], payload)
    await wait_final(status, "twice", stack=stack)
    await publish_raw(js[1], payload)  # past the routing: the router sees the task again
    out = stack.cli(  # the same task again, from the CLI
        "submit",
        "test:sleep",
        "--cluster",
        "c1",
        "--limit",
        "2",
        "--arg",
        "seconds=0.1",
        "--task-id",
        "twice",
        "--wait",
    )
    assert out.returncode == 0, out.stderr
    assert "already submitted" in out.stderr
    other = stack.cli("submit", "test:sleep", "--cluster", "c1", "--task-id", "twice")  # another task
    assert other.returncode == 2, other.stderr
    assert "is already another task's" in other.stderr
    await publish_raw(
        js[1], task_json(action="test:sleep", cluster_name="c1", nodes=["n1"], task_id="marker")
    )
    await wait_final(status, "marker", stack=stack)
    runs = [i["node"] for i in stack.intervals() if i["task_id"] == "twice"]
    assert sorted(runs) == ["n1", "n2"]


async def test_names_with_dots_colons_spaces_and_unicode(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    cluster = "cassandra:geo.counter eu"
    nodes = ["10.0.0.1:9042", "node a.b", "nœud-ü"]
    stack.router({cluster: nodes})
    stack.runner(cluster, nodes)
    out = stack.cli(
        "submit",
        "test:sleep",
        "--cluster",
        cluster,
        "--limit",
        "3",
        "--arg",
        "seconds=0.1",
        "--wait",
        "--json",
    )
    assert out.returncode == 0, out.stdout + out.stderr + stack.logs()
    task_id = json.loads(out.stdout.splitlines()[0])["task_id"]
    view = await wait_final(status, task_id)
    assert sorted(view.nodes) == sorted(nodes)
    ran = sorted((i["cluster"], i["node"]) for i in stack.intervals())
    assert ran == sorted((cluster, n) for n in nodes)
