"""taskerman-router: wires settings, NATS, ZooKeeper, discovery and the Router."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from taskcore import bus, service, tracing
from taskcore.actions import ActionRegistry
from taskcore.coordination import ZkSession
from taskcore.settings import Settings
from taskcore.tracking import StatusStore
from taskerman_router.discovery import DiscoveryContext, load_plugins
from taskerman_router.service import Router


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="taskerman-router", description="Route tasks from tasks.global to nodes."
    )
    p.add_argument("--inventory", type=Path, help="TOML inventory for static discovery")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = Settings.from_env()
    tracing.setup("taskerman-router")
    async with contextlib.AsyncExitStack() as stack:
        nc = await bus.connect(settings, "taskerman-router")
        stack.push_async_callback(bus.close, nc)
        js = nc.jetstream()
        await bus.provision(js, settings)
        zk = await stack.enter_async_context(ZkSession.from_settings(settings))
        status = StatusStore(await bus.status_bucket(js))
        plugins = load_plugins(DiscoveryContext(inventory=args.inventory, zk=zk))
        await Router(nc, js, status, ActionRegistry.installed(), plugins).run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return service.run("taskerman-router", lambda stop: amain(args, stop))
