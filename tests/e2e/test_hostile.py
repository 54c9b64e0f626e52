"""Hostile input never stops the pipeline: each reported case, then a fuzz run. Every message ends
routed or dead-lettered with a reason, no service exits, and a task's record is written only by it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.errors import InvalidTask
from taskcore.core.model import DeadLetter, decode_task, with_task_id
from taskcore.core.signing import Signer

from .conftest import Stack, publish_raw, task_json, wait_final

Js = tuple[NATS, JetStreamContext]


def _alive(stack: Stack, *procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}\n{stack.logs()}"


async def _letters(js: JetStreamContext, want: int, within: float = 20) -> list[DeadLetter]:
    deadline = time.monotonic() + within
    found: list[DeadLetter] = []
    while time.monotonic() < deadline:
        found = [d for _, d in await deadletter.entries(js)]
        if len(found) >= want:
            break
        await asyncio.sleep(0.2)
    return found


async def _valid_completes(stack: Stack, js: JetStreamContext, status: StatusStore, task_id: str) -> None:
    payload = task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=["n1"],
        task_id=task_id,
        taskerman_params={"action_args": {"seconds": 0}},
    )
    await publish_raw(js, payload)
    view = await wait_final(status, task_id, stack=stack)
    assert view.state == "succeeded", view


def _deep_args(depth: int) -> bytes:
    deep = b"[" * depth + b"1" + b"]" * depth
    return (
        b'{"action": "test:sleep", "cluster_name": "c1", "nodes": ["n1"], '
        b'"taskerman_params": {"action_args": {"x": ' + deep + b"}}}"
    )


async def test_tasks_beyond_the_bounds_are_dead_lettered_and_the_router_lives(
    stack: Stack, js: Js, status: StatusStore
) -> None:
    router, runner = stack.router(), stack.runner("c1", ["n1"])
    hostile = [
        task_json(action="test:sleep", cluster_name="c1", nodes=["😀" * 512]),
        task_json(action="test:sleep", cluster_name="c1", destnode="d" * 5_000),
        task_json(action="test:sleep", cluster_name="😀" * 300, nodes=["n1"]),
        task_json(action="test:sleep", cluster_name="c1", nodes=["n1"], limit=10**9),
        b'{"action": "test:sleep", "cluster_name": "c1", "nodes": ["n1"], "limit": 1' + b"0" * 30 + b"}",
        task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=["n1"],
            taskerman_params={"action_args": {"seconds": -5}},
        ),
        _deep_args(2_000),
        _deep_args(5_000),
    ]
    for payload in hostile:
        await publish_raw(js[1], payload)
    letters = await _letters(js[1], len(hostile))
    assert len(letters) == len(hostile), stack.logs()
    for letter in letters:
        assert letter.reason
        assert letter.deliveries == 1, letter  # refused at once: no retries, no tracebacks
    reasons = " | ".join(d.reason for d in letters)
    for word in ("nodes[0]", "destnode", "cluster_name", "limit", "seconds", "nests deeper"):
        assert word in reasons
    assert "Traceback" not in (stack.tmp / "taskerman-router.log").read_text()
    _alive(stack, router, runner)
    await _valid_completes(stack, js[1], status, "after-bounds")
    _alive(stack, router, runner)


async def test_hostile_work_items_are_dead_lettered_and_the_runner_lives(
    stack: Stack, js: Js, status: StatusStore, signer: Signer
) -> None:
    router, runner = stack.router(), stack.runner("c1", ["n1"])
    await asyncio.sleep(1.5)  # the runner creates its consumer
    subject = subjects.node_subject("c1", "n1")
    deep = b'{"task": ' + _deep_args(5_000) + b', "node": "n1", "routed_at": 0}'
    items = [b'{"task": "x", "node": "n02", "routed_at": 0}', deep, b"\xff\xfe", b"[]", b"null"]
    for i, item in enumerate(items):
        await bus.publish_work(js[1], signer, subject, item, f"hostile-{i}")  # signed: the decoder's test
    letters = await _letters(js[1], len(items))
    assert len(letters) == len(items), stack.logs()
    assert all(d.reason and d.deliveries == 1 for d in letters), letters
    _alive(stack, router, runner)
    await _valid_completes(stack, js[1], status, "after-items")
    _alive(stack, router, runner)


async def test_a_malformed_task_never_clobbers_a_valid_record(
    stack: Stack, js: Js, status: StatusStore
) -> None:
    router, runner = stack.router(), stack.runner("c1", ["n1"])
    await _valid_completes(stack, js[1], status, "valid-01")
    before = await status.get_task("valid-01")
    await publish_raw(js[1], b'{"action": "nope:x", "cluster_name": "c", "task_id": "valid-01"}')
    # a valid task of another cluster under the same id is not routed under valid-01's record either
    await publish_raw(
        js[1], task_json(action="test:sleep", cluster_name="c2", nodes=["n9"], task_id="valid-01")
    )
    letters = await _letters(js[1], 2)
    assert len(letters) == 2, stack.logs()
    for letter in letters:
        assert letter.task_id == "valid-01"
        assert "task_id 'valid-01' already used by a task submitted at" in letter.reason
    assert await status.get_task("valid-01") == before
    view = await status.view("valid-01")
    assert view is not None
    assert view.state == "succeeded"
    _alive(stack, router, runner)


async def test_a_rejected_raw_task_keeps_its_task_id(stack: Stack, js: Js, status: StatusStore) -> None:
    router = stack.router()
    await publish_raw(
        js[1], b'{"action": "test:sleep", "cluster_name": "c1", "limit": 0, "task_id": "bad-01"}'
    )
    [letter] = await _letters(js[1], 1)
    assert letter.task_id == "bad-01"
    assert "limit" in letter.reason
    out = stack.cli("status", "bad-01")
    assert "unknown task" not in out.stderr, out.stderr
    assert "dead" in out.stdout + out.stderr
    view = await status.view("bad-01")
    assert view is not None
    assert view.state == "dead"
    assert view.error is not None
    assert "limit" in view.error
    _alive(stack, router)


# --- fuzz -------------------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_name = st.sampled_from(["c", "x.y", "é", "", " ", "😀" * 400, "n" * 600]) | st.text(max_size=30)
_task_id = st.sampled_from(["ok-0", "fz-a", "fz-b", "", "has space", "t" * 300]) | st.text(max_size=20)
_task = st.fixed_dictionaries(
    {"action": st.sampled_from(["test:sleep", "nope:x", "bad", "taskerman:ping"]) | st.text(max_size=12)},
    optional={
        "cluster_name": _name,
        "task_id": _task_id,
        "limit": st.integers(-5, 10**12),
        "nodes": st.lists(_name, max_size=5),
        "destnode": _name,
        "owner": st.text(max_size=20),
        "version": st.sampled_from([1, 1.0, "1.0", "9.9", "x"]),
        "taskerman_params": st.fixed_dictionaries(
            {},
            optional={
                "action_args": st.dictionaries(st.text(max_size=8), _json, max_size=3)
                | st.just({"seconds": -5})
                | st.just({"seconds": 10**9}),
                "max_failures": st.integers(-5, 10**12),
                "workqueue_args": st.fixed_dictionaries({}, optional={"retry_count": st.integers(-1, 100)}),
            },
        ),
        "extra": _json,
    },
).filter(lambda t: t.get("cluster_name") != "ok")
# tasks that mostly route (to clusters nobody runs), with ids that may repeat
_routable = st.fixed_dictionaries(
    {
        "action": st.just("test:sleep"),
        "cluster_name": _name.filter(lambda n: n not in ("c1", "fz", "ok")),
        "nodes": st.lists(_name, min_size=1, max_size=3),
    },
    optional={"task_id": _task_id, "limit": st.integers(1, 5), "owner": st.text(max_size=10)},
)
_deep = st.integers(1, 6_000).map(lambda d: b'{"action": "test:sleep", "x": ' + b"[" * d + b"]" * d + b"}")
_global_message = (
    _task.map(lambda t: json.dumps(t).encode())
    | _routable.map(lambda t: json.dumps(t).encode())
    | _json.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | _deep
)
# items never name a task id of the valid tasks: node records are keyed by task and node only
_item_task = _task.map(lambda t: {**t, "task_id": "item-" + str(t.get("task_id", ""))[:20]})
_item = st.fixed_dictionaries(
    {
        "task": _item_task
        | _json
        | st.just({"action": "test:sleep", "cluster_name": "fz", "task_id": "fz-item"}),
        "node": _name | st.just("n1"),
        "routed_at": st.floats(allow_nan=False) | st.text(max_size=3),
    }
)
_node_message = _item.map(lambda t: json.dumps(t).encode()) | st.binary(max_size=100) | _deep


def _draw(strategy: st.SearchStrategy[bytes], count: int) -> list[bytes]:
    """`count` varied messages, the same on every run (derandomized, no example database)."""
    drawn: list[bytes] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(message: bytes) -> None:
        drawn.append(message)

    collect()
    return drawn[:count]


def _routed_id(payload: bytes, msg_id: str) -> str | None:
    try:
        task = decode_task(payload)
    except InvalidTask:
        return None
    return with_task_id(task, task.task_id or msg_id).task_id


async def _settled(js: JetStreamContext, within: float) -> None:
    """Until the router has settled every task and the runner every item."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        tasks = await js.consumer_info(subjects.TASKS_STREAM, subjects.ROUTER_DURABLE)
        work = await js.consumer_info(subjects.WORK_STREAM, subjects.runner_durable("fz", "n1"))
        if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in (tasks, work)):
            return
        await asyncio.sleep(0.5)
    raise AssertionError("the pipeline did not settle")


