"""The task (the wire contract), the work item, tracking records and dead letters; decoded in one place."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from taskcore.core import limits, percent
from taskcore.core.errors import InvalidTask
from taskcore.core.limits import (
    MAX_ACTION_CHARS,
    MAX_CANARY,
    MAX_DISCOVERY_CHARS,
    MAX_FAILURES,
    MAX_LIMIT,
    MAX_NAME_CHARS,
    MAX_NODES,
    MAX_NOTIFY,
    MAX_OWNER_CHARS,
    MAX_TASK_ID_CHARS,
)
from taskcore.core.subjects import token_length

MAX_RETRIES = 50
_T = TypeVar("_T")
ActionName = Annotated[
    str, msgspec.Meta(max_length=MAX_ACTION_CHARS, pattern=r"^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$")
]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
WEBHOOK_NAME = r"^[A-Za-z0-9_-]{1,64}$"
WebhookName = Annotated[str, msgspec.Meta(pattern=WEBHOOK_NAME)]
TASK_ID_PATTERN = r"^[^\s*>]*$"


class WorkqueueArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the work queue treats one node's item."""

    retry_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_RETRIES)] = 3
    # seconds before a retry: a base growing by `backoff_factor` up to `backoff_max`, or one delay
    # per retry as a list (its last value repeats)
    backoff: (
        Annotated[float, msgspec.Meta(ge=0, le=3600)] | list[Annotated[float, msgspec.Meta(ge=0, le=3600)]]
    ) = 1.0
    backoff_factor: Annotated[float, msgspec.Meta(ge=1, le=10)] = 2.0
    backoff_max: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 300.0


TopologyName = Literal["zone", "rack"]


class TaskermanParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Arguments for the action and for the queue. Defaults are left out when encoding, so a task
    that does not use a newer field still decodes on a component that predates it."""

    action_args: dict[str, Any] = {}
    workqueue_args: WorkqueueArgs = WorkqueueArgs()
    # the task stops once more nodes than this have failed (been dead-lettered); or a percentage
    # of the task's nodes ("10%"), which the router resolves (`taskcore.core.percent`)
    max_failures: Annotated[int, msgspec.Meta(ge=0, le=MAX_FAILURES)] | str = 0
    # order the nodes by this attribute (from discovery) and never let nodes with two different
    # values of it act at the same time: a rollout one zone (or rack) at a time
    topology: TopologyName | None = None
    # the routing plugin (`taskerman.routing` entry point) that orders or filters the nodes;
    # "" is the default: by name ("zone" order when `topology` is set)
    routing: Annotated[str, msgspec.Meta(max_length=100)] = ""
    # seconds after routing past which a node that has not started gives up waiting (`expired`);
    # none: a node waits for its turn as long as it takes (days, in a long rollout)
    deadline_s: Annotated[float, msgspec.Meta(gt=0, le=365 * 86400)] | None = None
    # a canary wave: the first k nodes of the plan run alone (at most `limit` at once) and must
    # all succeed before the rest start; one that fails stops the task
    canary: Annotated[int, msgspec.Meta(ge=0, le=MAX_CANARY)] = 0
    # webhooks (by name, from the scheduler's webhooks file) told when this task ends or a node
    # of it is dead-lettered, besides those that follow its cluster
    notify: Annotated[tuple[WebhookName, ...], msgspec.Meta(max_length=MAX_NOTIFY)] = ()


class Task(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A task as published on `tasks.global`; field names are the original design's."""

    action: ActionName
    cluster_name: Name
    version: float | str | None = None
    # m: a number of nodes, or a percentage of the task's nodes ("25%"), resolved by the router
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] | str = 1
    discovery: Annotated[str, msgspec.Meta(max_length=MAX_DISCOVERY_CHARS)] = "static"
    owner: Annotated[str, msgspec.Meta(max_length=MAX_OWNER_CHARS)] = ""
    task_id: Annotated[str, msgspec.Meta(max_length=MAX_TASK_ID_CHARS, pattern=TASK_ID_PATTERN)] = ""
    taskerman_params: TaskermanParams = TaskermanParams()
    nodes: Annotated[tuple[Name, ...], msgspec.Meta(max_length=MAX_NODES)] = ()
    destnode: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] = ""

    @property
    def retry_count(self) -> int:
        return self.taskerman_params.workqueue_args.retry_count

    @property
    def action_args(self) -> dict[str, Any]:
        return self.taskerman_params.action_args

    @property
    def resolved_limit(self) -> int:
        """The limit as a number: a work item's, whose percentages the router resolved."""
        return percent.number(self.limit, "limit")

    @property
    def resolved_max_failures(self) -> int:
        """`max_failures` as a number, likewise."""
        return percent.number(self.taskerman_params.max_failures, "taskerman_params.max_failures")


