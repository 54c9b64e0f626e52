"""Planning a task's routing: discovery, then the routing plugin and topology, then its waves; and
for a preview, the leases each node will take. Routing a task and previewing it share this, so
`taskerman plan` shows what routing would do."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from taskcore.coord import clusters, runners
from taskcore.coord.clusters import BreakerPolicy
from taskcore.coord.semaphore import read_holders
from taskcore.coord.session import ZkSession
from taskcore.core.actions import Action, ActionRegistry
from taskcore.core.errors import DiscoveryError, InvalidTask
from taskcore.core.model import NodeInfo, Plan, PlanLease, Task, Wave, resolved
from taskcore.plugins import Discovery, Routing
from taskerman_router import routing

log = logging.getLogger(__name__)
EXPLICIT = "explicit"
UNSERVED_POLL = 0.5


class Resolution(msgspec.Struct, frozen=True, kw_only=True):
    """A task's nodes in routing order, and its waves; `task` is the task with its percentages
    resolved against those nodes."""

    task: Task
    discovery: str
    routing: str
    nodes: tuple[NodeInfo, ...]
    waves: tuple[Wave, ...]
    concurrency: int
    budget: int | None


class Planner:
    """Resolves tasks to ordered nodes; stateless apart from the plugins it was given."""

    def __init__(
        self,
        discovery: dict[str, Discovery],
        routings: dict[str, Routing],
        registry: ActionRegistry,
        zk: ZkSession | None = None,
        breaker_policy: BreakerPolicy | None = None,
    ) -> None:
        self.discovery = discovery
        self.routings = routings
        self.registry = registry
        self.zk = zk
        self.breaker_policy = breaker_policy or BreakerPolicy()

    async def discover(self, task: Task) -> tuple[str, list[NodeInfo]]:
        """(where the nodes came from, the nodes): the task's explicit targets, or its discovery
        plugin's answer. InvalidTask or DiscoveryError when it has none."""
        explicit = routing.explicit_nodes(task)
        if explicit:
            return EXPLICIT, [NodeInfo(name=n) for n in explicit]
        plugin = self.discovery.get(task.discovery)
        if plugin is None:
            known = ", ".join(sorted(self.discovery)) or "none"
            problem = f"unknown discovery plugin {task.discovery!r} (installed: {known})"
            raise InvalidTask(problem, "discovery")
        nodes = await plugin.nodes(task.cluster_name)
        if not nodes:
            raise DiscoveryError(f"discovery {task.discovery!r} found no nodes for {task.cluster_name!r}")
        for n in nodes:  # a plugin's mistake stops here, not as a work item no runner can decode
            if not isinstance(n, NodeInfo) or not _valid(n):
                raise DiscoveryError(f"discovery {task.discovery!r} returned an invalid node: {n!r}")
        return task.discovery, nodes

    async def unserved(self, task: Task, names: list[str], wait: float = 0.0) -> list[str]:
        """The nodes no runner serves (no registration, no valid away note; see
        `taskcore.coord.runners`), asked again for up to `wait` seconds while some are missing:
        a runner that is starting as the task arrives is not taken for an absent one. Nodes found
        by the `registry` discovery are served by definition; without ZooKeeper nothing is known."""
        if self.zk is None or (task.discovery == "registry" and not routing.explicit_nodes(task)):
            return []
        deadline = time.monotonic() + wait
        while True:
            missing = await runners.unserved(self.zk, task.cluster_name, names, time.time())
            if not missing or time.monotonic() >= deadline:
                return missing
            await asyncio.sleep(UNSERVED_POLL)
            names = missing

    async def budget(self, cluster: str) -> int | None:
        """The cluster's disruption budget; None when none is set or ZooKeeper cannot say (the
        plan is informative: the runners enforce the budget whatever it shows)."""
        if self.zk is None:
            return None
        try:
            return (await clusters.read_config(self.zk, cluster)).budget
        except Exception as e:
            log.warning("budget unknown for the plan cluster=%s error=%r", cluster, e)
            return None

    async def down(self, cluster: str) -> list[str]:
        """The nodes whose failing health probe takes a slot of the cluster's budget now (the
        runner's health watch); none when ZooKeeper cannot say."""
        if self.zk is None:
            return []
        try:
            holders = await read_holders(self.zk, clusters.cluster_path(cluster, "budget"))
        except Exception as e:
            log.warning("budget holders unknown for the plan cluster=%s error=%r", cluster, e)
            return []
        return sorted({n for h in holders if (n := clusters.down_node(h.holder))})

    async def resolve(self, task: Task) -> Resolution:
        """Discover, order (routing plugin, topology), resolve the percentages against the nodes
        routing kept, and cut into waves."""
        source, found = await self.discover(task)
        ordered = routing.order_nodes(task, found, self.routings, source)
        task = resolved(task, len(ordered))
        budget = await self.budget(task.cluster_name)
        concurrency = min(task.resolved_limit, budget) if budget else task.resolved_limit
        return Resolution(
            task=task,
            discovery=source,
            routing=routing.routing_name(task),
            nodes=tuple(ordered),
            waves=routing.waves(task, ordered, concurrency),
            concurrency=concurrency,
            budget=budget,
        )

    async def preview(self, task: Task) -> Plan:
        """The plan of a task, without routing it: validation, resolution, leases, breaker. The
        plan's task has its percentages resolved; `asked` keeps what they were."""
        action_cls, _ = self.registry.resolve(task)
        res = await self.resolve(task)
        asked = {
            name: value
            for name, value in (("limit", task.limit), ("max_failures", task.taskerman_params.max_failures))
            if isinstance(value, str)
        }
        task = res.task
        breaker = ""
        if self.zk is not None:
            try:
                breaker = await clusters.Breaker(self.zk, task.cluster_name, self.breaker_policy).state()
            except Exception as e:
                log.warning("breaker unknown for the plan cluster=%s error=%r", task.cluster_name, e)
        leases = plan_leases(task, action_cls, res, known_budget=self.zk is not None)
        if res.budget and (down := await self.down(task.cluster_name)):
            budget = leases[-1]
            taken = f"; now {len(down)} slot(s) taken by node(s) down: {', '.join(down)}"
            leases = (*leases[:-1], msgspec.structs.replace(budget, detail=budget.detail + taken))
        return Plan(
            task=task,
            discovery=res.discovery,
            routing=res.routing,
            nodes=res.nodes,
            waves=res.waves,
            concurrency=res.concurrency,
            leases=leases,
            breaker=breaker,
            unserved=tuple(await self.unserved(task, [n.name for n in res.nodes])),
            asked=asked,
        )


