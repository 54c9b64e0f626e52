"""taskerman-scheduler: wires settings, NATS, ZooKeeper, the schedule file and the Scheduler."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from taskcore import service
from taskcore.actions import ActionRegistry
from taskcore.settings import Settings
from taskerman_scheduler.schedules import Schedule, ScheduleError, load_schedules
from taskerman_scheduler.service import Scheduler

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="taskerman-scheduler",
        description="Emit tasks from cron schedules (one leader among replicas) and serve submissions.",
    )
    p.add_argument("--schedules", type=Path, help="TOML schedule file ([[schedule]] tables)")
    return p.parse_args(argv)


async def amain(schedules: list[Schedule], registry: ActionRegistry, stop: asyncio.Event) -> int:
    async with service.connected(Settings.from_env(), "taskerman-scheduler") as c:
        log.info("scheduler started schedules=%s", [s.name for s in schedules])
        await Scheduler(c.nc, c.js, c.zk, c.status, registry, schedules=schedules).run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    registry = ActionRegistry.installed()
    try:
        schedules = load_schedules(args.schedules, registry) if args.schedules else []
    except ScheduleError as e:
        print(f"taskerman-scheduler: {e}", file=sys.stderr)
        return 2
    return service.run("taskerman-scheduler", lambda stop: amain(schedules, registry, stop))
