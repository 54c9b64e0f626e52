"""`taskerman schedules list|next|pause|resume|trigger`.

`list`, `next` and `trigger` ask the leading scheduler over `taskerman.api.schedules` (only the
leader serves it, so the answer is about the schedules that actually run); no scheduler answering
is exit 1. `pause` and `resume` write the flag in ZooKeeper directly, so a schedule can be paused
while no scheduler runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from taskcore.bus import jetstream as bus
from taskcore.cli import common, render
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from taskcore.coord import schedule_control as control
from taskcore.coord.schedule_control import ApiReply, ApiRequest, PauseFlag, ScheduleInfo
from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings

LEADER_WAIT = 5.0  # leadership may be changing hands: ask again for this long before giving up
REQUEST_TIMEOUT = 10.0


class Schedules(ServerCommand):
    """List, preview, pause, resume or trigger the schedules."""

    name = "schedules"

    def add_parser(self, subparsers: Subparsers) -> None:
        s = subparsers.add_parser(self.name, help="the schedules the leading scheduler runs")
        ssub = s.add_subparsers(dest="schedules_cmd", required=True)
        asks = argparse.ArgumentParser(add_help=False)  # the sub-commands that ask the leader
        asks.add_argument(
            "--wait",
            type=float,
            default=LEADER_WAIT,
            metavar="SECONDS",
            help=f"how long to wait for a leading scheduler to answer (default {LEADER_WAIT:g})",
        )
        ls = ssub.add_parser(
            "list", parents=[asks], help="schedules with their state: last slot and task, paused, next slot"
        )
        ls.add_argument("name", nargs="?", help="only this schedule")
        ls.add_argument("--json", action="store_true", help=common.JSON_HELP)
        nx = ssub.add_parser("next", parents=[asks], help="the next slot times of each schedule")
        nx.add_argument("name", nargs="?", help="only this schedule")
        nx.add_argument("-n", "--count", type=int, default=5, help="how many slots per schedule (default 5)")
        nx.add_argument("--json", action="store_true", help=common.JSON_HELP)
        pa = ssub.add_parser("pause", help="skip the schedule's slots until resumed (not caught up later)")
        pa.add_argument("name", help=common.SCHEDULE_HELP)
        pa.add_argument("--reason", default="", help="shown by `schedules list` and in the audit trail")
        ssub.add_parser("resume", help="emit the schedule's slots again").add_argument(
            "name", help=common.SCHEDULE_HELP
        )
        tr = ssub.add_parser(
            "trigger", parents=[asks], help="emit one run now (task id sched-<name>-manual-<time>)"
        )
        tr.add_argument("name", help=common.SCHEDULE_HELP)
        tr.add_argument("--json", action="store_true", help=common.JSON_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        if args.schedules_cmd in ("list", "next"):
            return await _list(args, settings)
        command = {"trigger": _trigger, "pause": _pause, "resume": _resume}[args.schedules_cmd]
        return await command(args, settings)


# --- talking to the leader ------------------------------------------------------------------------


class NoLeader(TaskermanError):
    """No scheduler answered the schedules API."""


# --- talking to the leader ------------------------------------------------------------------------


async def ask(nc: NATS, req: ApiRequest, wait: float = LEADER_WAIT) -> ApiReply:
    """The leader's reply; NoLeader when nobody serves the API for `wait` seconds. Only "no
    responders" is asked again: a request that timed out may have been acted on (a trigger)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            msg = await nc.request(control.API_SUBJECT, msgspec.json.encode(req), timeout=REQUEST_TIMEOUT)
        except nats.errors.NoRespondersError as e:
            if time.monotonic() >= deadline:
                raise NoLeader(
                    f"no scheduler is leading: nobody answered on {control.API_SUBJECT} within "
                    f"{wait:g}s (is taskerman-scheduler running? after a leader dies, another takes "
                    "over within the ZooKeeper session timeout)"
                ) from e
            await asyncio.sleep(0.25)
            continue
        except nats.errors.TimeoutError as e:
            raise NoLeader(
                f"the scheduler did not answer on {control.API_SUBJECT} in {REQUEST_TIMEOUT:g}s"
            ) from e
        return msgspec.json.decode(msg.data, type=ApiReply)


async def _ask_cmd(settings: Settings, req: ApiRequest, wait: float = LEADER_WAIT) -> ApiReply:
    nc = await common.connect_nats(settings)
    try:
        return await ask(nc, req, wait)
    finally:
        await bus.close(nc)


# --- rendering ----------------------------------------------------------------------------------------


