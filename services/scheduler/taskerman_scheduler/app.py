"""taskerman-scheduler: wires settings, NATS, ZooKeeper, the schedule file and the Scheduler."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from taskcore import bus, service, tracing
from taskcore.actions import ActionRegistry
from taskcore.coordination import ZkSession
from taskcore.settings import Settings
from taskcore.tracking import StatusStore
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
    settings = Settings.from_env()
    tracing.setup("taskerman-scheduler")
    async with contextlib.AsyncExitStack() as stack:
        nc = await bus.connect(settings, "taskerman-scheduler")
        stack.push_async_callback(bus.close, nc)
        js = nc.jetstream()
        await bus.provision(js, settings)
        zk = await stack.enter_async_context(ZkSession.from_settings(settings))
        status = StatusStore(await bus.status_bucket(js))
        log.info("scheduler started schedules=%s", [s.name for s in schedules])
        await Scheduler(nc, js, zk, status, registry, schedules=schedules).run(stop)
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
