"""Operator commands on the safety core: `cluster budget|window|freeze|unfreeze`, `breaker`,
`nodes` (`leases` has its own module).

Read-mostly views of what lives in ZooKeeper (see `clusters`, `leases`, `registry`). They need
ZooKeeper only, not NATS, so they keep working while an operator is debugging the bus."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

import msgspec

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.cli import common, render
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.cli.common import EXIT_INVALID, EXIT_OK
from taskcore.coord import clusters, fleet, runners
from taskcore.coord.fleet import BreakerReading
from taskcore.coord.semaphore import read_holders
from taskcore.coord.session import ZkSession, read_json
from taskcore.core import windows
from taskcore.core.settings import Settings
from taskcore.core.subjects import encode_token
from taskcore.core.windows import WindowError


class BreakerView(msgspec.Struct, frozen=True, kw_only=True):
    """A cluster's breaker as seen now, with its counters per action."""

    cluster: str
    state: clusters.BreakerStateName
    reason: str
    opened_at: float | None
    failures_in_window: int
    window_s: float
    stats: dict[str, clusters.Stats]


async def budget_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Show, set or unset a cluster's disruption budget."""
    if args.unset and args.n is not None:
        print("taskerman cluster budget: give N or --unset, not both", file=sys.stderr)
        return EXIT_INVALID
    if args.n is not None and args.n < 1:
        print(f"taskerman cluster budget: N must be >= 1, got {args.n} (--unset removes it)", file=sys.stderr)
        return EXIT_INVALID
    async with common.connect_zookeeper(settings) as zk:
        if args.unset or args.n is not None:
            config = await clusters.set_budget(zk, args.cluster, None if args.unset else args.n)
            await _warn_unknown(zk, args.cluster, config.budget)
        else:
            config = await clusters.read_config(zk, args.cluster)
        holders = await read_holders(zk, clusters.cluster_path(args.cluster, "budget"))
    shown = "no budget (only task limits apply)" if config.budget is None else f"budget {config.budget}"
    print(f"{args.cluster}: {shown}")
    down = sorted({node for h in holders if (node := clusters.down_node(h.holder))})
    if down:
        print(f"  {len(down)} slot(s) taken by node(s) down (their health probe fails): {', '.join(down)}")
    return EXIT_OK


async def _warn_unknown(zk: ZkSession, cluster: str, budget: int | None = None) -> None:
    """A setting for a cluster no runner serves (a typo?), or a budget larger than its nodes: set
    as asked, with a warning on stderr."""
    nodes = {r.node for r in await runners.registered(zk, cluster)}
    if not nodes:
        print(
            f"warning: no runner is registered for cluster {cluster!r} (a typo? `taskerman nodes` lists "
            "the clusters served); set anyway",
            file=sys.stderr,
        )
    elif budget is not None and budget >= len(nodes):
        print(
            f"warning: budget {budget} is not below the {len(nodes)} node(s) registered for {cluster!r}: "
            "it holds back nothing until more nodes join",
            file=sys.stderr,
        )


def parse_until(text: str, now: float) -> float:
    """`--until`: a duration from now (`90m`, `2h`, `3d`) or an ISO 8601 time with its zone
    (`2026-12-24T18:00+01:00`, `…Z`); ValueError saying how to write it otherwise."""
    raw = text.strip()
    if raw[-1:].lower() in common.DURATION_UNITS and raw[:-1].replace(".", "", 1).isdigit():
        return now + common.parse_duration(raw, "--until")
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--until {text!r}: give a duration (90m, 2h, 3d) or a time like 2026-12-24T18:00+01:00"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"--until {text!r}: say which zone (2026-12-24T18:00+01:00, or Z for UTC)")
    return when.timestamp()


def _gate_lines(cluster: str, config: clusters.ClusterConfig, now: float) -> list[str]:
    """What `cluster window` and `cluster freeze` print: the windows, the freeze, open or not."""
    lines = [f"{cluster}: windows {'; '.join(config.windows) if config.windows else 'none (always open)'}"]
    if config.freeze_until is not None and config.freeze_until > now:
        why = f" ({config.freeze_reason})" if config.freeze_reason else ""
        lines.append(f"  frozen until {render.when(config.freeze_until)} by {config.frozen_by or '?'}{why}")
    shut = config.closed(now)
    lines.append(f"  closed until {render.when(shut.until)}: nothing new starts" if shut else "  open now")
    return lines