def _valid(node: NodeInfo) -> bool:
    """A name a work item and a subject can carry, and string attributes."""
    name_ok = isinstance(node.name, str) and bool(node.name.strip()) and len(node.name) <= 512
    attrs = node.attributes
    return name_ok and isinstance(attrs, dict) and all(isinstance(v, str) for v in [*attrs, *attrs.values()])


def plan_leases(
    task: Task, action_cls: type[Action], res: Resolution, known_budget: bool
) -> tuple[PlanLease, ...]:
    """The leases each node takes, in the runner's order (see taskerman_runner.lease_plan), as
    the action declares them (a node's runner config may override groups and global limit)."""
    detail = (
        f"at most {task.resolved_limit} of the task's {len(res.nodes)} node(s) at once, in plan order "
        "(fencing token: the slot)"
    )
    out: list[PlanLease] = [PlanLease(name="task", limit=task.resolved_limit, detail=detail)]
    key = routing.topology_key(task)
    if key:
        groups = len(res.waves)
        detail = f"one {key} at a time, {groups} {key}(s) in plan order (owner: the node's {key})"
        out.append(PlanLease(name="topology", limit=1, detail=detail))
    for group in sorted(set(action_cls.exclusion_groups)):
        detail = f"group {group!r}: no other task of the group acts on the cluster meanwhile (owner: task)"
        out.append(PlanLease(name="exclusion", limit=1, detail=detail))
    if action_cls.global_limit:
        n = action_cls.global_limit
        detail = f"at most {n} cluster(s) run {task.action} at once, fleet-wide (owner: the cluster)"
        out.append(PlanLease(name="global", limit=n, detail=detail))
    if res.budget:
        detail = f"cluster disruption budget: at most {res.budget} node(s) of the cluster at once, any task"
        out.append(PlanLease(name="budget", limit=res.budget, detail=detail))
    else:
        detail = "no disruption budget set for the cluster" if known_budget else "unknown (no ZooKeeper)"
        out.append(PlanLease(name="budget", limit=None, detail=detail))
    return tuple(out)
