"""`taskerman schedules list|next|pause|resume|trigger` and `taskerman health` (registered by cli.py).

`list`, `next` and `trigger` ask the leading scheduler over `taskerman.api.schedules` (only the
leader serves it, so the answer is about the schedules that actually run); no scheduler answering
is exit 1. `pause` and `resume` write the flag in ZooKeeper directly, so a schedule can be paused
while no scheduler runs. `health` reads the canary's record, the streams and consumers, the runner
registry and the breakers, and exits 1 when no ping completed within the max age."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import nats.errors
from aiozk import exc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.cli import connect
from taskcore.coord import clusters, runners
from taskcore.coord import schedule_control as control
from taskcore.coord.schedule_control import (
    CANARY_EVERY,
    ApiReply,
    ApiRequest,
    CanaryState,
    PauseFlag,
    ScheduleInfo,
)
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.errors import InvalidName, TaskermanError
from taskcore.core.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
LEADER_WAIT = 5.0  # leadership may be changing hands: ask again for this long before giving up
REQUEST_TIMEOUT = 10.0
STALE_FACTOR = 3  # health's default max age: this many canary periods


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
    nc = await connect.nats(settings)
    try:
        return await ask(nc, req, wait)
    finally:
        await bus.close(nc)


def _user() -> str:
    return audit.actor(f"cli:{getpass.getuser()}")


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
    since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(flag.at))}" if flag.at else ""
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


# --- schedules ------------------------------------------------------------------------------------------


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
    reply = await _ask_cmd(settings, ApiRequest(op="trigger", name=args.name, by=_user()), args.wait)
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
    flag = PauseFlag(by=_user(), at=time.time(), reason=args.reason)
    async with connect.zookeeper(settings) as zk:
        earlier = await control.pause(zk, args.name, flag)
    if earlier is not None:
        print(f"{args.name}: already paused ({_pause_text(earlier)})")
    else:
        print(f"{args.name}: paused; its slots are skipped (not caught up later) until it is resumed")
    return EXIT_OK


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    async with connect.zookeeper(settings) as zk:
        flag = await control.resume(zk, args.name)
    if flag is None:
        print(f"{args.name}: was not paused")
    else:
        print(f"{args.name}: resumed (was {_pause_text(flag)}); slots from now on are emitted")
    return EXIT_OK


async def schedules_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`taskerman schedules list|next|pause|resume|trigger`."""
    if args.schedules_cmd in ("list", "next"):
        return await _list(args, settings)
    command = {"trigger": _trigger, "pause": _pause, "resume": _resume}[args.schedules_cmd]
    return await command(args, settings)


# --- health -----------------------------------------------------------------------------------------------


class CanaryHealth(msgspec.Struct, frozen=True, kw_only=True):
    """The canary as `taskerman health` sees it (times: epoch seconds; ages: seconds)."""

    cluster: str
    every: float
    last_task_id: str
    last_emitted_at: float | None
    last_completed_task_id: str
    last_completed_at: float | None
    age_s: float | None
    latency_s: float | None
    unfinished: int
    last_failed_task_id: str
    last_failed_at: float | None
    last_failure: str


class ConsumerQueue(msgspec.Struct, frozen=True, kw_only=True):
    """One runner consumer of the WORK stream: items waiting, delivered but not acked, redelivered."""

    consumer: str
    cluster: str
    node: str
    num_pending: int
    num_ack_pending: int
    num_redelivered: int


class Queues(msgspec.Struct, frozen=True, kw_only=True):
    """Queue lengths: messages in the streams, and the router's and runners' consumers."""

    tasks: int
    router_pending: int
    router_ack_pending: int
    work: int
    dead_letters: int
    runners: list[ConsumerQueue]


class StaleRunner(msgspec.Struct, frozen=True, kw_only=True):
    cluster: str
    node: str
    pid: int
    heartbeat_age_s: float


class OpenBreaker(msgspec.Struct, frozen=True, kw_only=True):
    cluster: str
    state: str
    reason: str
    opened_at: float | None


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """What `taskerman health --json` prints. `healthy` is false (exit 1) when no ping completed
    within `max_age_s`; stale runners and open breakers are reported as warnings."""

    healthy: bool
    problems: list[str]
    warnings: list[str]
    max_age_s: float
    checked_at: float
    canary: CanaryHealth | None
    queues: Queues
    runners_registered: int
    stale_runners: list[StaleRunner]
    open_breakers: list[OpenBreaker]


