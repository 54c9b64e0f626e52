"""`taskerman health`: is the pipeline alive. It reads the canary's record, the streams and
consumers, the runner registry and the breakers, and exits 1 when no ping completed within the
max age (stale runners and open breakers are warnings)."""

from __future__ import annotations

import argparse
import sys
import time

import msgspec

from taskcore.bus import jetstream as bus
from taskcore.bus.queues import Queues, read_queues
from taskcore.cli import common
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from taskcore.coord import clusters, fleet, runners
from taskcore.coord import schedule_control as control
from taskcore.coord.schedule_control import CANARY_EVERY, CanaryState
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings

STALE_FACTOR = 3  # the default max age: this many canary periods


class HealthCheck(ServerCommand):
    """`taskerman health`: exit 0 when a ping completed within the max age, else 1."""

    name = "health"

    def add_parser(self, subparsers: Subparsers) -> None:
        h = subparsers.add_parser(
            self.name, help="is the pipeline alive: canary, queue lengths, stale runners, breakers"
        )
        h.add_argument("--json", action="store_true", help=common.JSON_HELP)
        h.add_argument(
            "--max-age",
            type=float,
            metavar="SECONDS",
            help="stale when no ping completed for this long (default: 3 canary periods)",
        )

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        if args.max_age is not None and args.max_age <= 0:
            print(f"taskerman health: --max-age must be positive, got {args.max_age:g}", file=sys.stderr)
            return EXIT_INVALID
        h = await check_health(settings, args.max_age)
        if args.json:
            print(msgspec.json.encode(h).decode())
        else:
            _print_health(h)
        return EXIT_OK if h.healthy else EXIT_FAILED


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


async def _open_breakers(settings: Settings, zk: ZkSession, now: float) -> list[OpenBreaker]:
    readings = await fleet.breakers(zk, clusters.breaker_policy(settings), now)
    return [
        OpenBreaker(cluster=b.cluster, state=b.state, reason=b.record.reason, opened_at=b.record.opened_at)
        for b in readings
        if b.state != "closed"
    ]


async def check_health(settings: Settings, max_age: float | None) -> Health:
    """Everything `taskerman health` reports."""
    now = time.time()
    async with common.connect_zookeeper(settings) as zk:
        state = await control.read_canary(zk)
        found = await runners.registered(zk)
        breakers = await _open_breakers(settings, zk, now)
    nc = await common.connect_nats(settings)
    try:
        queues = await read_queues(nc.jetstream())
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
