"""Emission of schedule slots by the leader: which due slots go out, wait or are skipped under a
schedule's overlap policy and pause flag, and the publishing of each run's tasks (recorded as
pending first, deduplicated by their deterministic ids, audited and traced).

Overlap policies, when a slot comes due while the schedule's newest run is unfinished:
`allow` emits it anyway; `skip` skips it; `queue` keeps it (one at most) and emits it once the run
has finished; a further slot while one waits is skipped. A paused schedule's slots are skipped
(and a waiting one dropped); skipped slots are counted, logged and audited, never caught up later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import msgspec
from aiozk import exc
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Audit
from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters as cluster_config
from taskcore.coord import schedule_control as control
from taskcore.coord.schedule_control import PauseFlag
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import Slot, ZkSession
from taskcore.core import subjects
from taskcore.core.errors import LeaseLost
from taskcore.core.model import TASK_FINISHED, Task, TaskRecord, encode
from taskcore.obs import tracing
from taskcore.obs.metrics import Instruments
from taskerman_scheduler.schedules import Schedule
from taskerman_scheduler.slots import due_slots, manual_task_id, slot_task_id, slots_after, window_start
from taskerman_scheduler.state import ScheduleState, StateStore
from taskerman_scheduler.targets import KnownClusters, NoTargets, TargetError

log = logging.getLogger(__name__)


class Emitter:
    """Emits schedule slots as the holder of the leader slot; one schedule's state is changed by
    one coroutine at a time (ticks and manual triggers take turns)."""

    def __init__(
        self,
        js: JetStreamContext,
        zk: ZkSession,
        status: StatusStore,
        leader: FairSemaphore,
        *,
        audit: Audit,
        targets: KnownClusters,
        tick_seconds: float,
    ) -> None:
        self.js = js
        self.zk = zk
        self.status = status
        self.leader = leader
        self.audit = audit
        self.targets = targets
        self.tick_seconds = tick_seconds
        self.state = StateStore(zk)
        self.metrics = Instruments()
        self._lock = asyncio.Lock()
        self._tracer = tracing.tracer(__name__)

    @property
    def grace(self) -> timedelta:
        """Slots this late are still on time: a few ticks plus a leader failover (session expiry)."""
        return timedelta(seconds=self.zk.timeout + 3 * self.tick_seconds)

    async def tick(
        self,
        schedules: Sequence[Schedule],
        slot: Slot,
        now: datetime | None = None,
        stop: asyncio.Event | None = None,
    ) -> int:
        """One pass over `schedules` as the holder of `slot`; returns how many tasks it emitted.
        A schedule that fails is logged and retried next tick; losing leadership raises."""
        now = now or datetime.now(UTC)
        emitted = 0
        for sched in list(schedules):
            if stop is not None and stop.is_set():
                break
            try:
                async with self._lock:
                    emitted += await self._run_schedule(sched, slot, now, stop)
            except (LeaseLost, exc.ZKError):
                raise
            except TargetError as e:
                log.error("schedule not run, retrying next tick schedule=%s error=%s", sched.name, e)
            except Exception:
                log.exception("schedule failed, retrying next tick schedule=%s", sched.name)
        return emitted

    async def _run_schedule(
        self, sched: Schedule, slot: Slot, now: datetime, stop: asyncio.Event | None
    ) -> int:
        state, version = await self.state.load(sched.name)
        if state is None:  # a new schedule starts now: it has missed nothing yet
            state = ScheduleState(last_slot=now - timedelta(seconds=2 * self.tick_seconds))
            version = await self.state.save(sched.name, state, version)
        start = window_start(sched, now, self.grace)
        if state.last_slot < start:
            # said only when a slot was in fact skipped: an hourly schedule's last slot is older
            # than the window at most ticks, with nothing missed
            missed = next(slots_after(sched, state.last_slot), None)
            if missed is not None and missed <= start:
                log.warning(
                    "slots missed while no scheduler ran are not emitted schedule=%s after=%s until=%s",
                    sched.name,
                    state.last_slot.isoformat(),
                    start.isoformat(),
                )
            state = msgspec.structs.replace(state, last_slot=start)
            version = await self.state.save(sched.name, state, version)
        pause = await control.read_pause(self.zk, sched.name)
        emitted = 0
        if state.queued_slot is not None:
            settled, emitted = await self._settle_queued(sched, slot, state, state.queued_slot, pause)
            if settled != state:
                state, version = settled, await self.state.save(sched.name, settled, version)
        for when in due_slots(sched, state.last_slot, now, grace=self.grace):
            if stop is not None and stop.is_set():
                break
            state, n = await self._handle_slot(sched, slot, state, when, pause)
            emitted += n
            version = await self.state.save(sched.name, state, version)
        return emitted

    async def _handle_slot(
        self, sched: Schedule, slot: Slot, state: ScheduleState, when: datetime, pause: PauseFlag | None
    ) -> tuple[ScheduleState, int]:
        """Emit, queue or skip one due slot; the new state and how many tasks went out."""
        state = msgspec.structs.replace(state, last_slot=when)
        if pause is not None:
            return await self._skip(sched, state, when, _paused(pause)), 0
        if sched.overlap != "allow" and await self._running(state.run_ids):
            if sched.overlap == "queue" and state.queued_slot is None:
                log.info(
                    "slot queued behind the running run schedule=%s slot=%s", sched.name, when.isoformat()
                )
                await self.audit.record(
                    "queued",
                    task_id=slot_task_id(sched.name, when),
                    detail=f"schedule {sched.name}, slot {when.isoformat()}: waits for {state.last_task_id}",
                )
                return msgspec.structs.replace(state, queued_slot=when), 0
            if sched.overlap == "queue" and state.queued_slot is not None:
                reason = f"a run is queued already (slot {state.queued_slot.isoformat()})"
            else:
                reason = f"previous run {state.last_task_id} unfinished"
            return await self._skip(sched, state, when, reason), 0
        return await self._start_run(sched, slot, state, when)

    async def _settle_queued(
        self, sched: Schedule, slot: Slot, state: ScheduleState, queued: datetime, pause: PauseFlag | None
    ) -> tuple[ScheduleState, int]:
        """Emit the waiting slot once the run it waits for has finished (drop it when paused)."""
        if pause is None and await self._running(state.run_ids):
            return state, 0
        state = msgspec.structs.replace(state, queued_slot=None)
        if pause is not None:
            return await self._skip(sched, state, queued, f"{_paused(pause)} while queued"), 0
        return await self._start_run(sched, slot, state, queued)

    async def _start_run(
        self, sched: Schedule, slot: Slot, state: ScheduleState, when: datetime
    ) -> tuple[ScheduleState, int]:
        try:
            ids = await self.emit_run(sched, slot, when)
        except NoTargets as e:
            return await self._skip(sched, state, when, str(e)), 0
        return msgspec.structs.replace(state, last_task_id=ids[0], last_run=ids), len(ids)

    async def _skip(
        self, sched: Schedule, state: ScheduleState, when: datetime, reason: str
    ) -> ScheduleState:
        """Record a skipped slot: logged, counted in the state, and audited under the slot's id."""
        log.info("slot skipped schedule=%s slot=%s reason=%s", sched.name, when.isoformat(), reason)
        await self.audit.record(
            "skipped",
            task_id=slot_task_id(sched.name, when),
            cluster="" if sched.multi else sched.task.cluster_name,
            detail=f"schedule {sched.name}, slot {when.isoformat()}: {reason}",
        )
        return msgspec.structs.replace(
            state, skipped=state.skipped + 1, last_skip=f"{when.isoformat()}: {reason}"
        )

    async def _running(self, task_ids: Sequence[str]) -> bool:
        """Whether any task of a run is unfinished (a record that expired counts as finished)."""
        for task_id in task_ids:
            view = await self.status.view(task_id)
            if view is not None and view.state not in TASK_FINISHED:
                return True
        return False

    async def emit_run(
        self, sched: Schedule, slot: Slot, when: datetime, *, manual: bool = False
    ) -> tuple[str, ...]:
        """Emit one run of `sched`: one task per target cluster, all under one trace, each audited
        with the schedule and the slot. NoTargets when a pattern matches no known cluster."""
        clusters = await self.targets.resolve(sched)
        if sched.respect_windows and not manual:
            clusters = await self._open(sched, clusters, when)
        run = f"manual-{when.isoformat()}" if manual else when.isoformat()
        label = f"manual run at {when.isoformat()}" if manual else f"slot {when.isoformat()}"
        ids: list[str] = []
        attributes: dict[str, str | int] = {"schedule": sched.name, "run": run, "clusters": len(clusters)}
        with self._tracer.start_as_current_span("schedule-run", attributes=attributes):
            for i, cluster in enumerate(clusters, start=1):
                per = cluster if sched.multi else None
                task_id = (
                    manual_task_id(sched.name, when, per) if manual else slot_task_id(sched.name, when, per)
                )
                of = f", cluster {i} of {len(clusters)}" if sched.multi else ""
                await self.leader.verify(slot)
                await self._emit(
                    sched.task_for(cluster, task_id), sched.name, run, f"schedule {sched.name}, {label}{of}"
                )
                ids.append(task_id)
        return tuple(ids)

    async def _open(self, sched: Schedule, clusters: Sequence[str], when: datetime) -> list[str]:
        """The clusters a `respect_windows` schedule may emit to now; each closed one (frozen, or
        outside its maintenance windows) is skipped, audited for itself while others go ahead.
        NoTargets (the whole slot skipped) when none is open."""
        now = time.time()
        open_, closed = [], []
        for cluster in clusters:
            shut = (await cluster_config.read_config(self.zk, cluster)).closed(now)
            if shut is None:
                open_.append(cluster)
            else:
                why = "frozen" if shut.frozen else "outside its maintenance windows"
                closed.append((cluster, f"cluster {cluster} {why} ({shut.reason})"))
        if not open_:
            raise NoTargets("; ".join(reason for _, reason in closed))
        for cluster, reason in closed:
            log.info("slot skipped for a closed cluster schedule=%s cluster=%s", sched.name, cluster)
            detail = f"schedule {sched.name}, slot {when.isoformat()}: {reason}"
            await self.audit.record(
                "skipped", task_id=slot_task_id(sched.name, when, cluster), cluster=cluster, detail=detail
            )
        return open_

    async def emit_ping(self, task: Task, run: str, detail: str) -> None:
        """Emit one canary ping like a schedule's task, under the schedule name `(canary)`."""
        await self._emit(task, "(canary)", run, detail)

    async def _emit(self, task: Task, schedule: str, run: str, detail: str) -> None:
        """Record the task as pending and publish it with its id as Nats-Msg-Id. A record left by a
        leader that died before publishing is published again (JetStream drops the copy if the
        first publish did land); one the router already took is left alone."""
        task_id = task.task_id
        attributes = {"task_id": task_id, "schedule": schedule, "slot": run, "cluster": task.cluster_name}
        with self._tracer.start_as_current_span("emit", attributes=attributes):
            record = TaskRecord(task=task, state="pending", created_at=time.time())
            if not await self.status.create_task(task_id, record):
                known = await self.status.get_task(task_id)
                if known is not None and known.state != "pending":
                    log.info("slot already emitted schedule=%s task_id=%s", schedule, task_id)
                    return
            ack = await bus.publish(self.js, subjects.GLOBAL, encode(task), msg_id=task_id)
            if not ack.duplicate:
                self.metrics.emitted.add(1, {"schedule": schedule})
                await self.audit.record("emitted", task_id=task_id, cluster=task.cluster_name, detail=detail)
        log.info(
            "emitted schedule=%s slot=%s task_id=%s duplicate=%s", schedule, run, task_id, bool(ack.duplicate)
        )

    async def trigger(
        self, sched: Schedule, slot: Slot, now: datetime | None = None, by: str = ""
    ) -> tuple[str, ...]:
        """Emit one run of `sched` now (ids `sched-<name>-manual-<time>`), paused or not. It
        becomes the schedule's newest run: `skip` and `queue` wait for it like for any run."""
        name = sched.name
        async with self._lock:
            state, version = await self.state.load(name)
            at = now or datetime.now(UTC)
            ids = await self.emit_run(sched, slot, at, manual=True)
            base = state or ScheduleState(last_slot=at - timedelta(seconds=2 * self.tick_seconds))
            await self.state.save(
                name, msgspec.structs.replace(base, last_task_id=ids[0], last_run=ids), version
            )
        who = f" by {by}" if by else ""
        await self.audit.record(
            "triggered", task_id=ids[0], detail=f"schedule {name}{who}: {len(ids)} task(s)"
        )
        return ids


def _paused(flag: PauseFlag) -> str:
    by = f" by {flag.by}" if flag.by else ""
    why = f" ({flag.reason})" if flag.reason else ""
    return f"paused{by}{why}"