async def _audit(settings: Settings, kind: str, cluster: str, detail: str) -> None:
    nc = await bus.connect(settings, "taskerman-cli")
    try:
        await audit.Audit(nc.jetstream(), common.user()).record(kind, cluster=cluster, detail=detail)
    finally:
        await bus.close(nc)


async def window_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Show or set a cluster's maintenance windows."""
    if args.clear and args.windows:
        print("taskerman cluster window: give windows or --clear, not both", file=sys.stderr)
        return EXIT_INVALID
    change = args.clear or bool(args.windows)
    async with common.connect_zookeeper(settings) as zk:
        try:
            config = (
                await clusters.set_windows(zk, args.cluster, [] if args.clear else args.windows)
                if change
                else await clusters.read_config(zk, args.cluster)
            )
        except WindowError as e:
            print(f"taskerman cluster window: {e}", file=sys.stderr)
            return EXIT_INVALID
        if change:
            await _warn_unknown(zk, args.cluster)
    if change:
        await _audit(settings, "cluster-windows", args.cluster, "; ".join(config.windows) or "cleared")
    print("\n".join(_gate_lines(args.cluster, config, time.time())))
    return EXIT_OK


async def freeze_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Freeze a cluster until a time (nothing new starts), or lift its freeze."""
    now = time.time()
    if args.cluster_cmd == "freeze":
        try:
            until = parse_until(args.until, now)
        except ValueError as e:
            print(f"taskerman cluster freeze: {e}", file=sys.stderr)
            return EXIT_INVALID
        if until <= now:
            print(f"taskerman cluster freeze: --until {args.until!r} is in the past", file=sys.stderr)
            return EXIT_INVALID
        kind, detail = (
            "cluster-frozen",
            f"until {render.when(until)}" + (f": {args.reason}" if args.reason else ""),
        )
    else:
        until, kind, detail = now, "cluster-unfrozen", ""
    async with common.connect_zookeeper(settings) as zk:
        config = await clusters.freeze(zk, args.cluster, until, args.reason or "", common.user())
        await _warn_unknown(zk, args.cluster)
    await _audit(settings, kind, args.cluster, detail)
    print("\n".join(_gate_lines(args.cluster, config, time.time())))
    return EXIT_OK


async def _breaker_view(zk: ZkSession, b: BreakerReading, window: float, now: float) -> BreakerView:
    stats_dir = f"/stats/{encode_token(b.cluster)}"
    stats = {
        fleet.znode_name(a): st
        for a in await fleet.children(zk, stats_dir)
        if (st := await read_json(zk, f"{stats_dir}/{a}", clusters.Stats))
    }
    return BreakerView(
        cluster=b.cluster,
        state=b.state,
        reason=b.record.reason,
        opened_at=b.record.opened_at,
        failures_in_window=sum(1 for t in b.record.failures if t > now - window),
        window_s=window,
        stats=stats,
    )


def _print_breaker(v: BreakerView, now: float) -> None:
    opened = f" since {render.when(v.opened_at)} ({render.ago(v.opened_at, now)})" if v.opened_at else ""
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
    async with common.connect_zookeeper(settings) as zk:
        if args.cluster:
            readings = [await fleet.breaker(zk, args.cluster, policy, now)]
        else:
            readings = await fleet.breakers(zk, policy, now)
        views = [await _breaker_view(zk, b, policy.window, now) for b in readings]
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
    async with common.connect_zookeeper(settings) as zk:
        breaker = clusters.Breaker(zk, args.cluster, policy)
        before = await breaker.read()
        await breaker.reset()
    was = clusters.view_state(before, now, policy)
    reason = f" ({before.reason})" if before.reason else ""
    nc = await bus.connect(settings, "taskerman-cli")
    try:
        await audit.Audit(nc.jetstream(), common.user()).record(
            "breaker-reset", cluster=args.cluster, detail=f"was {was}{reason}"
        )
    finally:
        await bus.close(nc)
    print(f"{args.cluster}: breaker reset to closed; it was {was}{reason}")
    return EXIT_OK


async def breaker_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`taskerman breaker status|reset`."""
    return await {"reset": breaker_reset, "status": breaker_status}[args.breaker_cmd](args, settings)


