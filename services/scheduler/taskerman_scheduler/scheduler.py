"""The scheduler: emits the due slots of its schedules while it leads, and serves the APIs.

Any number of replicas may run. Every replica answers `taskerman.api.submit` (one queue group) and
re-reads a changed schedule file; only the holder of the one-slot semaphore `/scheduler/leader`
emits schedule slots and canary pings and answers `taskerman.api.schedules`. The newest slot
handled per schedule lives in ZooKeeper, so a new leader continues where the old one stopped; the
slot's deterministic task id is also its `Nats-Msg-Id`, so not even two leaders can store one twice.

Overlap policies, when a slot comes due while the schedule's newest run is unfinished:
`allow` emits it anyway; `skip` skips it; `queue` keeps it (one at most) and emits it once the run
has finished; a further slot while one waits is skipped. A paused schedule's slots are skipped
(and a waiting one dropped); skipped slots are counted, logged and audited, never caught up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import msgspec
from aiozk import exc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Audit
from taskcore.bus.submission import SubmitReply
from taskcore.bus.tracking import StatusStore
from taskcore.coord import schedule_control as control
from taskcore.coord.schedule_control import PauseFlag
from taskcore.coord.session import Slot, SlotSemaphore, ZkSession
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import LeaseLost
from taskcore.core.model import Task, TaskRecord, encode
from taskcore.obs import tracing
from taskcore.obs.metrics import Instruments
from taskerman_scheduler import api
from taskerman_scheduler.canary import Canary, CanaryConfig
from taskerman_scheduler.schedules import (
    Schedule,
    ScheduleError,
    ScheduleFile,
    UnknownSchedule,
    due_slots,
    manual_task_id,
    slot_task_id,
    window_start,
)
from taskerman_scheduler.state import CanaryStore, ScheduleState, StateStore
from taskerman_scheduler.targets import KnownClusters, NoTargets, TargetError

log = logging.getLogger(__name__)
T = TypeVar("T")

LEADER_PATH = "/scheduler/leader"
TICK_SECONDS = 1.0
RELOAD_SECONDS = 2.0  # how often the schedule file's mtime is looked at
SHUTDOWN_GRACE = 1.0  # how long in-hand work may take after SIGTERM before it is cancelled
_FINISHED = {"succeeded", "failed", "dead"}


class Scheduler:
    """Leads (or waits to lead) the emission of schedule slots, and serves the APIs."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        zk: ZkSession,
        status: StatusStore,
        registry: ActionRegistry,
        *,
        schedules: Sequence[Schedule] = (),
        source: ScheduleFile | None = None,
        inventory: Path | None = None,
        canary: CanaryConfig | None = None,
        tick: float = TICK_SECONDS,
        reload_every: float = RELOAD_SECONDS,
        holder: str | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.zk = zk
        self.status = status
        self.registry = registry
        self.schedules = list(schedules)
        self.source = source
        self.tick_seconds = tick
        self.reload_every = reload_every
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.audit = Audit(js, audit.actor("scheduler"))
        self.metrics = Instruments()
        self.submissions = api.Submissions(js, status, registry, self.audit.by)
        self.leader = SlotSemaphore(zk, LEADER_PATH, 1)
        self.state = StateStore(zk)
        self.targets = KnownClusters(zk, inventory)
        self.canary = Canary(canary, status, CanaryStore(zk), self._emit_ping) if canary else None
        self._lock = asyncio.Lock()  # a schedule's state is changed by one coroutine at a time
        self._tracer = tracing.tracer(__name__)

    @property
    def grace(self) -> timedelta:
        """Slots this late are still on time: a few ticks plus a leader failover (session expiry)."""
        return timedelta(seconds=self.zk.timeout + 3 * self.tick_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve submissions, follow the schedule file and contend for leadership until `stop` is
        set; then give work in hand SHUTDOWN_GRACE seconds before cancelling it (leadership is
        released either way)."""
        loops = [
            asyncio.create_task(
                api.serve(
                    self.nc, subjects.SUBMIT_SUBJECT, subjects.SUBMIT_QUEUE, self.submissions.handle, stop
                ),
                name="scheduler-submit",
            ),
            asyncio.create_task(self._lead(stop), name="scheduler-lead"),
        ]
        if self.source is not None:
            loops.append(asyncio.create_task(self._follow_file(self.source, stop), name="scheduler-reload"))
        stopping = asyncio.create_task(stop.wait(), name="scheduler-stop")
        try:
            await asyncio.wait([*loops, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                await asyncio.wait(loops, timeout=SHUTDOWN_GRACE)
        finally:
            for t in [*loops, stopping]:
                t.cancel()
            results = await asyncio.gather(*loops, stopping, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                raise r
        if not stop.is_set():
            raise RuntimeError("a scheduler loop ended before stop was requested")

    # the schedule file --------------------------------------------------------------------------

    async def _follow_file(self, source: ScheduleFile, stop: asyncio.Event) -> None:
        """Re-read the schedule file when it changes; a broken one is logged and ignored."""
        while not stop.is_set():
            await _wait(stop, self.reload_every)
            if stop.is_set():
                return
            try:
                schedules = await asyncio.to_thread(source.poll)
            except ScheduleError as e:
                log.error(
                    "schedule file reload rejected, keeping the last good schedules (%d): %s",
                    len(self.schedules),
                    e,
                )
                continue
            except Exception:
                log.exception("schedule file reload failed, keeping the last good schedules")
                continue
            if schedules is not None:
                self.replace_schedules(schedules)

    def replace_schedules(self, schedules: Sequence[Schedule]) -> None:
        """Swap in a new set of schedules (each tick works on the set it started with)."""
        old = {s.name: s for s in self.schedules}
        new = {s.name: s for s in schedules}
        changed = sorted(n for n in old.keys() & new.keys() if old[n] != new[n])
        self.schedules = list(schedules)
        log.info(
            "schedules reloaded count=%d added=%s removed=%s changed=%s",
            len(new),
            sorted(new.keys() - old.keys()),
            sorted(old.keys() - new.keys()),
            changed,
        )

    def find(self, name: str) -> Schedule:
        for sched in self.schedules:
            if sched.name == name:
                return sched
        known = ", ".join(repr(s.name) for s in self.schedules) or "none"
        raise UnknownSchedule(f"unknown schedule {name!r} (the leader runs: {known})")

    # leadership ---------------------------------------------------------------------------------

    async def _lead(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            slot = await self._acquire(stop)
            if slot is None:
                return
            log.info("leader elected holder=%s token=%d", slot.holder, slot.token)
            try:
                await self._as_leader(slot, stop)
            except (LeaseLost, exc.ZKError) as e:
                log.warning("leadership lost holder=%s reason=%r", slot.holder, e)
            finally:
                await self._release(slot)
            if not stop.is_set():
                await _wait(stop, self.tick_seconds)

    async def _acquire(self, stop: asyncio.Event) -> Slot | None:
        """Wait (on the semaphore's watch) for leadership; None once `stop` is set."""
        while not stop.is_set():
            try:
                return await _unless_stopped(self.leader.acquire(self.holder), stop)
            except (exc.ZKError, TimeoutError) as e:
                log.warning("leader election failed, retrying error=%r", e)
                await _wait(stop, self.tick_seconds)
        return None

    async def _release(self, slot: Slot) -> None:
        """Give leadership up; shielded, as it runs while we may be being cancelled. Should it fail,
        the slot is ephemeral and goes with our session."""
        try:
            await asyncio.shield(asyncio.wait_for(self.leader.release(slot), self.zk.timeout / 2))
        except Exception as e:
            log.warning("could not release leadership error=%r", e)

    async def _as_leader(self, slot: Slot, stop: asyncio.Event) -> None:
        """Tick while leading; the schedules API is served for exactly this term."""

        def serve_api() -> asyncio.Task[None]:
            serving = api.serve(
                self.nc, control.API_SUBJECT, control.API_QUEUE, api.SchedulesApi(self, slot).handle, stop
            )
            return asyncio.create_task(serving, name="scheduler-api")

        api_task = serve_api()
        try:
            while not stop.is_set():
                await self.leader.verify(slot)
                await self.tick(slot, stop=stop)
                if self.canary is not None:
                    await self._canary_tick(self.canary, slot)
                if api_task.done():
                    log.error("schedules API stopped, restarting it error=%r", api_task.exception())
                    api_task = serve_api()
                await _wait(stop, self.tick_seconds)
        finally:
            api_task.cancel()
            await asyncio.gather(api_task, return_exceptions=True)

    async def _canary_tick(self, canary: Canary, slot: Slot) -> None:
        try:
            await canary.tick(time.time(), lambda: self.leader.verify(slot))
        except (LeaseLost, exc.ZKError):
            raise
        except Exception:
            log.exception("canary tick failed; retrying next tick")

    # emission -----------------------------------------------------------------------------------

    async def tick(self, slot: Slot, now: datetime | None = None, stop: asyncio.Event | None = None) -> int:
        """One pass over every schedule as the holder of `slot`; returns how many tasks it emitted.
        A schedule that fails is logged and retried next tick; losing leadership raises."""
        now = now or datetime.now(UTC)
        emitted = 0
        for sched in list(self.schedules):
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
            if view is not None and view.state not in _FINISHED:
                return True
        return False

    async def emit_run(
        self, sched: Schedule, slot: Slot, when: datetime, *, manual: bool = False
    ) -> tuple[str, ...]:
        """Emit one run of `sched`: one task per target cluster, all under one trace, each audited
        with the schedule and the slot. NoTargets when a pattern matches no known cluster."""
        clusters = await self.targets.resolve(sched)
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

    async def _emit_ping(self, task: Task, run: str, detail: str) -> None:
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
        self, name: str, slot: Slot, now: datetime | None = None, by: str = ""
    ) -> tuple[str, ...]:
        """Emit one run of the schedule now (ids `sched-<name>-manual-<time>`), paused or not. It
        becomes the schedule's newest run: `skip` and `queue` wait for it like for any run."""
        sched = self.find(name)
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

    # submit API (every replica) -----------------------------------------------------------------

    async def submit(self, data: bytes, headers: dict[str, str] | None = None) -> SubmitReply:
        return await self.submissions.submit(data, headers)


def _paused(flag: PauseFlag) -> str:
    by = f" by {flag.by}" if flag.by else ""
    why = f" ({flag.reason})" if flag.reason else ""
    return f"paused{by}{why}"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _unless_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`aw`'s result, or None (with `aw` cancelled) once `stop` is set first."""
    work = asyncio.ensure_future(aw)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([work, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, stopping):
            if not t.done():
                t.cancel()
        await asyncio.gather(work, stopping, return_exceptions=True)
    if work.cancelled():
        return None
    return work.result()