async def test_fuzz_every_message_ends_routed_or_dead_lettered(
    stack: Stack, js: Js, status: StatusStore, signer: Signer
) -> None:
    router = stack.router()
    runners = [stack.runner("c1", ["n1"]), stack.runner("fz", ["n1"])]
    await asyncio.sleep(1.5)  # the runners create their consumers
    global_messages = _draw(_global_message, 300)
    node_messages = _draw(_node_message, 80)
    assert len(set(global_messages)) > 200  # variety
    await _valid_completes(stack, js[1], status, "ok-0")
    valid: dict[str, Any] = {"ok-0": await status.get_task("ok-0")}
    node_subject = subjects.node_subject("fz", "n1")
    for i, payload in enumerate(global_messages):
        await publish_raw(js[1], payload, msg_id=f"fz-msg-{i}")
        if i < len(node_messages):
            await bus.publish_work(js[1], signer, node_subject, node_messages[i], f"fz-item-{i}")
        if i % 60 == 59:  # valid tasks interleaved
            task_id = f"ok-{i // 60 + 1}"
            await publish_raw(
                js[1],
                task_json(
                    action="test:sleep",
                    cluster_name="c1",
                    nodes=["n1"],
                    task_id=task_id,
                    taskerman_params={"action_args": {"seconds": 0}},
                ),
            )
            valid[task_id] = None
    for task_id in valid:
        view = await wait_final(status, task_id, stack=stack)
        assert view.state == "succeeded", view
    await _settled(js[1], within=60)
    _alive(stack, router, *runners)

    letters = [d for _, d in await deadletter.entries(js[1])]
    by_payload: dict[tuple[str, str], list[DeadLetter]] = {}
    for letter in letters:
        assert letter.reason, letter
        by_payload.setdefault((letter.source_subject, letter.payload), []).append(letter)
    routed = ran = 0
    for i, payload in enumerate(global_messages):
        kept = payload[: deadletter.PAYLOAD_LIMIT].decode(errors="replace")
        if (subjects.GLOBAL, kept) in by_payload:
            continue
        routed += 1
        task_id = _routed_id(payload, f"fz-msg-{i}")
        assert task_id is not None, f"message {i} neither routed nor dead-lettered: {payload[:200]!r}"
        record = await status.get_task(task_id)
        assert record is not None, f"message {i} ({task_id}) has no record"
        assert record.state == "routed", (i, record)
    for i, payload in enumerate(node_messages):
        kept = payload[: deadletter.PAYLOAD_LIMIT].decode(errors="replace")
        if (node_subject, kept) in by_payload:
            continue
        ran += 1
        item = json.loads(payload)  # only a valid item runs
        node = await status.get_node(item["task"]["task_id"], "n1")
        assert node is not None, f"item {i} neither run nor dead-lettered: {payload[:200]!r}"
        assert node.state in ("succeeded", "dead"), (i, node)
    assert 0 < routed < len(global_messages) - 50, routed  # both outcomes, mostly dead letters
    assert 0 < ran < len(node_messages), ran
    # no record written by one task was changed by another
    for task_id, before in valid.items():
        record = await status.get_task(task_id)
        assert record is not None
        assert record.task is not None
        assert record.task.task_id == task_id
        assert record.task.cluster_name == "c1"
        if before is not None:
            assert record == before
        view = await status.view(task_id)
        assert view is not None
        assert view.state == "succeeded"
    assert msgspec.json.encode(letters)  # every letter is well-formed