async def nodes_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Registered runners with heartbeat age; stale ones are marked (exit 0 regardless)."""
    async with common.connect_zookeeper(settings) as zk:
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
            f"{r.cluster:<16} {r.node:<20} {mark:<5} heartbeat {render.ago(r.heartbeat, now)}  "
            f"version {r.version}  pid {r.pid}  actions {actions}"
        )
    stale = sum(r.stale(now) for r in found)
    print(f"{len(found)} runner(s), {stale} stale (no heartbeat for over {runners.STALE_AFTER:.0f}s)")
    return EXIT_OK


# --- the commands -------------------------------------------------------------------------------------


def _add_view(parent: Subparsers, name: str, text: str) -> None:
    """A read-only view: `NAME [CLUSTER] [--json]`."""
    view = parent.add_parser(name, help=text)
    view.add_argument("cluster", nargs="?", help="only this cluster")
    view.add_argument("--json", action="store_true", help=common.JSON_HELP)


class Cluster(ServerCommand):
    """`taskerman cluster budget CLUSTER [N | --unset]`, `window CLUSTER [SPEC … | --clear]`,
    `freeze CLUSTER --until WHEN [--reason R]`, `unfreeze CLUSTER`."""

    name = "cluster"

    def add_parser(self, subparsers: Subparsers) -> None:
        c = subparsers.add_parser(self.name, help="per-cluster safety settings")
        csub = c.add_subparsers(dest="cluster_cmd", required=True)
        b = csub.add_parser(
            "budget",
            help="show or set a cluster's disruption budget",
            **common.examples("taskerman cluster budget demo:web 2", "taskerman cluster budget demo:web"),
        )
        b.add_argument("cluster", help=common.CLUSTER_HELP)
        b.add_argument("n", type=int, nargs="?", help="at most this many nodes of the cluster act at once")
        b.add_argument("--unset", action="store_true", help="remove the budget (only task limits apply)")
        w = csub.add_parser(
            "window",
            help="show or set the maintenance windows: work starts only inside one",
            **common.examples(
                'taskerman cluster window demo:web "Mon-Fri 02:00-05:00 Europe/Amsterdam"',
                "taskerman cluster window demo:web --clear",
            ),
        )
        w.add_argument("cluster", help=common.CLUSTER_HELP)
        w.add_argument("windows", nargs="*", metavar="SPEC", help=f"a window, {windows.EXAMPLE}")
        w.add_argument("--clear", action="store_true", help="no windows: the cluster is always open")
        f = csub.add_parser(
            "freeze",
            help="nothing new starts on the cluster until a time (running nodes finish)",
            **common.examples('taskerman cluster freeze demo:web --until 2h --reason "release"'),
        )
        f.add_argument("cluster", help=common.CLUSTER_HELP)
        f.add_argument("--until", required=True, help="a duration (90m, 2h, 3d) or 2026-12-24T18:00+01:00")
        f.add_argument("--reason", default="", help="shown to whoever waits")
        csub.add_parser("unfreeze", help="lift a freeze").add_argument("cluster", help=common.CLUSTER_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        if args.cluster_cmd == "window":
            return await window_cmd(args, settings)
        if args.cluster_cmd in ("freeze", "unfreeze"):
            if args.cluster_cmd == "unfreeze":
                args.reason = ""
            return await freeze_cmd(args, settings)
        return await budget_cmd(args, settings)


class Breaker(ServerCommand):
    """`taskerman breaker status [CLUSTER]|reset CLUSTER`."""

    name = "breaker"

    def add_parser(self, subparsers: Subparsers) -> None:
        br = subparsers.add_parser(self.name, help="circuit breakers of clusters")
        brsub = br.add_subparsers(dest="breaker_cmd", required=True)
        brsub.add_parser("reset", help="close a cluster's breaker").add_argument(
            "cluster", help=common.CLUSTER_HELP
        )
        _add_view(brsub, "status", "breaker state, reason, recent failures and counters")

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        return await breaker_cmd(args, settings)


class Nodes(ServerCommand):
    """`taskerman nodes [CLUSTER]`."""

    name = "nodes"

    def add_parser(self, subparsers: Subparsers) -> None:
        _add_view(subparsers, self.name, "registered runners and their heartbeats")

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        return await nodes_cmd(args, settings)
