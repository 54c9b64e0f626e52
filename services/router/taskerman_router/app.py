"""taskerman-router: wires settings, NATS, ZooKeeper, discovery and routing plugins, and the Router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from taskcore.coord import clusters
from taskcore.core import signing
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings
from taskcore.obs import metrics
from taskcore.plugins import DiscoveryContext
from taskcore.runtime import lifecycle
from taskerman_router.discovery import load_plugins
from taskerman_router.router import Router
from taskerman_router.routing import load_routings

log = logging.getLogger(__name__)
SAMPLE_INTERVAL_ENV = "TASKERMAN_SAMPLE_INTERVAL"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="taskerman-router", description="Route tasks from tasks.global to nodes."
    )
    p.add_argument("--inventory", type=Path, help="TOML inventory: nodes and attributes, dns and aws names")
    return p.parse_args(argv)


def sample_interval(settings: Settings, env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between samples of the fleet gauges (`TASKERMAN_SAMPLE_INTERVAL`, default
    metrics.SAMPLE_SECONDS); None, no sampling, while metrics are off or the variable is <= 0."""
    env = os.environ if env is None else env
    every = float(env.get(SAMPLE_INTERVAL_ENV, metrics.SAMPLE_SECONDS))
    return every if settings.metrics_port > 0 and every > 0 else None


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = Settings.from_env()
    signer = signing.signer_for(settings)
    if signer is None:
        log.warning(
            "INSECURE: %s=1 and no %s: work items are published unsigned, and only runners that "
            "run unsigned items (insecure too) will run them",
            signing.INSECURE_ENV,
            signing.SEED_ENV,
        )
    else:
        log.info("signing work items with key %s", signer.key)
    async with lifecycle.connected(settings, "taskerman-router") as c:
        plugins = load_plugins(DiscoveryContext(inventory=args.inventory, zk=c.zk))
        router = Router(
            c.nc,
            c.js,
            c.status,
            ActionRegistry.installed(),
            plugins,
            signer=signer,
            routings=load_routings(),
            zk=c.zk,
            breaker_policy=clusters.breaker_policy(settings),
            sample_interval=sample_interval(settings),
        )
        await router.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # secure by default: no seed, no router (unless TASKERMAN_INSECURE=1)
        signing.signer_for(Settings.from_env())
    except (TaskermanError, ValueError) as e:
        print(f"taskerman-router: {e}", file=sys.stderr)
        return 2
    return lifecycle.run("taskerman-router", lambda stop: amain(args, stop))