def resolved(task: Task, nodes: int) -> Task:
    """The task with its percentages (`limit`, `max_failures`) resolved against its `nodes` nodes."""
    params = task.taskerman_params
    limit = percent.of_nodes(task.limit, nodes, "limit")
    failures = percent.of_nodes(params.max_failures, nodes, "taskerman_params.max_failures")
    if limit == task.limit and failures == params.max_failures:
        return task
    return msgspec.structs.replace(
        task, limit=limit, taskerman_params=msgspec.structs.replace(params, max_failures=failures)
    )


class NodeInfo(msgspec.Struct, frozen=True):
    """A node as discovery found it: its name and attributes (zone, rack, seed, address …)."""

    name: Name
    attributes: dict[str, str] = {}


class WorkItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One node's share of a task, published by the router on the node's subject. It carries only
    its own node: the task's `nodes` list is left out, so an item's size does not grow with the
    task. `attributes` are the node's, from discovery; `position` is its place in the router's plan
    (0 first), the order in which the task's slot serves its nodes. `canary` names the task's
    canary nodes (the first `taskerman_params.canary` of the plan), which a node after them waits
    for."""

    task: Task
    node: Name
    routed_at: float
    attributes: dict[str, str] = {}
    position: int = 0
    canary: tuple[Name, ...] = ()


NodeStateName = Literal[
    "pending",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "dead",
    "skipped",
    "cancelled",
    "expired",
    "unserved",
]
TaskStateName = Literal["pending", "routed", "running", "paused", "succeeded", "failed", "dead", "cancelled"]
# A task in one of these states has ended: nothing more of it will run. `cancelled` is derived
# (an operator stopped it before every node ran), and so is `paused` (an operator paused it and it
# has not ended); the record itself is never written with either.
TASK_FINISHED: frozenset[TaskStateName] = frozenset({"succeeded", "failed", "dead", "cancelled"})


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    """What a node that has not started waits for, as its runner last saw it: `reason` for people
    (`budget 2/2 held by t1 on n1, n2`), `release` the command that would end the wait where one
    does (`taskerman breaker reset demo:web`), `since` when this reason began (epoch seconds). The
    runner writes it when the reason changes, never while it stays the same."""

    reason: str
    release: str = ""
    since: float = 0.0


class NodeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Tracking state of one node of one task (JSON in the status bucket)."""

    state: NodeStateName = "pending"
    attempts: int = 0  # times the action started here (a crash or lost lease does not add a failure)
    failures: int = 0  # attempts that failed; the item is dead-lettered past retry_count
    started_at: float | None = None
    finished_at: float | None = None
    first_attempt_at: float | None = None
    error: str | None = None
    token: int | None = None
    # the side effect is done: execute_action passed, recorded before post_check starts. An attempt
    # that did not settle (lost, or handed back) is resumed after it: only post_check runs again.
    # A failed attempt clears it (its retry runs every step).
    executed: bool = False
    # what the node waits for before it can start (a breaker, a lease, a pause); None once it
    # starts or ends, and while nothing holds it back
    waiting_for: Waiting | None = None


CANARY_GROUP = "canary"  # the group of a task's canary wave, its first (`taskerman_params.canary`)


