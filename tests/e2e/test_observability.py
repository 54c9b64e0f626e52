"""One trace per task across submit → router → every runner, exported to the local span file and
rendered by `taskerman trace`."""

from __future__ import annotations

import json
from collections import Counter

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus.tracking import StatusStore
from taskcore.core.settings import Settings
from taskcore.obs import tracing

from .conftest import Stack, wait_final

NODES = ["n1", "n2", "n3", "n4"]
STEPS = ("lease task", "pre_check", "execute_action", "post_check", "ack")


async def test_rolling_task_is_one_trace_with_every_node_and_step(
    stack: Stack, settings: Settings, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router({"c1": NODES})
    stack.runner("c1", NODES)
    out = stack.cli(
        "submit", "test:sleep", "--cluster", "c1", "--limit", "2", "--arg", "seconds=0.1", "--json"
    )
    assert out.returncode == 0, out.stderr
    task_id = json.loads(out.stdout)["task_id"]
    assert (await wait_final(status, task_id, stack=stack)).state == "succeeded"
    stack.stop()  # services flush their spans on the way out

    traces = {}
    for s in tracing.read_spans(settings.home):
        traces.setdefault(s.trace_id, []).append(s)
    [spans] = [t for t in traces.values() if any(s.attributes.get("task_id") == task_id for s in t)]
    by_id = {s.span_id: s for s in spans}
    names = Counter(s.name for s in spans)
    assert names["submit"] == 1
    assert names["route"] == 1
    assert names["run test:sleep"] == len(NODES)
    for step in STEPS:
        assert names[step] == len(NODES), (step, names)
    services = {s.name: s.service for s in spans}
    assert services["submit"] == "taskerman-cli"
    assert services["route"] == "taskerman-router"
    assert services["run test:sleep"] == "taskerman-runner"
    # parents: submit ← route ← run (one per node) ← its steps
    submit = next(s for s in spans if s.name == "submit")
    route = next(s for s in spans if s.name == "route")
    assert route.parent_id == submit.span_id
    runs = [s for s in spans if s.name == "run test:sleep"]
    assert all(r.parent_id == route.span_id for r in runs)
    assert sorted(r.attributes["node"] for r in runs) == NODES
    for s in spans:
        if s.name in ("pre_check", "execute_action", "post_check", "ack"):
            assert by_id[s.parent_id].name == "run test:sleep"
        if s.name == "lease task":
            assert by_id[s.parent_id].name == "lease wait"

    rendered = stack.cli("trace", task_id)
    assert rendered.returncode == 0, rendered.stderr
    print(rendered.stdout)
    assert rendered.stdout.count("execute_action") == len(NODES)
    assert "█" in rendered.stdout


async def test_dead_letter_keeps_the_trace_and_trace_renders_it(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["n1"])
    out = stack.cli(
        "submit",
        "test:sleep",
        "--cluster",
        "c1",
        "--node",
        "n1",
        "--retries",
        "0",
        "--arg",
        "fail=true",
        "--arg",
        "seconds=0",
        "--json",
    )
    task_id = json.loads(out.stdout)["task_id"]
    assert (await wait_final(status, task_id, stack=stack)).state == "dead"
    stack.stop()
    [letter] = [d for _, d in await deadletter.entries(js[1]) if d.task_id == task_id]
    rendered = stack.cli("trace", task_id, "--json")
    assert rendered.returncode == 0, rendered.stderr
    traces = json.loads(rendered.stdout)
    assert letter.trace_id in traces
    names = {s["name"] for s in traces[letter.trace_id]}
    assert {"submit", "route", "run test:sleep", "execute_action", "dead-letter"} <= names
    failed = [s for s in traces[letter.trace_id] if s["name"] == "execute_action"]
    assert failed[0]["status"] == "ERROR"

    [seq] = [s for s, d in await deadletter.entries(js[1]) if d.task_id == task_id]
    assert stack.cli("dlq", "replay", str(seq)).returncode == 0
    traces = json.loads(stack.cli("trace", task_id, "--json").stdout)
    replays = [s for spans in traces.values() for s in spans if s["name"] == "replay"]
    assert len(replays) == 1
    assert replays[0]["links"] == [letter.trace_id]  # the replay links to the original trace
    assert replays[0]["trace_id"] != letter.trace_id
