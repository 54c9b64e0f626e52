"""Request/reply endpoints over NATS core: one serving loop; the submit API, which every replica
serves; the schedules API (list, next, trigger), which only the leader serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus import submission
from taskcore.bus.submission import SubmitReply
from taskcore.bus.tracking import StatusStore
from taskcore.coord import schedule_control as control
from taskcore.coord.schedule_control import ApiReply, ApiRequest, NextSlot, ScheduleInfo
from taskcore.coord.session import Slot, ZkSession
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask
from taskcore.core.model import decode_task, with_task_id
from taskcore.obs import tracing
from taskerman_scheduler.schedules import Schedule, UnknownSchedule
from taskerman_scheduler.slots import next_slots, slot_task_id, window_start
from taskerman_scheduler.state import StateStore
from taskerman_scheduler.targets import TargetError

log = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[bytes]]


async def serve(nc: NATS, subject: str, queue: str, handle: Handler, stop: asyncio.Event) -> None:
    """Answer requests on `subject` as one member of `queue`, one at a time, until `stop` is set
    (or the caller cancels: the subscription goes either way)."""
    sub = await nc.subscribe(subject, queue=queue)
    log.info("serving %s queue=%s", subject, queue)
    try:
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            reply = await handle(msg)
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(reply)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class Submissions:
    """`taskerman.api.submit`: validate a task and reply with its id or with what is wrong."""

    def __init__(self, js: JetStreamContext, status: StatusStore, registry: ActionRegistry, by: str) -> None:
        self.js = js
        self.status = status
        self.registry = registry
        self.by = by
        self._tracer = tracing.tracer(__name__)

    async def handle(self, msg: Msg) -> bytes:
        try:
            reply = await self.submit(msg.data, dict(msg.headers or {}))
        except bus.UNAVAILABLE as e:
            log.warning("submit failed, the bus is unavailable error=%r", e)
            reply = SubmitReply(error=f"the bus is unavailable ({e!r}): submit again", retryable=True)
        except Exception as e:
            log.exception("submit failed")
            reply = SubmitReply(error=f"internal error: {e!r}")
        return msgspec.json.encode(reply)

    async def submit(self, data: bytes, headers: dict[str, str] | None = None) -> SubmitReply:
        """Validate a task, give it an id when it has none, record it as pending and publish it
        with its id as Nats-Msg-Id; a task id seen before is reported as a duplicate, not resent."""
        context = tracing.extract_context(headers)
        with self._tracer.start_as_current_span("submit", context=context) as span:
            try:
                task = decode_task(data)
                self.registry.resolve(task)
            except InvalidTask as e:
                log.info("submit rejected field=%s error=%s", e.field, e.problem)
                return SubmitReply(error=str(e), field=e.field)
            task = with_task_id(task)
            span.set_attribute("task_id", task.task_id)
            reply = await submission.submit(self.js, self.status, task, by=self.by)
        log.info(
            "submitted task_id=%s action=%s cluster=%s duplicate=%s",
            task.task_id,
            task.action,
            task.cluster_name,
            reply.duplicate,
        )
        return reply


class Leader(Protocol):
    """What the schedules API needs of the scheduler it answers for (the Scheduler, while it leads)."""

    @property
    def holder(self) -> str:
        """Who leads: reported in every reply."""

    @property
    def schedules(self) -> Sequence[Schedule]:
        """The schedules this leader runs."""

    @property
    def state(self) -> StateStore:
        """Each schedule's newest handled slot and run."""

    @property
    def grace(self) -> timedelta:
        """How late a slot may be and still go out."""

    @property
    def zk(self) -> ZkSession:
        """The session the pause flags are read with."""

    def find(self, name: str) -> Schedule:
        """The schedule called `name`; UnknownSchedule if there is none."""

    async def trigger(
        self, name: str, slot: Slot, now: datetime | None = None, by: str = ""
    ) -> tuple[str, ...]:
        """Emit one run of the schedule called `name` now, as the holder of `slot`."""


class SchedulesApi:
    """`taskerman.api.schedules` for one leadership term: answers about the schedules this leader
    runs, with their state from ZooKeeper, and triggers runs as the holder of `slot`."""

    def __init__(self, scheduler: Leader, slot: Slot) -> None:
        self.scheduler = scheduler
        self.slot = slot

    async def handle(self, msg: Msg) -> bytes:
        try:
            reply = await self.answer(msg.data)
        except Exception as e:
            log.exception("schedules API request failed")
            reply = ApiReply(leader=self.scheduler.holder, error=f"internal error: {e!r}")
        return msgspec.json.encode(reply)

    async def answer(self, data: bytes) -> ApiReply:
        """Answer `list`, `next` or `trigger`."""
        s = self.scheduler
        try:
            req = msgspec.json.decode(data, type=ApiRequest)
        except msgspec.DecodeError as e:
            return ApiReply(leader=s.holder, error=f"bad request: {e}")
        try:
            if req.op == "trigger":
                if not req.name:
                    return ApiReply(leader=s.holder, error="trigger needs a schedule name")
                ids = await s.trigger(req.name, self.slot, by=req.by)
                return ApiReply(leader=s.holder, task_ids=list(ids))
            chosen = [s.find(req.name)] if req.name else list(s.schedules)
        except (UnknownSchedule, TargetError) as e:
            return ApiReply(leader=s.holder, error=str(e))
        now = datetime.now(UTC)
        count = req.count if req.op == "next" else 1
        return ApiReply(leader=s.holder, schedules=[await self.describe(x, now, count) for x in chosen])

    async def describe(self, sched: Schedule, now: datetime, count: int = 1) -> ScheduleInfo:
        """The schedule, its state and pause flag, and its next `count` slots not yet handled."""
        state, _ = await self.scheduler.state.load(sched.name)
        start = max(state.last_slot if state else now, window_start(sched, now, self.scheduler.grace))
        upcoming = [
            NextSlot(slot=slot, emit_at=emit_at, task_id=slot_task_id(sched.name, slot))
            for slot, emit_at in next_slots(sched, start, count)
        ]
        return ScheduleInfo(
            name=sched.name,
            cron=sched.cron,
            timezone=sched.timezone,
            overlap=sched.overlap,
            catchup_s=sched.catchup.total_seconds(),
            jitter_s=sched.jitter.total_seconds(),
            target=sched.target,
            action=sched.task.action,
            cluster_name=sched.task.cluster_name,
            clusters=list(sched.clusters),
            cluster_pattern=sched.cluster_pattern,
            paused=await control.read_pause(self.scheduler.zk, sched.name),
            last_slot=state.last_slot if state else None,
            last_task_id=state.last_task_id if state else "",
            last_run=list(state.run_ids) if state else [],
            queued_slot=state.queued_slot if state else None,
            skipped=state.skipped if state else 0,
            last_skip=state.last_skip if state else "",
            next=upcoming,
        )