class Wave(msgspec.Struct, frozen=True, omit_defaults=True):
    """Nodes of a plan that may act together (at most the task's limit at once). `group` is the
    topology value (the zone or rack) of every node in it; empty without topology; CANARY_GROUP
    for the canary wave."""

    nodes: tuple[str, ...]
    group: str = ""


class TaskRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Tracking state of a task as a whole, written by submit and the router. Its size is bounded
    whatever the number of nodes: the nodes, their order (the plan) and their attributes live in
    `plan_chunks` chunk records of plan `plan_id` (see `taskcore.bus.tracking`), so that a repeated
    routing publishes exactly the nodes recorded, without discovering again. The task itself is
    kept without its explicit `nodes` (they are in the plan)."""

    task: Task | None
    state: TaskStateName
    node_count: int = 0
    created_at: float = 0.0
    routed_at: float | None = None
    error: str | None = None
    plan_id: str = ""
    plan_chunks: int = 0


class PlannedNode(msgspec.Struct, frozen=True, omit_defaults=True):
    """A node of a routed task, in plan order: its wave (0 first), the wave's topology group and
    the node's attributes."""

    name: str
    wave: int = 0
    group: str = ""
    attributes: dict[str, str] = {}


class PlanChunk(msgspec.Struct, frozen=True):
    """A bounded slice of a task's plan (one KV value)."""

    nodes: tuple[PlannedNode, ...]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter on `tasks.dead.>`: the original payload (truncated beyond a bound), the reason,
    the delivery count, the attempts the node made (a failed node retries in place, so one delivery
    may carry several attempts), the trace id."""

    task_id: str
    cluster: str
    node: str
    reason: str
    deliveries: int
    payload: str
    attempts: int = 0
    trace_id: str = ""
    span_id: str = ""  # the span that dead-lettered it: a replay links to it
    source_subject: str = ""
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None
    dead_at: float = msgspec.field(default_factory=time.time)
    # A payload larger than the bound is kept truncated: its full size and digest say what it was.
    payload_size: int | None = None
    payload_sha256: str | None = None
    payload_truncated: bool = False


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(missing required|unknown) field `(?P<name>[^`]+)`")


def invalid_from(e: msgspec.ValidationError) -> InvalidTask:
    """Turn msgspec's message into an InvalidTask naming the field."""
    text = str(e)
    m = _PATH.search(text)
    path = m.group("path").lstrip(".") if m else ""
    problem = text[: m.start()] if m else text
    named = _NAMED.search(problem)
    if named:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return InvalidTask(problem, field=path or None)


def _decode(data: bytes | str, kind: type[_T]) -> _T:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:
        raise invalid_from(e) from e
    except msgspec.DecodeError as e:
        raise InvalidTask(f"not valid JSON ({e})") from e


def decode_task(data: bytes | str) -> Task:
    """Decode and validate a task from JSON; raises InvalidTask naming the field and the problem.
    A payload too large or too deeply nested is refused before it is decoded (`limits`)."""
    task = _decode(limits.check_payload(data, "task"), Task)
    check_task(task)
    return task


def check_task(task: Task) -> None:
    """Checks msgspec's schema cannot express: blank names, the encoded length of every name
    that goes into a subject or key (`limits`), the size of `action_args`, the version."""
    if not task.cluster_name.strip():
        raise InvalidTask("must not be blank", field="cluster_name")
    percent.check(task.limit, "limit")
    percent.check(task.taskerman_params.max_failures, "taskerman_params.max_failures")
    limits.check_token(token_length(task.cluster_name), "cluster_name")
    if task.destnode:
        if not task.destnode.strip():
            raise InvalidTask("must not be blank", field="destnode")
        limits.check_token(token_length(task.destnode), "destnode")
    for i, node in enumerate(task.nodes):
        if not node.strip():
            raise InvalidTask("must not be blank", field=f"nodes[{i}]")
        limits.check_token(token_length(node), f"nodes[{i}]")
    if task.task_id:
        limits.check_token(token_length(task.task_id), "task_id", limits.MAX_TASK_ID_TOKEN)
    if task.taskerman_params.action_args:
        limits.check_args_size(len(msgspec.json.encode(task.taskerman_params.action_args)))
    if task.version is not None:
        parse_version(task.version, field="version")


