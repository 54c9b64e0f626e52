"""Task tracking in a JetStream KV bucket: one key per task, one per node of a task.

Each key has a single writer at a time (submit/router write the task key, the node's runner its
node key), so plain puts suffice; the task's overall state is derived from the node states."""

from __future__ import annotations

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from taskcore.model import NodeRecord, TaskRecord, TaskStateName
from taskcore.subjects import encode_token

_FINISHED = {"succeeded", "failed", "dead"}


def task_key(task_id: str) -> str:
    return f"task.{encode_token(task_id)}"


def node_key(task_id: str, node: str) -> str:
    return f"node.{encode_token(task_id)}.{encode_token(node)}"


def derive_state(task: TaskRecord, nodes: dict[str, NodeRecord]) -> TaskStateName:
    """The task's state from its own record and its nodes' records."""
    if task.state in ("pending", "dead") or not task.nodes:
        return task.state
    states = [nodes[n].state if n in nodes else "pending" for n in task.nodes]
    if all(s in _FINISHED for s in states):
        if all(s == "succeeded" for s in states):
            return "succeeded"
        return "dead" if "dead" in states else "failed"
    if any(s != "pending" for s in states):
        return "running"
    return "routed"


class TaskView(msgspec.Struct, frozen=True):
    """What `taskerman status --json` prints."""

    task_id: str
    state: TaskStateName
    action: str
    cluster_name: str
    limit: int
    nodes: dict[str, NodeRecord]
    error: str | None = None
    created_at: float = 0.0


class StatusStore:
    """Reads and writes tracking records."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def put_task(self, task_id: str, rec: TaskRecord) -> None:
        await self.kv.put(task_key(task_id), msgspec.json.encode(rec))

    async def create_task(self, task_id: str, rec: TaskRecord) -> bool:
        """Write the record only if the task is unknown; False when it already exists."""
        try:
            await self.kv.create(task_key(task_id), msgspec.json.encode(rec))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def delete_task(self, task_id: str) -> None:
        await self.kv.delete(task_key(task_id))

    async def get_task(self, task_id: str) -> TaskRecord | None:
        try:
            entry = await self.kv.get(task_key(task_id))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return msgspec.json.decode(entry.value, type=TaskRecord)

    async def put_node(self, task_id: str, node: str, rec: NodeRecord) -> None:
        await self.kv.put(node_key(task_id, node), msgspec.json.encode(rec))

    async def create_node(self, task_id: str, node: str, rec: NodeRecord) -> bool:
        """Write the node's first record unless its runner got there first."""
        try:
            await self.kv.create(node_key(task_id, node), msgspec.json.encode(rec))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def get_node(self, task_id: str, node: str) -> NodeRecord | None:
        try:
            entry = await self.kv.get(node_key(task_id, node))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return msgspec.json.decode(entry.value, type=NodeRecord)

    async def update_node(self, task_id: str, node: str, **changes: object) -> NodeRecord:
        """Read-modify-write of one node's record (its runner is the only writer)."""
        rec = await self.get_node(task_id, node) or NodeRecord()
        rec = msgspec.structs.replace(rec, **changes)
        await self.put_node(task_id, node, rec)
        return rec

    async def view(self, task_id: str) -> TaskView | None:
        """The task and all its nodes, with the derived state."""
        task = await self.get_task(task_id)
        if task is None:
            return None
        nodes: dict[str, NodeRecord] = {}
        for n in task.nodes:
            nodes[n] = await self.get_node(task_id, n) or NodeRecord()
        t = task.task
        return TaskView(
            task_id=task_id,
            state=derive_state(task, nodes),
            action=t.action if t else "",
            cluster_name=t.cluster_name if t else "",
            limit=t.limit if t else 0,
            nodes=nodes,
            error=task.error,
            created_at=task.created_at,
        )
