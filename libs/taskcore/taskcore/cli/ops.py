"""Operator commands on the safety core: cluster budgets, breakers, leases, nodes.

Read-mostly views of what lives in ZooKeeper (see `clusters`, `leases`, `registry`). They need
ZooKeeper only, not NATS, so they keep working while an operator is debugging the bus."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from aiozk import exc

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.cli import connect
from taskcore.coord import clusters, runners
from taskcore.coord.clusters import BreakerPolicy
from taskcore.coord.session import ZkSession, read_json
from taskcore.core.errors import InvalidName
from taskcore.core.settings import Settings
from taskcore.core.subjects import decode_token, encode_token

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

EXIT_OK, EXIT_INVALID = 0, 2


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """One held slot (or shared-slot member): who, its fencing token (czxid) and since when."""

    node: str
    holder: str
    znode: str
    token: int
    since: float


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
        "waiters are not shown: in ZooKeeper a waiting runner only holds a watch; "
        "`taskerman status TASK_ID` shows its nodes as pending"
    )


class BreakerView(msgspec.Struct, frozen=True, kw_only=True):
    """A cluster's breaker as seen now, with its counters per action."""

    cluster: str
    state: clusters.BreakerStateName
    reason: str
    opened_at: float | None
    failures_in_window: int
    window_s: float
    stats: dict[str, clusters.Stats]


def _name(token: str) -> str:
    """The name a znode token encodes (the raw token for a foreign znode)."""
    try:
        return decode_token(token)
    except InvalidName:
        return token


def _ago(t: float, now: float) -> str:
    return f"{max(now - t, 0.0):.1f}s ago"


async def _children(zk: ZkSession, path: str) -> list[str]:
    try:
        return sorted(await zk.client.get_children(path))
    except exc.NoNode:
        return []


async def _holder(zk: ZkSession, path: str) -> Holder | None:
    """A slot znode whose data is `<node>#<uuid>`."""
    try:
        data, stat = await zk.client.get(path)
    except exc.NoNode:
        return None
    holder, znode = data.decode(errors="replace"), path.rsplit("/", 1)[1]
    node, since = holder.rsplit("#", 1)[0], stat.created / 1000  # ctime is in milliseconds
    return Holder(node=node, holder=holder, znode=znode, token=stat.created_zxid, since=since)


async def _slots(zk: ZkSession, path: str) -> list[Holder]:
    """Holders of a `SlotSemaphore` under `path`."""
    return [
        h
        for c in await _children(zk, path)
        if c.startswith("slot-") and (h := await _holder(zk, f"{path}/{c}"))
    ]


async def _shared(zk: ZkSession, path: str, name: str) -> list[SharedHeld]:
    """Held slots of a `SharedSlots` under `path` (empty, abandoned slots are left out)."""
    out: list[SharedHeld] = []
    for slot in await _children(zk, path):
        try:
            owner = (await zk.client.get_data(f"{path}/{slot}")).decode(errors="replace")  # task or cluster
        except exc.NoNode:
            continue
        sp = f"{path}/{slot}"
        members = [h for m in await _children(zk, sp) if (h := await _holder(zk, f"{sp}/{m}"))]
        if members:
            out.append(SharedHeld(name=name, slot=slot, owner=owner, holders=members))
    return out


async def _cluster_names(zk: ZkSession, cluster: str | None) -> list[str]:
    """The given cluster, or every cluster that has a znode (undecodable, foreign names skipped)."""
    if cluster:
        return [cluster]
    names: list[str] = []
    for token in await _children(zk, "/clusters"):
        with contextlib.suppress(InvalidName):
            names.append(decode_token(token))
    return names


