"""The heartbeat canary: a `taskerman:ping` task to one cluster every N seconds.

The ping crosses the router (discovery resolves the canary cluster like any cluster, so it needs at
least one node there, and for `registry` discovery a live runner) and the runners like any task.
The leader emits it, with a task id derived from the period's slot (`canary-<utc time>~<cluster>`),
so no slot is pinged twice; when a ping finishes, its end-to-end latency (its last node finished -
the task created) goes to `/scheduler/canary`, which `taskerman health` reads."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import msgspec

from taskcore.bus.tracking import StatusStore, TaskView
from taskcore.coord.schedule_control import CANARY_EVERY, CanaryState
from taskcore.core.model import TASK_FINISHED, Task, TaskermanParams, WorkqueueArgs
from taskerman_scheduler.slots import SLOT_TIME_FORMAT, with_cluster
from taskerman_scheduler.state import CanaryStore

log = logging.getLogger(__name__)

PING_ACTION = "taskerman:ping"
MIN_EVERY = 1.0
MAX_OUTSTANDING = 10  # unfinished pings followed; older ones are given up (a stuck pipeline)
PING_LIMIT = 64  # a ping disrupts nothing: many nodes of the canary cluster may run theirs at once
LATE_PERIODS = 3  # no ping completed for this many periods: the pipeline is late (audited once)

Emit = Callable[[Task, str, str], Awaitable[None]]  # (task, run label for logs, audit detail)
Alarm = Callable[[str], Awaitable[None]]  # the pipeline is late: audited as `canary-late` (detail)
Verify = Callable[[], Awaitable[None]]


class CanaryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how often to ping."""

    cluster: str
    every: float = CANARY_EVERY
    discovery: str = "static"


def canary_slot(now: float, every: float) -> float:
    """The start of the period `now` falls in (epoch seconds)."""
    return math.floor(now / every) * every


def canary_task_id(cluster: str, slot: float) -> str:
    """`canary-<utc yyyymmddThhmmss>~<cluster token>`: periods are at least a second apart."""
    stamp = datetime.fromtimestamp(slot, UTC).strftime(SLOT_TIME_FORMAT)
    return with_cluster(f"canary-{stamp}", cluster)


def ping_task(config: CanaryConfig, task_id: str) -> Task:
    """The ping: every node of the canary cluster, no retries (a failure should show, not hide)."""
    return Task(
        action=PING_ACTION,
        cluster_name=config.cluster,
        limit=PING_LIMIT,
        discovery=config.discovery,
        owner="canary",
        task_id=task_id,
        taskerman_params=TaskermanParams(workqueue_args=WorkqueueArgs(retry_count=0)),
    )


def fold(state: CanaryState, views: Mapping[str, TaskView | None]) -> CanaryState:
    """The record after looking at the outstanding pings: a succeeded one newer than the last
    completion becomes the last completion (with its latency), a failed one the last failure;
    finished and vanished ones stop being followed."""
    outstanding: list[str] = []
    for task_id in state.outstanding:
        view = views.get(task_id)
        if view is None:
            continue
        if view.state not in TASK_FINISHED:
            outstanding.append(task_id)
            continue
        finished = max((n.finished_at for n in view.nodes.values() if n.finished_at), default=None)
        if view.state == "succeeded":
            if finished is not None and (state.last_completed_at or 0.0) < finished:
                state = msgspec.structs.replace(
                    state,
                    last_completed_task_id=task_id,
                    last_completed_at=finished,
                    latency=max(finished - view.created_at, 0.0),
                )
        else:
            state = msgspec.structs.replace(
                state,
                last_failed_task_id=task_id,
                last_failed_at=finished or view.created_at,
                last_failure=view.error or _node_error(view) or view.state,
            )
    return msgspec.structs.replace(state, outstanding=tuple(outstanding))


def late_for(state: CanaryState, now: float, watched_since: float) -> float | None:
    """Seconds since a ping last completed (or since this process began to watch, so that a new
    leader gives the pings their time first), when that is more than LATE_PERIODS periods; else
    None. Pure."""
    since = max(state.last_completed_at or 0.0, watched_since)
    if now - since <= LATE_PERIODS * state.every:
        return None
    return now - since


class Canary:
    """Run by the leader on every tick: follow the outstanding pings, send the period's ping."""

    def __init__(
        self, config: CanaryConfig, status: StatusStore, store: CanaryStore, emit: Emit, alarm: Alarm
    ) -> None:
        self.config = config
        self.status = status
        self.store = store
        self.emit = emit
        self.alarm = alarm
        self.watched_since: float | None = None

    async def tick(self, now: float, verify: Verify) -> str | None:
        """One pass; returns the task id of a ping sent now, if any."""
        config = self.config
        state, version = await self.store.load()
        if state is None or state.cluster != config.cluster:
            state = CanaryState(cluster=config.cluster, every=config.every)
        elif state.every != config.every:
            state = msgspec.structs.replace(state, every=config.every)
        before = state
        state = fold(state, {t: await self.status.view(t) for t in state.outstanding})
        if state.last_completed_task_id != before.last_completed_task_id:
            log.info(
                "canary completed task_id=%s latency=%.3fs",
                state.last_completed_task_id,
                state.latency or 0.0,
            )
        if state.last_failed_task_id != before.last_failed_task_id:
            log.warning("canary failed task_id=%s reason=%s", state.last_failed_task_id, state.last_failure)
        state = await self._watch_lateness(state, now)
        slot = canary_slot(now, config.every)
        sent = None
        if slot > state.last_slot:
            sent = canary_task_id(config.cluster, slot)
            when = datetime.fromtimestamp(slot, UTC).isoformat()
            await verify()
            await self.emit(ping_task(config, sent), when, f"canary ping, slot {when}")
            state = msgspec.structs.replace(
                state,
                last_slot=slot,
                last_task_id=sent,
                last_emitted_at=now,
                outstanding=(*state.outstanding, sent)[-MAX_OUTSTANDING:],
            )
        if state != before or version < 0:
            await self.store.save(state, version)
        return sent

    async def _watch_lateness(self, state: CanaryState, now: float) -> CanaryState:
        """Raise the alarm once when no ping has completed for LATE_PERIODS periods; clear it when
        one completes again."""
        if self.watched_since is None:
            self.watched_since = now
        late = late_for(state, now, self.watched_since)
        if late is None:
            return msgspec.structs.replace(state, late_since=None)
        if state.late_since is None:
            detail = f"no ping to {state.cluster} completed for {late:.0f}s (every {state.every:g}s)"
            log.warning("canary late %s", detail)
            await self.alarm(detail)
            state = msgspec.structs.replace(state, late_since=now)
        return state


def _node_error(view: TaskView) -> str:
    return next((f"{node}: {rec.error}" for node, rec in sorted(view.nodes.items()) if rec.error), "")
