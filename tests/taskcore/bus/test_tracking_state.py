"""A task's overall state, derived from its own record and its nodes' records."""

from __future__ import annotations

import pytest

from taskcore.bus.tracking import derive_state
from taskcore.core.model import NodeRecord, NodeStateName, Task, TaskRecord, TaskStateName

TASK = Task(action="test:sleep", cluster_name="demo:web", task_id="t1")
NODES = ("node-1", "node-2", "node-3")


def _routed(nodes: tuple[str, ...] = NODES) -> TaskRecord:
    return TaskRecord(task=TASK, state="routed", nodes=nodes, created_at=1.0, routed_at=2.0)


def _records(*states: NodeStateName) -> dict[str, NodeRecord]:
    return {node: NodeRecord(state=state) for node, state in zip(NODES, states, strict=False)}


def test_pending_task() -> None:
    assert derive_state(TaskRecord(task=TASK, state="pending"), {}) == "pending"


def test_pending_task_ignores_stray_node_records() -> None:
    rec = TaskRecord(task=TASK, state="pending", nodes=NODES)
    assert derive_state(rec, _records("succeeded", "succeeded", "succeeded")) == "pending"


def test_task_dead_before_routing() -> None:
    rec = TaskRecord(task=None, state="dead", error="unknown action")
    assert derive_state(rec, {}) == "dead"


def test_routed_without_node_records() -> None:
    assert derive_state(_routed(), {}) == "routed"


def test_routed_with_all_nodes_pending() -> None:
    assert derive_state(_routed(), _records("pending", "pending", "pending")) == "routed"


@pytest.mark.parametrize(
    "states",
    [
        ("running",),
        ("retrying",),
        ("pending", "running", "pending"),
        ("succeeded",),  # one done, the others not yet started
        ("succeeded", "succeeded", "pending"),
        ("dead", "running", "succeeded"),
        ("failed", "pending", "pending"),
    ],
)
def test_running(states: tuple[NodeStateName, ...]) -> None:
    assert derive_state(_routed(), _records(*states)) == "running"


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (("succeeded", "succeeded", "succeeded"), "succeeded"),
        (("succeeded", "dead", "succeeded"), "dead"),
        (("failed", "dead", "succeeded"), "dead"),
        (("succeeded", "failed", "succeeded"), "failed"),
        (("failed", "failed", "failed"), "failed"),
        (("dead", "dead", "dead"), "dead"),
    ],
)
def test_finished(states: tuple[NodeStateName, ...], expected: TaskStateName) -> None:
    assert derive_state(_routed(), _records(*states)) == expected


def test_records_of_other_nodes_are_ignored() -> None:
    nodes = {"node-1": NodeRecord(state="succeeded"), "elsewhere": NodeRecord(state="dead")}
    assert derive_state(_routed(("node-1",)), nodes) == "succeeded"


def test_routed_with_no_nodes_keeps_its_state() -> None:
    assert derive_state(_routed(()), {}) == "routed"
