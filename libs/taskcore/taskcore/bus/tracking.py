"""Task tracking in a JetStream KV bucket: one key per task, one per node of a task, and the task's
plan in bounded chunks (`plan.<task>.<plan id>.<i>`), so that no value grows with the fleet.

Each key has a single writer at a time (submit/router write the task key, the node's runner its
node key), so plain puts suffice; the task's overall state is derived from the node states. Two
keys are shared and written by compare-and-set: a task's failure count and its stop record. The
task key moves from pending to routed by compare-and-set too: of two routers racing on one task,
the plan of the first to commit is the plan, and both publish exactly its nodes."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from taskcore.core import percent
from taskcore.core.model import (
    TASK_FINISHED,
    NodeRecord,
    PlanChunk,
    PlannedNode,
    TaskRecord,
    TaskStateName,
    TopologyName,
    Wave,
)
from taskcore.core.subjects import encode_token

_FINISHED = {"succeeded", "failed", "dead", "skipped", "cancelled", "expired", "unserved"}
CHUNK_NODES = 500  # nodes per plan chunk at most
CHUNK_BYTES = 256 * 1024  # and bytes per chunk at most (attributes vary in size)
READ_CONCURRENCY = 256  # node records read at once for a view


class StopRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Why a task stopped before all its nodes ran: cancelled, too many failures, or a post_check failure."""

    reason: str
    detail: str = ""
    by: str = ""
    at: float = 0.0


class PauseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A task an operator paused: nothing new of it starts until the record is deleted (resume)."""

    by: str = ""
    at: float = 0.0
    reason: str = ""


def task_key(task_id: str) -> str:
    return f"task.{encode_token(task_id)}"


def node_key(task_id: str, node: str) -> str:
    return f"node.{encode_token(task_id)}.{encode_token(node)}"


def stop_key(task_id: str) -> str:
    return f"stop.{encode_token(task_id)}"


def pause_key(task_id: str) -> str:
    return f"pause.{encode_token(task_id)}"


def failures_key(task_id: str) -> str:
    return f"failures.{encode_token(task_id)}"


def plan_key(task_id: str, plan_id: str, index: int) -> str:
    return f"plan.{encode_token(task_id)}.{plan_id}.{index}"


def planned(waves: tuple[Wave, ...], attributes: dict[str, dict[str, str]]) -> list[PlannedNode]:
    """The nodes of a plan, in order, each with its wave, group and attributes."""
    return [
        PlannedNode(name=n, wave=i, group=w.group, attributes=attributes.get(n, {}))
        for i, w in enumerate(waves)
        for n in w.nodes
    ]


def chunked(nodes: list[PlannedNode]) -> list[PlanChunk]:
    """Slices of at most CHUNK_NODES nodes and about CHUNK_BYTES bytes (a single node larger than
    that is a chunk of its own: discovery bounds a node's attributes)."""
    chunks: list[PlanChunk] = []
    current: list[PlannedNode] = []
    size = 0
    for node in nodes:
        node_size = len(msgspec.json.encode(node))
        if current and (len(current) >= CHUNK_NODES or size + node_size > CHUNK_BYTES):
            chunks.append(PlanChunk(nodes=tuple(current)))
            current, size = [], 0
        current.append(node)
        size += node_size
    if current:
        chunks.append(PlanChunk(nodes=tuple(current)))
    return chunks


def waves_of(nodes: list[PlannedNode]) -> tuple[Wave, ...]:
    """The plan's waves again, from its nodes in order."""
    waves: list[Wave] = []
    for node in nodes:
        if len(waves) <= node.wave:
            waves.extend(Wave(nodes=(), group=node.group) for _ in range(node.wave + 1 - len(waves)))
        w = waves[node.wave]
        waves[node.wave] = Wave(nodes=(*w.nodes, node.name), group=w.group)
    return tuple(waves)


def derive_state(task: TaskRecord, names: list[str], nodes: dict[str, NodeRecord]) -> TaskStateName:
    """The task's state from its own record, its nodes' names and their records. A task whose
    nodes have all ended is `cancelled` when an operator's cancel kept any of them from running
    (the nodes that ran keep their own states, a dead one included: its letter is in the DLQ), and
    `failed` when anything else stopped it first."""
    if task.state in ("pending", "dead") or not names:
        return task.state
    states = [nodes[n].state if n in nodes else "pending" for n in names]
    if all(s in _FINISHED for s in states):
        if all(s == "succeeded" for s in states):
            return "succeeded"
        if "cancelled" in states:
            return "cancelled"
        if {"skipped", "expired", "unserved"} & set(states):
            return "failed"  # stopped before every node ran
        return "dead" if "dead" in states else "failed"
    if any(s != "pending" for s in states):
        return "running"
    return "routed"


def view_limit(task: TaskRecord) -> int:
    """The task's limit as a number: a percentage resolved against the routed node count, 0 while
    that count is unknown (not routed yet)."""
    if task.task is None:
        return 0
    if isinstance(task.task.limit, int):
        return task.task.limit
    return percent.of_nodes(task.task.limit, task.node_count, "limit") if task.node_count else 0


class TaskView(msgspec.Struct, frozen=True):
    """What `taskerman status --json` prints. `limit` is a number (a percentage resolved, 0 until
    the task is routed); `limit_asked` is what the task said when it was a percentage."""

    task_id: str
    state: TaskStateName
    action: str
    cluster_name: str
    limit: int
    nodes: dict[str, NodeRecord]
    error: str | None = None
    created_at: float = 0.0
    plan: tuple[Wave, ...] = ()  # the router's order, in waves (one per zone with topology)
    topology: TopologyName | None = None
    limit_asked: str | None = None
    paused: PauseRecord | None = None  # while paused: by whom, when, why
    owner: str = ""  # the task's `owner`, as submitted


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

    async def get_task_entry(self, task_id: str) -> tuple[TaskRecord, int] | None:
        """The record and its revision (for a compare-and-set), or None."""
        try:
            entry = await self.kv.get(task_key(task_id))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return msgspec.json.decode(entry.value, type=TaskRecord), entry.revision

    async def commit_task(self, task_id: str, rec: TaskRecord, revision: int | None) -> bool:
        """Write the record if it is still at `revision` (None: if there is none); False when
        someone else wrote it first."""
        data = msgspec.json.encode(rec)
        try:
            if revision is None:
                await self.kv.create(task_key(task_id), data)
            else:
                await self.kv.update(task_key(task_id), data, last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def put_plan(self, task_id: str, plan_id: str, nodes: list[PlannedNode]) -> int:
        """Store a plan in chunks; returns how many."""
        chunks = chunked(nodes)
        await asyncio.gather(
            *(
                self.kv.put(plan_key(task_id, plan_id, i), msgspec.json.encode(chunk))
                for i, chunk in enumerate(chunks)
            )
        )
        return len(chunks)

    async def delete_plan(self, task_id: str, plan_id: str, chunks: int) -> None:
        for i in range(chunks):
            with contextlib.suppress(Exception):
                await self.kv.delete(plan_key(task_id, plan_id, i))

    async def plan(self, rec: TaskRecord) -> list[PlannedNode]:
        """The routed nodes of a task, in plan order (empty before routing)."""
        if rec.task is None or not rec.plan_id:
            return []
        task_id = rec.task.task_id
        out: list[PlannedNode] = []
        for i in range(rec.plan_chunks):
            try:
                entry = await self.kv.get(plan_key(task_id, rec.plan_id, i))
            except KeyNotFoundError:
                continue
            if entry.value:
                out.extend(msgspec.json.decode(entry.value, type=PlanChunk).nodes)
        return out

    async def get_nodes(self, task_id: str, names: list[str]) -> dict[str, NodeRecord]:
        """The records of the named nodes that have one, read many at a time."""
        out: dict[str, NodeRecord] = {}
        for start in range(0, len(names), READ_CONCURRENCY):
            batch = names[start : start + READ_CONCURRENCY]
            records = await asyncio.gather(*(self.get_node(task_id, n) for n in batch))
            out.update({n: r for n, r in zip(batch, records, strict=True) if r is not None})
        return out

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
        """Change fields of one node's record by compare-and-set on its revision, retried on a race:
        for writers other than the node's own attempt (the router's dead letter from the
        max-deliveries advisory, a runner settling an item it could not handle), so that a
        write in between is never lost."""
        key = node_key(task_id, node)
        while True:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                rec = msgspec.structs.replace(NodeRecord(), **changes)
                try:
                    await self.kv.create(key, msgspec.json.encode(rec))
                except KeyWrongLastSequenceError:
                    continue
                return rec
            old = msgspec.json.decode(entry.value, type=NodeRecord) if entry.value else NodeRecord()
            rec = msgspec.structs.replace(old, **changes)
            try:
                await self.kv.update(key, msgspec.json.encode(rec), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return rec

    async def add_failure(self, task_id: str, by: int = 1) -> int:
        """Count one more (or, with by=-1, one fewer) failed node of the task; returns the new count."""
        key = failures_key(task_id)
        while True:
            try:
                entry = await self.kv.get(key)
                n = max(int(entry.value or b"0") + by, 0)
                await self.kv.update(key, str(n).encode(), last=entry.revision)
            except KeyNotFoundError:
                n = max(by, 0)
                try:
                    await self.kv.create(key, str(n).encode())
                except KeyWrongLastSequenceError:
                    continue
                return n
            except KeyWrongLastSequenceError:
                continue
            return n

    async def stop(self, task_id: str, rec: StopRecord) -> bool:
        """Stop the task (the first reason wins); False when it was already stopped."""
        try:
            await self.kv.create(stop_key(task_id), msgspec.json.encode(rec))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def forgive(self, task_id: str) -> None:
        """A failed node is given another chance (a dead letter replayed): it no longer counts,
        and a stop caused by failures is lifted. A cancel stays."""
        await self.add_failure(task_id, by=-1)
        stop = await self.stopped(task_id)
        if stop is not None and stop.reason != "cancelled":
            await self.kv.delete(stop_key(task_id))

    async def stopped(self, task_id: str) -> StopRecord | None:
        try:
            entry = await self.kv.get(stop_key(task_id))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=StopRecord) if entry.value else None

    async def pause(self, task_id: str, rec: PauseRecord) -> bool:
        """Pause the task; False when it was paused already (the first pause stays)."""
        try:
            await self.kv.create(pause_key(task_id), msgspec.json.encode(rec))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def resume(self, task_id: str) -> PauseRecord | None:
        """Lift the task's pause; the pause it lifted, or None when it was not paused (then nothing
        is written, so no waiting node is woken for nothing)."""
        rec = await self.paused(task_id)
        if rec is not None:
            await self.kv.delete(pause_key(task_id))
        return rec

    async def paused(self, task_id: str) -> PauseRecord | None:
        try:
            entry = await self.kv.get(pause_key(task_id))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=PauseRecord) if entry.value else None

    async def tasks(self) -> list[TaskRecord]:
        """Every task record still in the bucket (finished ones expire with its retention)."""
        out: list[TaskRecord] = []
        watcher = await self.kv.watch("task.>", ignore_deletes=True)
        try:
            while (entry := await watcher.updates(timeout=5)) is not None:  # type: ignore[no-untyped-call]
                if entry.value:
                    out.append(msgspec.json.decode(entry.value, type=TaskRecord))
        except TimeoutError:
            pass
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return out

    async def view(self, task_id: str) -> TaskView | None:
        """The task and all its nodes, with the derived state."""
        task = await self.get_task(task_id)
        if task is None:
            return None
        plan = await self.plan(task)
        names = [n.name for n in plan]
        found = await self.get_nodes(task_id, names)
        nodes = {n: found.get(n) or NodeRecord() for n in sorted(names)}
        t = task.task
        stop = await self.stopped(task_id)
        pause = await self.paused(task_id)
        state = derive_state(task, names, nodes)
        return TaskView(
            task_id=task_id,
            state="paused" if pause and state not in TASK_FINISHED else state,
            action=t.action if t else "",
            cluster_name=t.cluster_name if t else "",
            limit=view_limit(task),
            nodes=nodes,
            error=task.error or (f"stopped: {stop.reason} {stop.detail}".strip() if stop else None),
            created_at=task.created_at,
            plan=waves_of(plan),
            topology=t.taskerman_params.topology if t else None,
            limit_asked=t.limit if t and isinstance(t.limit, str) else None,
            paused=pause,
            owner=t.owner if t else "",
        )