async def test_nodes_without_a_runner_are_unserved_not_queued(
    stack: Stack, js: Js, status: StatusStore
) -> None:
    router, runner = stack.router(), stack.runner("c1", ["n1"])
    typos = [f"typo-{i:04}" for i in range(2_000)]
    await _valid_completes(stack, js[1], status, "warm")  # n1's runner is registered
    plan = stack.cli("plan", "test:sleep", "--cluster", "c1", "--node", "n1", "--node", "n1x")
    assert plan.returncode == 0, plan.stderr
    assert "warning: 1 node(s) have no runner and would be recorded unserved" in plan.stdout, plan.stdout
    assert "n1x" in plan.stdout

    await publish_raw(
        js[1],
        task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=["n1", *typos],
            taskerman_params={"action_args": {"seconds": 0.05}},
            task_id="typos",
        ),
    )
    view = await wait_final(status, "typos", within=90, stack=stack)
    assert view.state == "failed"
    assert view.nodes["n1"].state == "succeeded"
    unserved = {n: r for n, r in view.nodes.items() if n != "n1"}
    assert len(unserved) == len(typos)
    assert {r.state for r in unserved.values()} == {"unserved"}
    assert "no runner is registered for this node in cluster 'c1'" in (unserved["typo-0000"].error or "")
    # nothing was published for them: WORK holds no item nobody will fetch
    assert (await js[1].stream_info(subjects.WORK_STREAM)).state.messages == 0
    _alive(stack, router, runner)
