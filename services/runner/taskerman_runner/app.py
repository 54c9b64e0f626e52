"""taskerman-runner: wires settings, NATS, ZooKeeper and one NodeWorker per node it serves.

As a daemon it runs until SIGTERM/SIGINT: it stops fetching, gives a running action
`TASKERMAN_SHUTDOWN_GRACE` seconds (default 30) to finish, then cancels it and hands its item back;
a second signal exits at once. With `--once` (cron mode) it drains what is due for its node(s) and
exits 0 when every item it handled succeeded, 1 otherwise, 2 on a bad command line or config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

import msgspec

from taskcore.bus.stops import StopSignals
from taskcore.coord import runners
from taskcore.coord.runners import ProcessHeartbeat
from taskcore.coord.session import ZkSession
from taskcore.core import signing
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings
from taskcore.runtime import lifecycle
from taskerman_runner import config
from taskerman_runner.worker import NodeWorker

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="taskerman-runner", description="Run the work items of one or more nodes."
    )
    p.add_argument("--config", type=Path, help="node config TOML (cluster, node, [packs.*])")
    p.add_argument("--cluster", help="cluster name (without --config)")
    p.add_argument("--node", action="append", default=[], help="node name; repeat to serve several nodes")
    p.add_argument(
        "--once",
        action="store_true",
        help="cron mode: drain what is due, then exit (0: all succeeded, 1: some did not)",
    )
    return p.parse_args(argv)


def node_configs(args: argparse.Namespace) -> list[config.NodeConfig]:
    """One config per node served: --config's node, or each --node with --config's other settings."""
    base = config.load(args.config) if args.config else None
    cluster = args.cluster or (base.cluster if base else "")
    nodes = args.node or ([base.node] if base and base.node else [])
    if not cluster or not nodes:
        raise TaskermanError("give --config FILE (with cluster and node), or --cluster C and --node N...")
    base = base or config.NodeConfig(cluster=cluster)
    return [msgspec.structs.replace(base, cluster=cluster, node=n) for n in nodes]


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = Settings.from_env()
    grace = config.shutdown_grace()
    nodes = node_configs(args)
    registry = ActionRegistry.installed().only(nodes[0].enabled_packs)
    problems = config.check(nodes[0], registry)
    if problems:
        where = args.config or "node config"
        for problem in problems:
            print(f"taskerman-runner: {where}: {problem}", file=sys.stderr)
        return 2
    for name in config.unknown_overrides(nodes[0], registry):
        log.warning('[actions."%s"] in the node config: no such action is enabled here', name)
    verifier = signing.verifier_for(settings)
    if verifier is None:
        log.warning(
            "INSECURE: %s=1 and no %s: this runner runs UNSIGNED work items, so anyone who can "
            "publish on its subject can make it act",
            signing.INSECURE_ENV,
            signing.TRUSTED_ENV,
        )
    else:
        log.info("work items must be signed by one of %d trusted key(s)", len(verifier.trusted))
    async with lifecycle.connected(settings, "taskerman-runner") as c:
        stops = StopSignals(c.nc, c.status.kv)  # one subscription for every node served here
        process = ProcessHeartbeat(c.zk)
        await process.start()
        workers = [
            NodeWorker(
                js=c.js,
                status=c.status,
                zk=c.zk,
                registry=registry,
                settings=settings,
                cluster=n.cluster,
                node=n.node,
                packs=n.packs,
                overrides=n.actions,
                stops=stops,
                process=process,
                away_grace=n.away_grace,
                health=n.health,
            )
            for n in nodes
        ]
        for w in workers:
            await w.start()
        log.info(
            "runner started nodes=%s actions=%s grace=%gs",
            [f"{n.cluster}/{n.node}" for n in nodes],
            registry.names(),
            grace,
        )
        if args.once:
            async with contextlib.AsyncExitStack() as held:
                mine = [w for w in workers if await _lock_node(held, c.zk, w)]
                async with asyncio.TaskGroup() as tg:
                    drains = [tg.create_task(w.drain(stop, grace)) for w in mine]
            for w in workers:
                await w.registration.leave()
            unsettled = sum(d.result() for d in drains)
            log.info("cron run finished: %d item(s) did not succeed", unsettled)
            return 1 if unsettled else 0
        async with asyncio.TaskGroup() as tg:
            tg.create_task(process.run(stop))
            for w in workers:
                tg.create_task(w.run(stop, grace))
    return 0


async def _lock_node(held: contextlib.AsyncExitStack, zk: ZkSession, worker: NodeWorker) -> bool:
    """Take the node's cron lock for the run (released when `held` closes); False, and the node
    is skipped this run, when another run holds it."""
    lock = runners.node_lock(zk, worker.cluster, worker.node)
    try:
        slot = await lock.acquire(f"cron-{os.getpid()}", max_wait=0)
    except TimeoutError:
        log.warning("node=%s skipped: another cron run holds its lock", worker.node)
        return False
    held.push_async_callback(lock.release, slot)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        node_configs(args)
        config.shutdown_grace()
        signing.verifier_for(Settings.from_env())  # secure by default: no trusted keys, no runner
    except (TaskermanError, ValueError) as e:
        print(f"taskerman-runner: {e}", file=sys.stderr)
        return 2
    return lifecycle.run("taskerman-runner", lambda stop: amain(args, stop))
