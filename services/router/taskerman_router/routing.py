"""Pure routing: which nodes a task goes to, and the work item each one gets."""

from __future__ import annotations

import hashlib

import msgspec

from taskcore import subjects
from taskcore.model import Task, WorkItem


class Route(msgspec.Struct, frozen=True):
    """One node's work item and where it is published."""

    node: str
    subject: str
    msg_id: str
    item: WorkItem


def derive_task_id(msg_id: str | None, stream_seq: int, timestamp: float) -> str:
    """A task id for a task published without one; the same on every redelivery of that message."""
    if msg_id:
        return msg_id
    return "auto-" + hashlib.sha256(f"{stream_seq}:{timestamp}".encode()).hexdigest()[:16]


def explicit_nodes(task: Task) -> list[str] | None:
    """`destnode`, or `nodes`, when the task names its targets (skipping discovery)."""
    if task.destnode:
        return [task.destnode]
    if task.nodes:
        return list(dict.fromkeys(task.nodes))
    return None


def plan(task: Task, nodes: list[str], now: float) -> list[Route]:
    """One route per node, in a stable order (by name)."""
    return [
        Route(
            node=node,
            subject=subjects.node_subject(task.cluster_name, node),
            msg_id=subjects.work_msg_id(task.task_id, node),
            item=WorkItem(task=task, node=node, routed_at=now),
        )
        for node in sorted(nodes)
    ]
