"""Pure routing: the order of a task's nodes (routing plugins, topology), its waves, and the work
item each node gets. Routing plugins implement taskcore.plugins.Routing and are found by the
`taskerman.routing` entry point; the built-in ones (name, zone, seeds_last) are here."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib.metadata import entry_points

import msgspec

from taskcore.core import subjects
from taskcore.core.errors import InvalidTask
from taskcore.core.model import CANARY_GROUP, NodeInfo, PlannedNode, Task, Wave, WorkItem
from taskcore.plugins import ROUTING_GROUP, Routing

DEFAULT_ROUTING = "name"
TOPOLOGY_ROUTING = "zone"
log = logging.getLogger(__name__)


class RoutingError(InvalidTask):
    """The task cannot be routed as it asks: an unknown or failing routing plugin, no node left,
    or nodes without the attribute its topology needs."""


class Route(msgspec.Struct, frozen=True):
    """One node's work item and where it is published."""

    node: str
    subject: str
    msg_id: str
    item: WorkItem


class ByName:
    """The default: a stable order by node name."""

    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        return sorted(nodes, key=lambda n: n.name)


class ByTopology:
    """By the task's topology attribute (zone unless the task says rack), then by name; nodes
    without the attribute come last."""

    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        key = topology_key(task) or "zone"
        return sorted(nodes, key=lambda n: (key not in n.attributes, n.attributes.get(key, ""), n.name))


class SeedsLast:
    """An example plugin: by name, but nodes with `seed = "true"` last (gossip seeds of Cassandra,
    say, are restarted once the rest of the ring is back)."""

    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        return sorted(nodes, key=lambda n: (n.attributes.get("seed", "").lower() == "true", n.name))


def load_routings() -> dict[str, Routing]:
    """Every installed routing plugin (each entry point names a class built without arguments);
    one that fails to load is logged and left out (its tasks are then dead-lettered as unknown)."""
    plugins: dict[str, Routing] = {}
    for ep in entry_points(group=ROUTING_GROUP):
        try:
            plugins[ep.name] = ep.load()()
        except Exception as e:
            log.error("routing plugin %s (%s) failed to load: %r", ep.name, ep.value, e)
    return plugins


def topology_key(task: Task) -> str | None:
    return task.taskerman_params.topology


def routing_name(task: Task) -> str:
    """The routing plugin a task asked for, or the default for it."""
    if task.taskerman_params.routing:
        return task.taskerman_params.routing
    return TOPOLOGY_ROUTING if topology_key(task) else DEFAULT_ROUTING


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


def order_nodes(
    task: Task, nodes: Sequence[NodeInfo], plugins: dict[str, Routing], source: str = "discovery"
) -> list[NodeInfo]:
    """The task's nodes in routing order: the routing plugin's order, then, with topology, grouped
    by the topology value (stable, so the plugin's order holds within a zone). Duplicate names from
    discovery keep their first entry. RoutingError when the task cannot be routed as it asks."""
    first: dict[str, NodeInfo] = {}
    for n in nodes:
        first.setdefault(n.name, n)
    unique = list(first.values())
    key = topology_key(task)
    if key:
        missing = [n.name for n in unique if not n.attributes.get(key)]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" …" if len(missing) > 5 else "")
            hint = ""
            if source == "explicit":
                hint = " (explicit nodes carry no attributes: let discovery find them)"
            raise RoutingError(
                f"topology {key!r} needs a {key!r} attribute on every node; {len(missing)} of "
                f"{len(unique)} from {source} have none: {shown}{hint}",
                field="taskerman_params.topology",
            )
    name = routing_name(task)
    plugin = plugins.get(name)
    if plugin is None:
        known = ", ".join(sorted(plugins)) or "none"
        problem = f"unknown routing plugin {name!r} (installed: {known})"
        raise RoutingError(problem, "taskerman_params.routing")
    try:
        ordered = list(plugin.order(task, list(unique)))
    except Exception as e:  # pure logic: the same input would fail the same way on a retry
        raise RoutingError(f"routing plugin {name!r} failed: {e!r}", "taskerman_params.routing") from e
    seen: set[str] = set()
    for n in ordered:
        if first.get(n.name) != n or n.name in seen:
            raise RoutingError(
                f"routing plugin {name!r} returned {n.name!r}, which it was not given (or twice)",
                "taskerman_params.routing",
            )
        seen.add(n.name)
    if not ordered:
        raise RoutingError(
            f"routing plugin {name!r} left none of the {len(unique)} node(s)", "taskerman_params.routing"
        )
    if key:
        ordered.sort(key=lambda n: n.attributes[key])
    return ordered


def waves(task: Task, nodes: Sequence[NodeInfo], concurrency: int) -> tuple[Wave, ...]:
    """Groups of nodes that may act together, in order. A canary (`taskerman_params.canary`: k)
    is a wave of its own, the first k nodes, which must all succeed before the rest start. With
    topology: one wave per zone (or rack), its nodes at most `concurrency` at once. Without:
    chunks of `concurrency`, the ideal schedule (runners pull on their own, so a node starts
    whenever a slot frees)."""
    k = task.taskerman_params.canary
    head = (Wave(nodes=tuple(n.name for n in nodes[:k]), group=CANARY_GROUP),) if k and nodes else ()
    return head + _waves(task, nodes[k:], concurrency)


def _waves(task: Task, nodes: Sequence[NodeInfo], concurrency: int) -> tuple[Wave, ...]:
    key = topology_key(task)
    if key:
        out: list[Wave] = []
        for n in nodes:
            group = n.attributes[key]
            if out and out[-1].group == group:
                out[-1] = Wave(nodes=(*out[-1].nodes, n.name), group=group)
            else:
                out.append(Wave(nodes=(n.name,), group=group))
        return tuple(out)
    step = max(concurrency, 1)
    names = [n.name for n in nodes]
    return tuple(Wave(nodes=tuple(names[i : i + step])) for i in range(0, len(names), step))


def routes(task: Task, nodes: Sequence[PlannedNode], now: float) -> list[Route]:
    """One route per node, in plan order: each item carries its own node, attributes and place in
    the plan, the names of the task's canary nodes, and the task without its node list."""
    task = msgspec.structs.replace(task, nodes=())
    canary = tuple(n.name for n in nodes[: task.taskerman_params.canary])
    return [
        Route(
            node=node.name,
            subject=subjects.node_subject(task.cluster_name, node.name),
            msg_id=subjects.work_msg_id(task.task_id, node.name),
            item=WorkItem(
                task=task,
                node=node.name,
                routed_at=now,
                attributes=node.attributes,
                position=position,
                canary=canary,
            ),
        )
        for position, node in enumerate(nodes)
    ]
