"""taskerman-runner: wires settings, NATS, ZooKeeper and one NodeWorker per node it serves."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import msgspec

from taskcore import service
from taskcore.actions import ActionRegistry
from taskcore.errors import TaskermanError
from taskcore.settings import Settings
from taskerman_runner import config
from taskerman_runner.worker import NodeWorker

log = logging.getLogger(__name__)
SHUTDOWN_GRACE = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="taskerman-runner", description="Run the work items of one or more nodes."
    )
    p.add_argument("--config", type=Path, help="node config TOML (cluster, node, [packs.*])")
    p.add_argument("--cluster", help="cluster name (without --config)")
    p.add_argument("--node", action="append", default=[], help="node name; repeat to serve several nodes")
    p.add_argument("--once", action="store_true", help="cron mode: drain what is waiting, then exit")
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
    nodes = node_configs(args)
    async with service.connected(settings, "taskerman-runner") as c:
        registry = ActionRegistry.installed()
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
            )
            for n in nodes
        ]
        for w in workers:
            await w.start()
        log.info("runner started nodes=%s", [f"{n.cluster}/{n.node}" for n in nodes])
        if args.once:
            failures = sum([await w.drain() for w in workers])
            return 1 if failures else 0
        async with asyncio.TaskGroup() as tg:
            for w in workers:
                tg.create_task(w.run(stop))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        node_configs(args)
    except TaskermanError as e:
        print(f"taskerman-runner: {e}", file=sys.stderr)
        return 2
    return service.run("taskerman-runner", lambda stop: amain(args, stop))
