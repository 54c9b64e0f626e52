"""taskerman-scheduler: wires settings, NATS, ZooKeeper, the schedule file, the canary and the Scheduler."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from taskcore.coord.schedule_control import CANARY_EVERY
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask
from taskcore.core.model import check_task
from taskcore.core.settings import Settings
from taskcore.runtime import lifecycle
from taskerman_scheduler import webhooks
from taskerman_scheduler.canary import MIN_EVERY, CanaryConfig, ping_task
from taskerman_scheduler.schedule_file import ScheduleFile
from taskerman_scheduler.scheduler import Scheduler
from taskerman_scheduler.schedules import Schedule, ScheduleError
from taskerman_scheduler.webhooks import Webhook

log = logging.getLogger(__name__)
EXIT_INVALID = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="taskerman-scheduler",
        description="Emit tasks from cron schedules (one leader among replicas) and serve submissions.",
    )
    p.add_argument(
        "--schedules", type=Path, help="TOML schedule file ([[schedule]] tables); re-read when it changes"
    )
    p.add_argument(
        "--inventory",
        type=Path,
        help="the router's inventory TOML: its clusters (with those of registered runners) are the ones "
        "a cluster_pattern schedule can match",
    )
    p.add_argument(
        "--webhooks",
        type=Path,
        help="TOML file of [[webhook]] tables: who is told when tasks end, nodes are dead-lettered, "
        "breakers open (see taskerman_scheduler/webhooks.py)",
    )
    p.add_argument("--canary-cluster", help="send a taskerman:ping task to this cluster every period")
    p.add_argument(
        "--canary-every",
        type=float,
        default=CANARY_EVERY,
        metavar="SECONDS",
        help=f"the canary's period (default {CANARY_EVERY:g}, at least {MIN_EVERY:g})",
    )
    p.add_argument(
        "--canary-discovery", default="static", help="discovery plugin for the canary cluster (static)"
    )
    return p.parse_args(argv)


def canary_config(args: argparse.Namespace, registry: ActionRegistry) -> CanaryConfig | None:
    """The canary the flags ask for; ValueError saying what is wrong."""
    if args.canary_cluster is None:
        return None
    if args.canary_every < MIN_EVERY:
        raise ValueError(f"--canary-every must be at least {MIN_EVERY:g} seconds, got {args.canary_every:g}")
    config = CanaryConfig(
        cluster=args.canary_cluster, every=args.canary_every, discovery=args.canary_discovery
    )
    try:
        task = ping_task(config, "check")
        check_task(task)
        registry.resolve(task)
    except InvalidTask as e:
        raise ValueError(f"--canary-cluster: the ping task is invalid: {e}") from e
    return config


async def amain(
    args: argparse.Namespace,
    stop: asyncio.Event,
    *,
    source: ScheduleFile | None,
    schedules: list[Schedule],
    canary: CanaryConfig | None,
    registry: ActionRegistry,
    hooks: dict[str, Webhook],
) -> int:
    async with lifecycle.connected(Settings.from_env(), "taskerman-scheduler") as c:
        log.info(
            "scheduler started schedules=%s canary=%s inventory=%s webhooks=%s",
            [s.name for s in schedules],
            f"{canary.cluster} every {canary.every:g}s" if canary else None,
            args.inventory,
            sorted(hooks),
        )
        scheduler = Scheduler(
            c.nc,
            c.js,
            c.zk,
            c.status,
            registry,
            schedules=schedules,
            source=source,
            inventory=args.inventory,
            canary=canary,
            webhooks=hooks,
        )
        await scheduler.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    registry = ActionRegistry.installed()
    source = ScheduleFile(args.schedules, registry) if args.schedules else None
    try:
        schedules = source.load() if source else []
        canary = canary_config(args, registry)
        hooks = webhooks.load(args.webhooks) if args.webhooks else {}
    except (ScheduleError, ValueError) as e:  # WebhookError is a ValueError
        print(f"taskerman-scheduler: {e}", file=sys.stderr)
        return EXIT_INVALID
    return lifecycle.run(
        "taskerman-scheduler",
        lambda stop: amain(
            args, stop, source=source, schedules=schedules, canary=canary, registry=registry, hooks=hooks
        ),
    )
