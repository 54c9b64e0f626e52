"""`taskerman leases [CLUSTER]`: who holds which lease, read from ZooKeeper (see `coord.leases`):
the m-of-n slots of each task, cluster budgets and exclusion groups, global leases. Waiters are not
shown: each waits in its lease's queue (see coord/semaphore.py)."""

from __future__ import annotations

import argparse
import time

import msgspec

from taskcore.cli import common, render
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.cli.common import EXIT_OK
from taskcore.coord import clusters, fleet, runners
from taskcore.coord.leases import TASK_LEASES_ROOT, holder_parts
from taskcore.coord.semaphore import HolderNode, read_holders
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """One held slot (or shared-slot member): who, its fencing token (czxid) and since when.
    `task` is the holding task, for the leases tasks share (budget, exclusion, global)."""

    node: str
    holder: str
    znode: str
    token: int
    since: float
    task: str | None = None


class TaskLeases(msgspec.Struct, frozen=True, kw_only=True):
    """The m-of-n slots of one task now held."""

    task_id: str
    holders: list[Holder]


class SharedHeld(msgspec.Struct, frozen=True, kw_only=True):
    """One shared slot (exclusion group or global lease): its owner and the members holding it."""

    name: str
    slot: str
    owner: str
    holders: list[Holder]


class ClusterLeases(msgspec.Struct, frozen=True, kw_only=True):
    """Leases of one cluster: its disruption budget slots and exclusion groups."""

    cluster: str
    budget: int | None
    budget_holders: list[Holder]
    exclusion: list[SharedHeld]


class LeasesView(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `taskerman leases` shows."""

    tasks: list[TaskLeases]
    clusters: list[ClusterLeases]
    global_leases: list[SharedHeld]
    tasks_filtered_by: str | None
    note: str = (
        "waiters are not shown (each waits in its lease's queue, watching the one ahead of it); "
        "`taskerman status TASK_ID` shows its nodes as pending"
    )


class Leases(ServerCommand):
    """`taskerman leases [CLUSTER]`."""

    name = "leases"

    def add_parser(self, subparsers: Subparsers) -> None:
        view = subparsers.add_parser(self.name, help="who holds which lease")
        view.add_argument("cluster", nargs="?", help="only this cluster")
        view.add_argument("--json", action="store_true", help=common.JSON_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        return await leases_cmd(args, settings)


def _holder(h: HolderNode) -> Holder:
    """A holder of the node `[<task>/]<node>#<uuid>`."""
    task, node = holder_parts(h.holder)
    return Holder(node=node, holder=h.holder, znode=h.znode, token=h.token, since=h.since, task=task)


async def _slots(zk: ZkSession, path: str) -> list[Holder]:
    """Holders of an m-of-n lease under `path`."""
    return [_holder(h) for h in await read_holders(zk, path)]


async def _shared(zk: ZkSession, path: str, name: str) -> list[SharedHeld]:
    """Owners of a shared lease under `path` (a task or a cluster), each with its holders."""
    owners: dict[str, list[Holder]] = {}
    for h in await read_holders(zk, path):
        owners.setdefault(h.owner, []).append(_holder(h))
    return [
        SharedHeld(name=name, slot=owner, owner=fleet.znode_name(owner), holders=holders)
        for owner, holders in owners.items()
    ]


async def read_leases(zk: ZkSession, cluster: str | None) -> LeasesView:
    """Who holds which lease now: task slots, budgets, exclusion groups, global leases."""
    tasks = [
        TaskLeases(task_id=fleet.znode_name(t), holders=hs)
        for t in await fleet.children(zk, TASK_LEASES_ROOT)
        if "~" not in t and (hs := await _slots(zk, f"{TASK_LEASES_ROOT}/{t}"))
    ]
    per_cluster: list[ClusterLeases] = []
    for c in [cluster] if cluster else await fleet.cluster_names(zk):
        groups = clusters.cluster_path(c, "exclusion")
        exclusion = [
            s
            for g in await fleet.children(zk, groups)
            for s in await _shared(zk, f"{groups}/{g}", fleet.znode_name(g))
        ]
        budget_holders = await _slots(zk, clusters.cluster_path(c, "budget"))
        budget = (await clusters.read_config(zk, c)).budget
        if cluster or budget_holders or exclusion or budget is not None:
            per_cluster.append(
                ClusterLeases(cluster=c, budget=budget, budget_holders=budget_holders, exclusion=exclusion)
            )
    global_leases = [
        s
        for a in await fleet.children(zk, "/global")
        for s in await _shared(zk, f"/global/{a}", fleet.znode_name(a))
        if cluster is None or s.owner == cluster
    ]
    filtered_by = None
    if cluster:
        # Task slots name only the node, so a task is tied to the cluster through its holders' node
        # names: the cluster's registered runners plus whoever holds its budget or exclusion slots
        # (a node name used in two clusters matches both; the status bucket would know, but needs NATS).
        nodes = {r.node for r in await runners.registered(zk, cluster)}
        nodes |= {h.node for cl in per_cluster for h in cl.budget_holders}
        nodes |= {h.node for cl in per_cluster for s in cl.exclusion for h in s.holders}
        if nodes:
            tasks = [t for t in tasks if any(h.node in nodes for h in t.holders)]
            filtered_by = "node (its registered runners and its budget/exclusion holders)"
        else:
            filtered_by = "nothing (no runner of the cluster is registered): all task leases are shown"
    return LeasesView(
        tasks=tasks, clusters=per_cluster, global_leases=global_leases, tasks_filtered_by=filtered_by
    )


def _holder_line(h: Holder, now: float) -> str:
    task = f"  task {h.task}" if h.task else ""
    return f"    {h.node:<20} token {h.token:<12} since {render.ago(h.since, now)}{task}"


def _print_leases(v: LeasesView, now: float) -> None:
    matched = f"; matched to the cluster by {v.tasks_filtered_by}" if v.tasks_filtered_by else ""
    print(f"task leases ({len(v.tasks)} held{matched})")
    for t in v.tasks:
        print(f"  task {t.task_id}: {len(t.holders)} slot(s) held")
        for h in t.holders:
            print(_holder_line(h, now))
    for c in v.clusters:
        limit = "no budget" if c.budget is None else f"budget {len(c.budget_holders)} of {c.budget} held"
        print(f"cluster {c.cluster}: {limit}")
        for h in c.budget_holders:
            print(_holder_line(h, now))
        for s in c.exclusion:
            print(f"  exclusion {s.name}: owner task {s.owner}")
            for h in s.holders:
                print(_holder_line(h, now))
    print(f"global leases ({len(v.global_leases)} held)")
    for s in v.global_leases:
        print(f"  {s.name}: owner cluster {s.owner}")
        for h in s.holders:
            print(_holder_line(h, now))
    print(f"({v.note})")


async def leases_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Who holds which lease: task slots, budgets, exclusion groups, global leases."""
    async with common.connect_zookeeper(settings) as zk:
        view = await read_leases(zk, args.cluster)
    if args.json:
        print(msgspec.json.encode(view).decode())
    else:
        _print_leases(view, time.time())
    return EXIT_OK