async def budget_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Show, set or unset a cluster's disruption budget."""
    if args.unset and args.n is not None:
        print("taskerman cluster budget: give N or --unset, not both", file=sys.stderr)
        return EXIT_INVALID
    if args.n is not None and args.n < 1:
        print(f"taskerman cluster budget: N must be >= 1, got {args.n} (--unset removes it)", file=sys.stderr)
        return EXIT_INVALID
    async with connect.zookeeper(settings) as zk:
        if args.unset or args.n is not None:
            config = await clusters.set_budget(zk, args.cluster, None if args.unset else args.n)
        else:
            config = await clusters.read_config(zk, args.cluster)
    shown = "no budget (only task limits apply)" if config.budget is None else f"budget {config.budget}"
    print(f"{args.cluster}: {shown}")
    return EXIT_OK


async def _breaker_view(zk: ZkSession, cluster: str, policy: BreakerPolicy, now: float) -> BreakerView:
    s = await clusters.Breaker(zk, cluster, policy).read()
    stats_dir = f"/stats/{encode_token(cluster)}"
    stats = {
        _name(a): st
        for a in await _children(zk, stats_dir)
        if (st := await read_json(zk, f"{stats_dir}/{a}", clusters.Stats))
    }
    return BreakerView(
        cluster=cluster,
        state=clusters.view_state(s, now, policy),
        reason=s.reason,
        opened_at=s.opened_at,
        failures_in_window=sum(1 for t in s.failures if t > now - policy.window),
        window_s=policy.window,
        stats=stats,
    )


def _print_breaker(v: BreakerView, now: float) -> None:
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.opened_at or 0))
    opened = f" since {iso} ({_ago(v.opened_at, now)})" if v.opened_at else ""
    print(f"{v.cluster}: {v.state}{opened}")
    if v.reason:
        print(f"  reason: {v.reason}")
    print(f"  failures in the last {v.window_s:.0f}s: {v.failures_in_window}")
    for action, st in sorted(v.stats.items()):
        wait = f"lease wait {st.lease_wait_s:.1f}s"
        print(f"  {action:<24} executions {st.executions}  failures {st.failures}  {wait}")


async def breaker_status(args: argparse.Namespace, settings: Settings) -> int:
    """The breaker of one cluster, or of every cluster that has one."""
    policy, now = clusters.breaker_policy(settings), time.time()
    async with connect.zookeeper(settings) as zk:
        names = [
            c
            for c in await _cluster_names(zk, args.cluster)
            if args.cluster or await zk.client.exists(clusters.cluster_path(c, "breaker"))
        ]
        views = [await _breaker_view(zk, c, policy, now) for c in names]
    if args.json:
        print(msgspec.json.encode(views).decode())
        return EXIT_OK
    for v in views:
        _print_breaker(v, now)
    if not views:
        print("no breakers recorded yet (every cluster is closed)")
    return EXIT_OK


async def breaker_reset(args: argparse.Namespace, settings: Settings) -> int:
    """Close a cluster's breaker; say what it was before."""
    policy, now = clusters.breaker_policy(settings), time.time()
    async with connect.zookeeper(settings) as zk:
        breaker = clusters.Breaker(zk, args.cluster, policy)
        before = await breaker.read()
        await breaker.reset()
    was = clusters.view_state(before, now, policy)
    reason = f" ({before.reason})" if before.reason else ""
    nc = await bus.connect(settings, "taskerman-cli")
    try:
        who = audit.actor(f"cli:{getpass.getuser()}")
        await audit.Audit(nc.jetstream(), who).record(
            "breaker-reset", cluster=args.cluster, detail=f"was {was}{reason}"
        )
    finally:
        await bus.close(nc)
    print(f"{args.cluster}: breaker reset to closed; it was {was}{reason}")
    return EXIT_OK


