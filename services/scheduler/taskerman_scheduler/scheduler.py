"""The scheduler: emits the due slots of its schedules while it leads, and serves the APIs.

Any number of replicas may run. Every replica answers `taskerman.api.submit` (one queue group) and
re-reads a changed schedule file; only the holder of the one-slot semaphore `/scheduler/leader`
emits schedule slots and canary pings and answers `taskerman.api.schedules`. The newest slot
handled per schedule lives in ZooKeeper, so a new leader continues where the old one stopped; the
slot's deterministic task id is also its `Nats-Msg-Id`, so not even two leaders can store one twice.

Which due slots go out, wait or are skipped (overlap policies, pauses) is emission.py's concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from aiozk import exc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus.audit import Audit
from taskcore.bus.submission import SubmitReply
from taskcore.bus.tracking import StatusStore
from taskcore.coord import schedule_control as control
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import Slot, ZkSession
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import LeaseLost
from taskerman_scheduler import api
from taskerman_scheduler.canary import Canary, CanaryConfig
from taskerman_scheduler.emission import Emitter
from taskerman_scheduler.notifier import Notifier
from taskerman_scheduler.schedule_file import ScheduleFile
from taskerman_scheduler.schedules import Schedule, ScheduleError, UnknownSchedule
from taskerman_scheduler.state import CanaryStore, StateStore
from taskerman_scheduler.targets import KnownClusters
from taskerman_scheduler.webhooks import Webhook

log = logging.getLogger(__name__)
T = TypeVar("T")

LEADER_PATH = "/scheduler/leader"
TICK_SECONDS = 1.0
RELOAD_SECONDS = 2.0  # how often the schedule file's mtime is looked at
SHUTDOWN_GRACE = 1.0  # how long in-hand work may take after SIGTERM before it is cancelled


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
        webhooks: Mapping[str, Webhook] | None = None,
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
        self.submissions = api.Submissions(js, status, registry, self.audit.by)
        self.leader = FairSemaphore(zk, LEADER_PATH, 1)
        targets = KnownClusters(zk, inventory)
        self.emitter = Emitter(
            js, zk, status, self.leader, audit=self.audit, targets=targets, tick_seconds=tick
        )
        self.canary = (
            Canary(canary, status, CanaryStore(zk), self.emitter.emit_ping, self._canary_late)
            if canary
            else None
        )
        self.notifier = Notifier(js, status, dict(webhooks)) if webhooks else None

    @property
    def state(self) -> StateStore:
        """Where each schedule's newest handled slot and run are kept."""
        return self.emitter.state

    @property
    def grace(self) -> timedelta:
        """Slots this late are still on time: a few ticks plus a leader failover (session expiry)."""
        return self.emitter.grace

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
        notifying = self._notify(stop)
        try:
            while not stop.is_set():
                await self.leader.verify(slot)
                await self.tick(slot, stop=stop)
                if self.canary is not None:
                    await self._canary_tick(self.canary, slot)
                if api_task.done():
                    log.error("schedules API stopped, restarting it error=%r", api_task.exception())
                    api_task = serve_api()
                if notifying is not None and notifying.done():
                    log.error("notifier stopped, restarting it error=%r", notifying.exception())
                    notifying = self._notify(stop)
                await _wait(stop, self.tick_seconds)
        finally:
            for task in (api_task, notifying):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (api_task, notifying) if t), return_exceptions=True)

    def _notify(self, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """The notifier, run by the leader for its term (one reader of the audit trail)."""
        if self.notifier is None:
            return None
        return asyncio.create_task(self.notifier.run(stop), name="scheduler-notifier")

    async def _canary_late(self, detail: str) -> None:
        assert self.canary is not None
        await self.audit.record("canary-late", cluster=self.canary.config.cluster, detail=detail)

    async def _canary_tick(self, canary: Canary, slot: Slot) -> None:
        try:
            await canary.tick(time.time(), lambda: self.leader.verify(slot))
        except (LeaseLost, exc.ZKError):
            raise
        except Exception:
            log.exception("canary tick failed; retrying next tick")

    # emission (see emission.py) ---------------------------------------------------------------

    async def tick(self, slot: Slot, now: datetime | None = None, stop: asyncio.Event | None = None) -> int:
        """One pass over every schedule as the holder of `slot`; returns how many tasks it emitted."""
        return await self.emitter.tick(self.schedules, slot, now, stop)

    async def trigger(
        self, name: str, slot: Slot, now: datetime | None = None, by: str = ""
    ) -> tuple[str, ...]:
        """Emit one run of the schedule called `name` now, paused or not (UnknownSchedule if none)."""
        return await self.emitter.trigger(self.find(name), slot, now, by)

    # submit API (every replica) -----------------------------------------------------------------

    async def submit(self, data: bytes, headers: dict[str, str] | None = None) -> SubmitReply:
        return await self.submissions.submit(data, headers)


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
