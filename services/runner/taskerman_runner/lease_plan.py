"""The leases one node's item takes, in the one global order every item follows."""

from __future__ import annotations

from taskcore.coord import clusters
from taskcore.coord.leases import Lease, LeaseSet, QueuedLease, lease_path, shared_holder
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.actions import Action
from taskcore.core.errors import InvalidTask
from taskcore.core.model import WorkItem
from taskerman_runner.config import ActionOverride


def leases_for(
    item: WorkItem,
    action_cls: type[Action],
    budget: int | None,
    *,
    zk: ZkSession,
    cluster: str,
    node: str,
    override: ActionOverride | None = None,
) -> LeaseSet:
    """The leases a node needs, in the one global order: the task's own m-of-n slot, the task's
    topology lease, exclusion groups (sorted), the global lease, the cluster's disruption budget.

    Every item takes its leases in this one order, so waits cannot form a cycle: an item only
    ever waits for a lease later in the order than every lease it holds, so the holder of the
    latest contested lease never waits and always finishes. The task-scoped leases come first,
    served in the plan's order (the item's `position`): a node waiting for its turn in its own
    task holds nothing that another task could use. The cluster-wide leases follow, served in
    arrival order so that no task starves, with the budget, which every task of the cluster
    shares, taken last. The leases tasks share are held as `<task>/<node>` (`shared_holder`), so
    that a node waiting for one can say which task holds it."""
    task, holder, position = item.task, node, item.position
    shared = shared_holder(task.task_id, node)
    override = override or ActionOverride()
    groups = (
        override.exclusion_groups if override.exclusion_groups is not None else action_cls.exclusion_groups
    )
    global_limit = override.global_limit if override.global_limit is not None else action_cls.global_limit
    slot = FairSemaphore(zk, lease_path(task.task_id), task.resolved_limit)
    mine = subjects.encode_token(node)  # a task's slot counts nodes: a failed node's retry joins its marker
    leases: list[Lease] = [QueuedLease("task", slot, holder, mine, position=position)]
    topology = task.taskerman_params.topology
    if topology:
        zone = item.attributes.get(topology)
        if not zone:  # the router never routes such an item; refuse rather than act unfenced
            raise InvalidTask(f"node {node!r} has no {topology!r} attribute", "attributes")
        # `~` never occurs in an encoded task id, so this path cannot be another task's slots
        sem = FairSemaphore(zk, f"{lease_path(task.task_id)}~topology", 1)
        owner = subjects.encode_token(zone)
        leases.append(QueuedLease(f"topology:{topology}", sem, holder, owner=owner, position=position))
    for group in sorted(set(groups)):
        sem = FairSemaphore(zk, clusters.cluster_path(cluster, "exclusion", subjects.encode_token(group)), 1)
        owner = subjects.encode_token(task.task_id)
        leases.append(QueuedLease(f"exclusion:{group}", sem, shared, owner=owner))
    if global_limit:
        sem = FairSemaphore(zk, f"/global/{subjects.encode_token(task.action)}", global_limit)
        owner = subjects.encode_token(cluster)
        leases.append(QueuedLease(f"global:{task.action}", sem, shared, owner=owner))
    if budget:  # counted by node: a node that is down (health.py) holds its own slot already
        sem = FairSemaphore(zk, clusters.cluster_path(cluster, "budget"), budget)
        leases.append(QueuedLease("budget", sem, shared, owner=mine))
    return LeaseSet(leases)