def canary_health(state: CanaryState, now: float) -> CanaryHealth:
    done = state.last_completed_at
    return CanaryHealth(
        cluster=state.cluster,
        every=state.every,
        last_task_id=state.last_task_id,
        last_emitted_at=state.last_emitted_at,
        last_completed_task_id=state.last_completed_task_id,
        last_completed_at=done,
        age_s=None if done is None else max(now - done, 0.0),
        latency_s=state.latency,
        unfinished=len(state.outstanding),
        last_failed_task_id=state.last_failed_task_id,
        last_failed_at=state.last_failed_at,
        last_failure=state.last_failure,
    )


def assess(canary: CanaryHealth | None, max_age: float) -> list[str]:
    """Why the pipeline is stale (nothing: healthy). Pure."""
    if canary is None:
        return ["no canary record: no scheduler has run with --canary-cluster"]
    if canary.age_s is None:
        return [f"no ping to {canary.cluster!r} has completed yet (last sent: {canary.last_task_id or '-'})"]
    if canary.age_s > max_age:
        return [f"the last ping completed {canary.age_s:.1f}s ago, more than the max age {max_age:g}s"]
    return []


async def _stream_messages(js: JetStreamContext, stream: str) -> int:
    try:
        return (await js.stream_info(stream)).state.messages
    except NotFoundError:
        return 0


async def _queues(js: JetStreamContext) -> Queues:
    try:
        router = await js.consumer_info(subjects.TASKS_STREAM, subjects.ROUTER_DURABLE)
        router_pending, router_unacked = router.num_pending or 0, router.num_ack_pending or 0
    except NotFoundError:
        router_pending = router_unacked = 0
    try:
        consumers = await js.consumers_info(subjects.WORK_STREAM)
    except NotFoundError:
        consumers = []
    runners: list[ConsumerQueue] = []
    for c in consumers:
        try:
            cluster, node = subjects.parse_node_subject(c.config.filter_subject or "")
        except InvalidName:
            continue  # not a runner's consumer
        runners.append(
            ConsumerQueue(
                consumer=c.name,
                cluster=cluster,
                node=node,
                num_pending=c.num_pending or 0,
                num_ack_pending=c.num_ack_pending or 0,
                num_redelivered=c.num_redelivered or 0,
            )
        )
    return Queues(
        tasks=await _stream_messages(js, subjects.TASKS_STREAM),
        router_pending=router_pending,
        router_ack_pending=router_unacked,
        work=await _stream_messages(js, subjects.WORK_STREAM),
        dead_letters=await _stream_messages(js, subjects.DEAD_STREAM),
        runners=sorted(runners, key=lambda q: (q.cluster, q.node)),
    )


async def _breakers(settings: Settings, zk: ZkSession, now: float) -> list[OpenBreaker]:
    policy = clusters.breaker_policy(settings)
    out: list[OpenBreaker] = []
    try:
        tokens = sorted(await zk.client.get_children("/clusters"))
    except exc.NoNode:
        return out
    for token in tokens:
        try:
            cluster = subjects.decode_token(token)
        except InvalidName:
            continue
        if not await zk.client.exists(clusters.cluster_path(cluster, "breaker")):
            continue
        s = await clusters.Breaker(zk, cluster, policy).read()
        state = clusters.view_state(s, now, policy)
        if state != "closed":
            out.append(OpenBreaker(cluster=cluster, state=state, reason=s.reason, opened_at=s.opened_at))
    return out


async def check_health(settings: Settings, max_age: float | None) -> Health:
    """Everything `taskerman health` reports."""
    now = time.time()
    async with connect.zookeeper(settings) as zk:
        state = await control.read_canary(zk)
        found = await runners.registered(zk)
        breakers = await _breakers(settings, zk, now)
    nc = await connect.nats(settings)
    try:
        queues = await _queues(nc.jetstream())
    finally:
        await bus.close(nc)
    canary = canary_health(state, now) if state is not None else None
    limit = max_age if max_age is not None else STALE_FACTOR * (canary.every if canary else CANARY_EVERY)
    stale = [
        StaleRunner(cluster=r.cluster, node=r.node, pid=r.pid, heartbeat_age_s=max(now - r.heartbeat, 0.0))
        for r in found
        if r.stale(now)
    ]
    warnings = [
        f"runner {r.cluster}/{r.node} is stale (no heartbeat for {r.heartbeat_age_s:.0f}s)" for r in stale
    ]
    warnings += [f"breaker of {b.cluster} is {b.state}: {b.reason}" for b in breakers]
    if canary is not None and not any(r.cluster == canary.cluster and not r.stale(now) for r in found):
        warnings.append(
            f"no live runner is registered for the canary cluster {canary.cluster!r} "
            "(the canary needs at least one)"
        )
    if canary is not None and (canary.last_failed_at or 0.0) > (canary.last_completed_at or 0.0):
        warnings.append(f"ping {canary.last_failed_task_id} failed: {canary.last_failure}")
    problems = assess(canary, limit)
    return Health(
        healthy=not problems,
        problems=problems,
        warnings=warnings,
        max_age_s=limit,
        checked_at=now,
        canary=canary,
        queues=queues,
        runners_registered=len(found),
        stale_runners=stale,
        open_breakers=breakers,
    )


