"""The leases one node's item takes, in the one global order every item follows."""

from __future__ import annotations

from taskcore.coord import clusters
from taskcore.coord.leases import Lease, LeaseSet, SemaphoreLease, SharedLease, SharedSlots, lease_path
from taskcore.coord.session import SlotSemaphore, ZkSession
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
    """The leases a node needs, in the one global order: global lease, exclusion groups (sorted),
    the task's topology lease, the cluster's disruption budget, the task's own m-of-n slot.

    Every item takes its leases in this one order, so waits cannot form a cycle: an item
    only ever waits for a lease later in the order than every lease it holds, so the holder
    of the latest contested lease never waits and always finishes. The topology lease (one
    zone or rack of the task at a time; owner = the node's zone, so the nodes of one zone
    share it) is task-scoped like the task slot but comes before the budget, not right before
    the slot: a node of another zone then waits holding nothing cluster-wide, instead of
    sitting on a budget slot that other tasks, and the zone now acting, could use."""
    task, holder = item.task, node
    override = override or ActionOverride()
    groups = (
        override.exclusion_groups if override.exclusion_groups is not None else action_cls.exclusion_groups
    )
    global_limit = override.global_limit if override.global_limit is not None else action_cls.global_limit
    leases: list[Lease] = []
    if global_limit:
        path = f"/global/{subjects.encode_token(task.action)}"
        slots = SharedSlots(zk, path, global_limit)
        leases.append(SharedLease(f"global:{task.action}", slots, owner=cluster, holder=holder))
    for group in sorted(set(groups)):
        path = clusters.cluster_path(cluster, "exclusion", subjects.encode_token(group))
        leases.append(SharedLease(f"exclusion:{group}", SharedSlots(zk, path, 1), task.task_id, holder))
    topology = task.taskerman_params.topology
    if topology:
        zone = item.attributes.get(topology)
        if not zone:  # the router never routes such an item; refuse rather than act unfenced
            raise InvalidTask(f"node {node!r} has no {topology!r} attribute", "attributes")
        # `~` never occurs in an encoded task id, so this path cannot be another task's slots
        slots = SharedSlots(zk, f"{lease_path(task.task_id)}~topology", 1)
        leases.append(SharedLease(f"topology:{topology}", slots, owner=zone, holder=holder))
    if budget:
        sem = SlotSemaphore(zk, clusters.cluster_path(cluster, "budget"), budget)
        leases.append(SemaphoreLease("budget", sem, holder))
    leases.append(SemaphoreLease("task", SlotSemaphore(zk, lease_path(task.task_id), task.limit), holder))
    return LeaseSet(leases)