_TASK_ID = re.compile(TASK_ID_PATTERN)


def peek_task_id(data: bytes, *, in_item: bool = False) -> str:
    """Best-effort task id of a payload that did not decode (of its `task` for a work item), for
    its dead letter and record; "" when none can be read or it would not be a valid task id."""
    try:
        raw: Any = msgspec.json.decode(limits.check_payload(data))
    except (InvalidTask, msgspec.DecodeError):
        return ""
    if in_item:
        raw = raw.get("task") if isinstance(raw, dict) else None
    task_id = raw.get("task_id") if isinstance(raw, dict) else None
    if (
        not isinstance(task_id, str)
        or len(task_id) > MAX_TASK_ID_CHARS
        or not _TASK_ID.match(task_id)
        or token_length(task_id) > limits.MAX_TASK_ID_TOKEN
    ):
        return ""
    return task_id


def parse_version(value: float | str, field: str = "version") -> tuple[int, int]:
    """`1.2` or "1.2" as (major, minor)."""
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?", str(value).strip())
    if not m:
        raise InvalidTask(f"expected MAJOR.MINOR, got {value!r}", field=field)
    return int(m.group(1)), int(m.group(2) or 0)


def with_task_id(task: Task, task_id: str | None = None) -> Task:
    """The task with its id filled in (given, kept, or freshly generated)."""
    if task.task_id and not task_id:
        return task
    return msgspec.structs.replace(task, task_id=task_id or uuid.uuid4().hex[:16])


def same_task(a: Task, b: Task) -> bool:
    """Whether two tasks are one: equal but for their node lists (a routed record keeps the
    nodes in its plan, not in its task)."""
    return msgspec.structs.replace(a, nodes=()) == msgspec.structs.replace(b, nodes=())


def encode(obj: Any) -> bytes:
    """JSON-encode any of this module's structs."""
    return msgspec.json.encode(obj)


def decode_work_item(data: bytes) -> WorkItem:
    """Decode a work item; raises InvalidTask naming the field."""
    item = _decode(limits.check_payload(data, "work item"), WorkItem)
    check_task(item.task)
    if not item.task.task_id:
        raise InvalidTask("must not be empty in a work item (the router sets it)", field="task.task_id")
    percent.number(item.task.limit, "task.limit")
    percent.number(item.task.taskerman_params.max_failures, "task.taskerman_params.max_failures")
    limits.check_token(token_length(item.node), "node")
    return item


class PlanLease(msgspec.Struct, frozen=True, kw_only=True):
    """A lease each node of a planned task takes, in the order the runner takes them."""

    name: str  # global, exclusion, topology, budget, task
    limit: int | None  # holders (or owners) at once; None: not limited (no budget set)
    detail: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What routing a task would do, without doing it (the reply of `taskerman.api.plan`).
    `waves` is the ideal schedule: runners pull on their own, so nodes of a wave start as slots
    free up; with topology, the zone (or rack) lease makes it one wave at a time for real."""

    task: Task
    discovery: str  # the plugin that found the nodes, or "explicit" (`nodes` / `destnode`)
    routing: str
    nodes: tuple[NodeInfo, ...]  # in routing order
    waves: tuple[Wave, ...]
    concurrency: int  # at most this many nodes act at once: the limit, or a smaller budget
    leases: tuple[PlanLease, ...]
    breaker: str = ""  # the cluster's circuit breaker: closed, open (nothing starts) or half-open
    unserved: tuple[str, ...] = ()  # nodes no runner serves: they would be recorded `unserved`
    # the percentages the task asked for, by field (`limit`, `max_failures`): `task` has them resolved
    asked: dict[str, str] = {}


class PlanReply(msgspec.Struct, frozen=True, omit_defaults=True):
    """The reply of `taskerman.api.plan`: the plan, or why the task cannot be routed."""

    plan: Plan | None = None
    error: str = ""
    field: str | None = None