def _when(t: datetime | None, tz: str) -> str:
    """A time in the schedule's zone, e.g. `2025-01-15 03:00:00 CET`."""
    if t is None:
        return "-"
    try:
        zone = ZoneInfo(tz)
    except (ValueError, KeyError):
        zone = ZoneInfo("UTC")
    return t.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"


def _pause_text(flag: PauseFlag) -> str:
    by = f" by {flag.by}" if flag.by else ""
    since = f" since {render.when(flag.at)}" if flag.at else ""
    why = f": {flag.reason}" if flag.reason else ""
    return f"PAUSED{by}{since}{why}"


def _print_schedule(s: ScheduleInfo) -> None:
    state = _pause_text(s.paused) if s.paused else "active"
    print(f"{s.name}  [{state}]")
    print(f"  target   {s.target}  action {s.action}")
    extras = [f"overlap {s.overlap}"]
    extras += [f"catch-up {_secs(s.catchup_s)}"] if s.catchup_s else []
    extras += [f"jitter up to {_secs(s.jitter_s)}"] if s.jitter_s else []
    print(f"  cron     {s.cron} ({s.timezone})  {'  '.join(extras)}")
    last = f"{_when(s.last_slot, s.timezone)} → {s.last_task_id or '-'}"
    if len(s.last_run) > 1:
        last += f" (+{len(s.last_run) - 1} more: one task per cluster)"
    print(f"  last     {last}")
    if s.queued_slot is not None:
        print(f"  queued   {_when(s.queued_slot, s.timezone)} (waits for the last run to finish)")
    if s.skipped:
        print(f"  skipped  {s.skipped} slot(s); last {s.last_skip}")
    for n in s.next:
        delay = (n.emit_at - n.slot).total_seconds()
        jitter = f" (emitted {delay:.1f}s later: jitter)" if delay > 0 else ""
        print(f"  next     {_when(n.slot, s.timezone)}{jitter}  {n.task_id}")


# --- the sub-commands ---------------------------------------------------------------------------------


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    count = args.count if args.schedules_cmd == "next" else 1
    if not 1 <= count <= control.MAX_NEXT:
        print(f"taskerman schedules next: -n must be 1..{control.MAX_NEXT}, got {count}", file=sys.stderr)
        return EXIT_INVALID
    req = ApiRequest(op="next" if args.schedules_cmd == "next" else "list", name=args.name or "", count=count)
    reply = await _ask_cmd(settings, req, args.wait)
    if reply.error:
        print(f"taskerman schedules {args.schedules_cmd}: {reply.error}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(msgspec.json.encode({"leader": reply.leader, "schedules": reply.schedules}).decode())
        return EXIT_OK
    print(f"leader {reply.leader}: {len(reply.schedules)} schedule(s)")
    for s in reply.schedules:
        _print_schedule(s)
    return EXIT_OK


async def _trigger(args: argparse.Namespace, settings: Settings) -> int:
    reply = await _ask_cmd(settings, ApiRequest(op="trigger", name=args.name, by=common.user()), args.wait)
    if reply.error:
        print(f"taskerman schedules trigger: {reply.error}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(msgspec.json.encode({"leader": reply.leader, "task_ids": reply.task_ids}).decode())
    else:
        print("\n".join(reply.task_ids))
    return EXIT_OK


async def _pause(args: argparse.Namespace, settings: Settings) -> int:
    """Pause (the leader, when one answers, must know the name; with none, the flag is written
    anyway so that a schedule can be paused before its scheduler starts)."""
    try:
        known = await _ask_cmd(settings, ApiRequest(op="list"), wait=0)
    except NoLeader:
        print(
            f"note: no scheduler answered; {args.name!r} is paused in ZooKeeper all the same",
            file=sys.stderr,
        )
    else:
        names = [s.name for s in known.schedules]
        if args.name not in names:
            shown = ", ".join(repr(n) for n in names) or "none"
            print(
                f"taskerman schedules pause: unknown schedule {args.name!r} (the leader runs: {shown})",
                file=sys.stderr,
            )
            return EXIT_FAILED
    flag = PauseFlag(by=common.user(), at=time.time(), reason=args.reason)
    async with common.connect_zookeeper(settings) as zk:
        earlier = await control.pause(zk, args.name, flag)
    if earlier is not None:
        print(f"{args.name}: already paused ({_pause_text(earlier)})")
    else:
        print(f"{args.name}: paused; its slots are skipped (not caught up later) until it is resumed")
    return EXIT_OK


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    async with common.connect_zookeeper(settings) as zk:
        flag = await control.resume(zk, args.name)
    if flag is None:
        print(f"{args.name}: was not paused")
    else:
        print(f"{args.name}: resumed (was {_pause_text(flag)}); slots from now on are emitted")
    return EXIT_OK
