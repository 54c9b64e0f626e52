"""Dead-letter paths beyond the runner's own: the MAX_DELIVERIES advisory, poison items, replay;
and the trace context that every dead letter keeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskcore.core.model import DeadLetter, Task, WorkItem
from taskcore.core.settings import Settings
from taskcore.core.signing import Signer

from .conftest import Stack, publish_raw, task_json, wait_final
from .test_percentages import serving_plans

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def _dead_letters_of(js: JetStreamContext, task_id: str, within: float = 20) -> list[DeadLetter]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = [d for _, d in await deadletter.entries(js) if d.task_id == task_id]
        if found:
            return found
        await asyncio.sleep(0.2)
    return []


async def test_max_deliveries_advisory_is_dead_lettered_by_the_router(
    stack: Stack, settings: Settings, js: tuple[NATS, JetStreamContext], signer: Signer
) -> None:
    """A runner that keeps dying before it settles an item: the server gives up at max_deliver and
    the router, from the advisory, copies the item into the DLQ and deletes it from the work stream."""
    stack.router()
    capped = msgspec.structs.replace(settings, max_deliver=2, ack_wait=1.0)
    durable = await bus.ensure_runner_consumer(js[1], capped, "c1", "crashy")
    task = Task(action="test:sleep", cluster_name="c1", task_id="adv-1", nodes=("crashy",))
    item = WorkItem(task=task, node="crashy", routed_at=time.time())
    await asyncio.sleep(1.0)  # let the router subscribe to advisories
    subject = subjects.node_subject("c1", "crashy")
    await bus.publish_work(js[1], signer, subject, msgspec.json.encode(item), "adv-1:crashy")
    sub = await js[1].pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
    got = 0
    deadline = time.monotonic() + 15
    letters: list[DeadLetter] = []
    while time.monotonic() < deadline and not letters:
        with contextlib.suppress(TimeoutError):
            got += len(await sub.fetch(1, timeout=1.5))  # fetched, never acked: like a crash
        letters = [d for _, d in await deadletter.entries(js[1]) if d.task_id == "adv-1"]
    assert got == 2
    assert len(letters) == 1, stack.logs()
    assert letters[0].deliveries == 2
    assert "max deliveries" in letters[0].reason
    assert letters[0].node == "crashy"
    info = await js[1].stream_info(subjects.WORK_STREAM)
    assert info.state.messages == 0


async def test_poison_work_item_is_dead_lettered_on_first_delivery(
    stack: Stack, js: tuple[NATS, JetStreamContext], signer: Signer
) -> None:
    stack.runner("c1", ["n1"])
    await asyncio.sleep(1.5)  # the runner creates its consumer
    subject = subjects.node_subject("c1", "n1")
    await bus.publish_work(js[1], signer, subject, b'{"task": {"task_id": "poison-1"}, "node": "n1"}', "p1")
    letters = await _dead_letters_of(js[1], "poison-1")
    assert len(letters) == 1, stack.logs()
    assert letters[0].deliveries == 1
    assert "action" in letters[0].reason


async def test_trace_context_crosses_every_hop_and_replay_reruns(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["n1"])
    payload = task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=["n1"],
        task_id="traced",
        taskerman_params={"action_args": {"fail": True, "seconds": 0}, "workqueue_args": {"retry_count": 0}},
    )
    await js[1].publish(subjects.GLOBAL, payload, headers={"traceparent": TRACEPARENT})
    view = await wait_final(status, "traced", stack=stack)
    assert view.state == "dead"
    [(seq, letter)] = [(s, d) for s, d in await deadletter.entries(js[1]) if d.task_id == "traced"]
    assert letter.trace_id == TRACE_ID  # publisher → router → runner, carried in headers

    # the operator fixes the cause (here: the payload says fail; replay reruns it as it was) …
    out = stack.cli("dlq", "replay", str(seq))
    assert out.returncode == 0, out.stderr
    assert await deadletter.get(js[1], seq) is None
    again = await _dead_letters_of(js[1], "traced")
    assert len(again) == 1
    assert again[0].deliveries == 1  # a fresh budget, not the old count
    runs = [i for i in stack.intervals() if i["task_id"] == "traced"]
    assert len(runs) == 2


async def test_unknown_task_status_and_bad_submit_exit_codes(stack: Stack) -> None:
    out = stack.cli("status", "no-such-task")
    assert out.returncode == 1
    assert "unknown task" in out.stderr
    out = stack.cli("submit", "test:sleep", "--cluster", "c1", "--limit", "0")
    assert out.returncode == 2
    assert "limit" in out.stderr
    out = stack.cli("submit", "nope:never", "--cluster", "c1")
    assert out.returncode == 2
    assert "unknown action" in out.stderr
    out = stack.cli("submit", "test:sleep", "--cluster", "c1", "--arg", "seconds=abc")
    assert out.returncode == 2
    assert "seconds" in out.stderr


async def test_an_oversized_garbage_task_is_dead_lettered_truncated_and_the_router_goes_on(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """600 KB of random bytes on tasks.global: escaped whole, the dead letter would pass NATS' 1 MB.
    The router keeps the start of the payload with its size and digest, refuses to replay it, and
    routes the next task as ever."""
    router = stack.router()
    stack.runner("c1", ["n1"])
    garbage = os.urandom(600_000)
    await publish_raw(js[1], garbage, msg_id="garbage-1")
    letters: list[tuple[int, DeadLetter]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not letters:
        letters = [(s, d) for s, d in await deadletter.entries(js[1]) if d.payload_truncated]
        await asyncio.sleep(0.2)
    assert len(letters) == 1, stack.logs()
    seq, letter = letters[0]
    assert letter.payload_size == len(garbage)
    assert letter.payload_sha256 == hashlib.sha256(garbage).hexdigest()
    assert letter.payload == garbage[: deadletter.PAYLOAD_LIMIT].decode(errors="replace")
    assert letter.source_subject == subjects.GLOBAL
    assert len(letter.reason) <= deadletter.REASON_LIMIT
    assert router.poll() is None, stack.logs()

    out = stack.cli("dlq", "replay", str(seq))
    assert out.returncode == 1
    assert "truncated" in out.stderr
    assert await deadletter.get(js[1], seq) is not None  # left in place

    valid = task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=["n1"],
        task_id="after-garbage",
        taskerman_params={"action_args": {"seconds": 0}},
    )
    await publish_raw(js[1], valid)
    view = await wait_final(status, "after-garbage", stack=stack)
    assert view.state == "succeeded", stack.logs()
    assert router.poll() is None


async def test_submit_asks_a_router_first_and_refuses_what_it_cannot_route(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """An unknown cluster, routing plugin or a topology the nodes lack is exit 2 before anything
    is submitted; nodes no runner serves are a warning."""
    stack.router({"demo:web": ["n1", "n2"]})
    await serving_plans(js[0])
    for argv, says in (
        (["--cluster", "demo:wbe"], "unknown cluster"),
        (["--cluster", "demo:web", "--routing", "nope"], "unknown routing plugin 'nope'"),
        (["--cluster", "demo:web", "--topology", "zone"], "needs a 'zone' attribute"),
    ):
        out = stack.cli("submit", "test:sleep", *argv, "--task-id", "refused-1")
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        assert "the router cannot route this task" in out.stderr, out.stderr
        assert says in out.stderr, out.stderr
        assert out.stdout == ""
    assert await status.get_task("refused-1") is None  # nothing was submitted
    out = stack.cli("submit", "test:sleep", "--cluster", "demo:web", "--node", "n9", "--task-id", "typo-1")
    assert out.returncode == 0, out.stderr
    assert "1 node(s) have no runner and will be recorded unserved: n9" in out.stderr, out.stderr


async def test_a_task_id_resubmitted_with_other_settings_is_refused(stack: Stack) -> None:
    first = stack.cli(
        "submit", "test:sleep", "--cluster", "c1", "--node", "n1", "--limit", "2", "--task-id", "twice"
    )
    assert first.returncode == 0, first.stderr
    again = stack.cli(
        "submit", "test:sleep", "--cluster", "c1", "--node", "n1", "--limit", "2", "--task-id", "twice"
    )
    assert again.returncode == 0, again.stderr
    assert "was already submitted; not submitting it again" in again.stderr
    other = stack.cli(
        "submit", "test:sleep", "--cluster", "c1", "--node", "n1", "--limit", "3", "--task-id", "twice"
    )
    assert other.returncode == 2, other.stdout + other.stderr
    assert "task_id 'twice' is already another task's" in other.stderr, other.stderr
    assert "submit this one with a new task id" in other.stderr


async def test_submit_json_wait_prints_the_outcome(stack: Stack) -> None:
    stack.router()
    stack.runner("c1", ["n1"])
    out = stack.cli(
        "submit", "test:sleep", "--cluster", "c1", "--node", "n1", "--arg", "seconds=0.1",
        "--task-id", "waited", "--json", "--wait",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    view = msgspec.json.decode(out.stdout)  # one document, as `status --json`
    assert (view["task_id"], view["state"], view["nodes"]["n1"]["state"]) == (
        "waited",
        "succeeded",
        "succeeded",
    )