def _print_health(h: Health) -> None:
    c = h.canary
    if h.healthy and c is not None and c.age_s is not None:
        latency = f", end-to-end latency {c.latency_s:.3f}s" if c.latency_s is not None else ""
        print(
            f"pipeline  healthy: last ping completed {c.age_s:.1f}s ago (max age {h.max_age_s:g}s){latency}"
        )
    else:
        print(f"pipeline  STALE: {'; '.join(h.problems)}")
    if c is not None:
        print(
            f"canary    cluster {c.cluster} every {c.every:g}s; last sent {c.last_task_id or '-'}; "
            f"{c.unfinished} unfinished"
        )
    q = h.queues
    print(
        f"queues    TASKS {q.tasks} (router: {q.router_pending} pending, {q.router_ack_pending} unacked)  "
        f"WORK {q.work}  DEAD {q.dead_letters}"
    )
    for r in q.runners:
        print(
            f"          {r.cluster}/{r.node}: {r.num_pending} pending, {r.num_ack_pending} unacked, "
            f"{r.num_redelivered} redelivered"
        )
    stale = ", ".join(f"{r.cluster}/{r.node} ({r.heartbeat_age_s:.0f}s)" for r in h.stale_runners)
    stale = f": {stale}" if stale else ""
    print(f"runners   {h.runners_registered} registered, {len(h.stale_runners)} stale{stale}")
    opened = ", ".join(f"{b.cluster} ({b.state}: {b.reason})" for b in h.open_breakers)
    print(f"breakers  {opened or 'none open'}")
    for w in h.warnings:
        print(f"warning   {w}")


async def health_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`taskerman health`: exit 0 when a ping completed within the max age, else 1."""
    if args.max_age is not None and args.max_age <= 0:
        print(f"taskerman health: --max-age must be positive, got {args.max_age:g}", file=sys.stderr)
        return EXIT_INVALID
    h = await check_health(settings, args.max_age)
    if args.json:
        print(msgspec.json.encode(h).decode())
    else:
        _print_health(h)
    return EXIT_OK if h.healthy else EXIT_FAILED


# --- the parser -------------------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """Add this module's sub-commands to the `taskerman` parser."""
    s = sub.add_parser("schedules", help="the schedules the leading scheduler runs")
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
    ls.add_argument("--json", action="store_true")
    nx = ssub.add_parser("next", parents=[asks], help="the next slot times of each schedule")
    nx.add_argument("name", nargs="?", help="only this schedule")
    nx.add_argument("-n", "--count", type=int, default=5, help="how many slots per schedule (default 5)")
    nx.add_argument("--json", action="store_true")
    pa = ssub.add_parser("pause", help="skip the schedule's slots until resumed (not caught up later)")
    pa.add_argument("name")
    pa.add_argument("--reason", default="")
    ssub.add_parser("resume", help="emit the schedule's slots again").add_argument("name")
    tr = ssub.add_parser(
        "trigger", parents=[asks], help="emit one run now (task id sched-<name>-manual-<time>)"
    )
    tr.add_argument("name")
    tr.add_argument("--json", action="store_true")

    h = sub.add_parser("health", help="is the pipeline alive: canary, queue lengths, stale runners, breakers")
    h.add_argument("--json", action="store_true")
    h.add_argument(
        "--max-age",
        type=float,
        metavar="SECONDS",
        help="stale when no ping completed for this long (default: 3 canary periods)",
    )


COMMANDS: dict[str, Command] = {"schedules": schedules_cmd, "health": health_cmd}