async def breaker_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`taskerman breaker status|reset`."""
    return await {"reset": breaker_reset, "status": breaker_status}[args.breaker_cmd](args, settings)


async def _leases(zk: ZkSession, cluster: str | None) -> LeasesView:
    tasks = [
        TaskLeases(task_id=_name(t), holders=hs)
        for t in await _children(zk, "/leases/tasks")
        if (hs := await _slots(zk, f"/leases/tasks/{t}"))
    ]
    per_cluster: list[ClusterLeases] = []
    for c in await _cluster_names(zk, cluster):
        groups = clusters.cluster_path(c, "exclusion")
        exclusion = [
            s for g in await _children(zk, groups) for s in await _shared(zk, f"{groups}/{g}", _name(g))
        ]
        budget_holders = await _slots(zk, clusters.cluster_path(c, "budget"))
        budget = (await clusters.read_config(zk, c)).budget
        if cluster or budget_holders or exclusion or budget is not None:
            per_cluster.append(
                ClusterLeases(cluster=c, budget=budget, budget_holders=budget_holders, exclusion=exclusion)
            )
    global_leases = [
        s
        for a in await _children(zk, "/global")
        for s in await _shared(zk, f"/global/{a}", _name(a))
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
    slot = h.znode if h.znode.startswith("slot-") else "member"  # a shared slot's member: m-<uuid>
    return f"    {slot:<8} {h.node:<20} token {h.token:<12} since {_ago(h.since, now)}"


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
        print(f"  {s.name} {s.slot}: owner cluster {s.owner}")
        for h in s.holders:
            print(_holder_line(h, now))
    print(f"({v.note})")


async def leases_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Who holds which lease: task slots, budgets, exclusion groups, global leases."""
    async with connect.zookeeper(settings) as zk:
        view = await _leases(zk, args.cluster)
    if args.json:
        print(msgspec.json.encode(view).decode())
    else:
        _print_leases(view, time.time())
    return EXIT_OK


async def nodes_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Registered runners with heartbeat age; stale ones are marked (exit 0 regardless)."""
    async with connect.zookeeper(settings) as zk:
        found = await runners.registered(zk, args.cluster)
    now = time.time()
    if args.json:
        ages = [{"heartbeat_age_s": max(now - r.heartbeat, 0.0), "stale": r.stale(now)} for r in found]
        rows = [msgspec.structs.asdict(r) | age for r, age in zip(found, ages, strict=True)]
        print(msgspec.json.encode(rows).decode())
        return EXIT_OK
    for r in found:
        mark, actions = "STALE" if r.stale(now) else "live", ", ".join(r.actions) or "-"
        print(
            f"{r.cluster:<16} {r.node:<20} {mark:<5} heartbeat {_ago(r.heartbeat, now)}  "
            f"version {r.version}  pid {r.pid}  actions {actions}"
        )
    stale = sum(r.stale(now) for r in found)
    print(f"{len(found)} runner(s), {stale} stale (no heartbeat for over {runners.STALE_AFTER:.0f}s)")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add this module's sub-commands to the `taskerman` parser."""
    c = sub.add_parser("cluster", help="per-cluster safety settings")
    csub = c.add_subparsers(dest="cluster_cmd", required=True)
    b = csub.add_parser("budget", help="show or set a cluster's disruption budget")
    b.add_argument("cluster")
    b.add_argument("n", type=int, nargs="?", help="at most this many nodes of the cluster act at once")
    b.add_argument("--unset", action="store_true", help="remove the budget (only task limits apply)")

    br = sub.add_parser("breaker", help="circuit breakers of clusters")
    brsub = br.add_subparsers(dest="breaker_cmd", required=True)
    brsub.add_parser("reset", help="close a cluster's breaker").add_argument("cluster")
    for parent, name, text in (
        (brsub, "status", "breaker state, reason, recent failures and counters"),
        (sub, "leases", "who holds which lease"),
        (sub, "nodes", "registered runners and their heartbeats"),
    ):
        view = parent.add_parser(name, help=text)
        view.add_argument("cluster", nargs="?", help="only this cluster")
        view.add_argument("--json", action="store_true")


COMMANDS: dict[str, Command] = {
    "cluster": budget_cmd,  # `cluster budget` is the only cluster setting so far
    "breaker": breaker_cmd,
    "leases": leases_cmd,
    "nodes": nodes_cmd,
}
