"""A task's overall state, derived from its own record and its nodes' records."""

from __future__ import annotations

import msgspec
import pytest

from taskcore.bus.tracking import CHUNK_BYTES, CHUNK_NODES, chunked, derive_state, planned, waves_of
from taskcore.core.model import NodeRecord, NodeStateName, Task, TaskRecord, TaskStateName, Wave

TASK = Task(action="test:sleep", cluster_name="demo:web", task_id="t1")
NODES = ("node-1", "node-2", "node-3")


ROUTED = TaskRecord(task=TASK, state="routed", node_count=3, created_at=1.0, routed_at=2.0, plan_id="p")


def _state(rec: TaskRecord, records: dict[str, NodeRecord], names: tuple[str, ...] = NODES) -> TaskStateName:
    return derive_state(rec, list(names), records)


def _records(*states: NodeStateName) -> dict[str, NodeRecord]:
    return {node: NodeRecord(state=state) for node, state in zip(NODES, states, strict=False)}


def test_pending_task() -> None:
    assert _state(TaskRecord(task=TASK, state="pending"), {}, ()) == "pending"


def test_pending_task_ignores_stray_node_records() -> None:
    rec = TaskRecord(task=TASK, state="pending")
    assert _state(rec, _records("succeeded", "succeeded", "succeeded")) == "pending"


def test_task_dead_before_routing() -> None:
    rec = TaskRecord(task=None, state="dead", error="unknown action")
    assert _state(rec, {}, ()) == "dead"


def test_routed_without_node_records() -> None:
    assert _state(ROUTED, {}) == "routed"


def test_routed_with_all_nodes_pending() -> None:
    assert _state(ROUTED, _records("pending", "pending", "pending")) == "routed"


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
    assert _state(ROUTED, _records(*states)) == "running"


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
    assert _state(ROUTED, _records(*states)) == expected


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (("succeeded", "cancelled", "cancelled"), "cancelled"),
        (("cancelled", "cancelled", "cancelled"), "cancelled"),
        (("dead", "cancelled", "succeeded"), "cancelled"),  # the operator's cancel ended it
        (("succeeded", "skipped", "skipped"), "failed"),  # stopped by failures, not by a cancel
        (("dead", "expired", "unserved"), "failed"),
    ],
)
def test_stopped(states: tuple[NodeStateName, ...], expected: TaskStateName) -> None:
    assert _state(ROUTED, _records(*states)) == expected


def test_cancelled_only_once_every_node_ended() -> None:
    assert _state(ROUTED, _records("cancelled", "running", "pending")) == "running"


def test_records_of_other_nodes_are_ignored() -> None:
    nodes = {"node-1": NodeRecord(state="succeeded"), "elsewhere": NodeRecord(state="dead")}
    assert _state(ROUTED, nodes, ("node-1",)) == "succeeded"


def test_routed_with_no_nodes_keeps_its_state() -> None:
    assert _state(ROUTED, {}, ()) == "routed"


def test_plan_chunks_are_bounded_and_keep_the_order() -> None:
    waves = tuple(Wave(nodes=tuple(f"n{w}-{i}" for i in range(1200)), group=f"z{w}") for w in range(3))
    attributes = {"n0-5": {"zone": "z0", "note": "x" * 300_000}}  # one huge node: a chunk of its own
    nodes = planned(waves, attributes)
    chunks = chunked(nodes)
    assert all(len(c.nodes) <= CHUNK_NODES for c in chunks)
    assert all(len(msgspec.json.encode(c)) <= CHUNK_BYTES or len(c.nodes) == 1 for c in chunks)
    again = [n for c in chunks for n in c.nodes]
    assert again == nodes
    assert waves_of(again) == waves
