"""The scheduler: emits the due slots of its schedules while it leads, and serves the submit API.

Any number of replicas may run. Every replica answers `taskerman.api.submit` (one queue group);
only the holder of the one-slot semaphore `/scheduler/leader` emits schedule slots. The newest slot
handled per schedule lives in ZooKeeper, so a new leader continues where the old one stopped; the
slot's deterministic task id is also its `Nats-Msg-Id`, so not even two leaders can store one twice.
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
from typing import TypeVar

import msgspec
import nats.errors
from aiozk import exc
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore import audit, bus, subjects, submission, tracing
from taskcore.actions import ActionRegistry
from taskcore.audit import Audit
from taskcore.coordination import Slot, SlotSemaphore, ZkSession
from taskcore.errors import InvalidTask, LeaseLost
from taskcore.model import TaskRecord, decode_task, encode, with_task_id
from taskcore.submission import SubmitReply
from taskcore.tracking import StatusStore
from taskerman_scheduler.schedules import Schedule, due_slots, slot_task_id, window_start

log = logging.getLogger(__name__)
T = TypeVar("T")

LEADER_PATH = "/scheduler/leader"
STATE_ROOT = "/scheduler/last"
TICK_SECONDS = 1.0
SHUTDOWN_GRACE = 1.0  # how long in-hand work may take after SIGTERM before it is cancelled
_FINISHED = {"succeeded", "failed", "dead"}


class ScheduleState(msgspec.Struct, frozen=True):
    """What ZooKeeper keeps per schedule: the newest slot handled (emitted, or skipped for overlap)
    and the task id of the newest slot emitted (the run that `overlap = "skip"` waits for)."""

    last_slot: datetime
    last_task_id: str = ""


class StateStore:
    """Per-schedule state znodes under `/scheduler/last/<encoded name>`, written with the version
    read, so a deposed leader that still writes fails instead of moving a schedule backwards."""

    def __init__(self, zk: ZkSession, root: str = STATE_ROOT) -> None:
        self.zk = zk
        self.root = root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{subjects.encode_token(name)}"

    async def load(self, name: str) -> tuple[ScheduleState | None, int]:
        """The state and its znode version (-1: no znode yet)."""
        try:
            data, stat = await self.zk.client.get(self.path(name))
        except exc.NoNode:
            return None, -1
        version: int = stat.version
        try:
            return msgspec.json.decode(data or b"", type=ScheduleState), version
        except msgspec.DecodeError as e:
            log.error("unreadable schedule state, starting afresh schedule=%s error=%s", name, e)
            return None, version

    async def save(self, name: str, state: ScheduleState, version: int) -> int:
        """Write the state if its znode is still at `version`; the new version, or LeaseLost."""
        data = msgspec.json.encode(state)
        path = self.path(name)
        try:
            if version >= 0:
                stat = await self.zk.client.set(path, data, version)
                new_version: int = stat.version
                return new_version
            for _ in range(3):  # the parent is a container znode: it may be reaped between the calls
                await self.zk.client.ensure_path(self.root)
                with contextlib.suppress(exc.NoNode):
                    await self.zk.client.create(path, data=data)
                    return 0
        except (exc.BadVersion, exc.NodeExists) as e:
            raise LeaseLost(f"schedule state {path} was changed by someone else") from e
        raise LeaseLost(f"could not create schedule state {path}")


class Scheduler:
    """Leads (or waits to lead) the emission of schedule slots, and serves the submit API."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        zk: ZkSession,
        status: StatusStore,
        registry: ActionRegistry,
        *,
        schedules: Sequence[Schedule] = (),
        tick: float = TICK_SECONDS,
        holder: str | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.zk = zk
        self.status = status
        self.registry = registry
        self.schedules = list(schedules)
        self.tick_seconds = tick
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.audit = Audit(js, audit.actor("scheduler"))
        self.leader = SlotSemaphore(zk, LEADER_PATH, 1)
        self.state = StateStore(zk)
        self._tracer = tracing.tracer(__name__)

    @property
    def grace(self) -> timedelta:
        """Slots this late are still on time: a few ticks plus a leader failover (session expiry)."""
        return timedelta(seconds=self.zk.timeout + 3 * self.tick_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve submissions and contend for leadership until `stop` is set; then give work in hand
        SHUTDOWN_GRACE seconds before cancelling it (leadership is released either way)."""
        loops = [
            asyncio.create_task(self._serve_submit(stop), name="scheduler-submit"),
            asyncio.create_task(self._lead(stop), name="scheduler-lead"),
        ]
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
        while not stop.is_set():
            await self.leader.verify(slot)
            try:
                await self.tick(slot, stop=stop)
            except (LeaseLost, exc.ZKError):
                raise
            except Exception:
                log.exception("scheduler tick failed; retrying next tick")
            await _wait(stop, self.tick_seconds)

    # emission -----------------------------------------------------------------------------------

    async def tick(self, slot: Slot, now: datetime | None = None, stop: asyncio.Event | None = None) -> int:
        """One pass over every schedule as the holder of `slot`; returns how many tasks it emitted."""
        emitted = 0
        for sched in self.schedules:
            if stop is not None and stop.is_set():
                break
            emitted += await self._run_schedule(sched, slot, now or datetime.now(UTC), stop)
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
            state = ScheduleState(last_slot=start, last_task_id=state.last_task_id)
            version = await self.state.save(sched.name, state, version)
        emitted = 0
        for when in due_slots(sched, state.last_slot, now, grace=self.grace):
            if stop is not None and stop.is_set():
                break
            previous = state.last_task_id
            if sched.overlap == "skip" and previous and await self._unfinished(previous):
                log.info(
                    "slot skipped, previous run unfinished schedule=%s slot=%s previous=%s",
                    sched.name,
                    when.isoformat(),
                    previous,
                )
                state = ScheduleState(last_slot=when, last_task_id=previous)
            else:
                task_id = slot_task_id(sched.name, when)
                await self.leader.verify(slot)
                await self._emit(sched, when, task_id)
                state = ScheduleState(last_slot=when, last_task_id=task_id)
                emitted += 1
            version = await self.state.save(sched.name, state, version)
        return emitted

    async def _unfinished(self, task_id: str) -> bool:
        view = await self.status.view(task_id)
        return view is not None and view.state not in _FINISHED

    async def _emit(self, sched: Schedule, when: datetime, task_id: str) -> None:
        """Record the slot's task as pending and publish it with its id as Nats-Msg-Id. A record
        left by a leader that died before publishing is published again (JetStream drops the copy
        if the first publish did land); one the router already took is left alone."""
        task = with_task_id(sched.task, task_id)
        attributes = {"task_id": task_id, "schedule": sched.name, "slot": when.isoformat()}
        with self._tracer.start_as_current_span("emit", attributes=attributes):
            record = TaskRecord(task=task, state="pending", created_at=time.time())
            if not await self.status.create_task(task_id, record):
                known = await self.status.get_task(task_id)
                if known is not None and known.state != "pending":
                    log.info("slot already emitted schedule=%s task_id=%s", sched.name, task_id)
                    return
            ack = await bus.publish(self.js, subjects.GLOBAL, encode(task), msg_id=task_id)
            if not ack.duplicate:
                await self.audit.record(
                    "emitted",
                    task_id=task_id,
                    cluster=task.cluster_name,
                    detail=f"schedule {sched.name}, slot {when.isoformat()}",
                )
        log.info(
            "emitted schedule=%s slot=%s task_id=%s duplicate=%s",
            sched.name,
            when.isoformat(),
            task_id,
            bool(ack.duplicate),
        )

    # submit API ---------------------------------------------------------------------------------

    async def _serve_submit(self, stop: asyncio.Event) -> None:
        sub = await self.nc.subscribe(subjects.SUBMIT_SUBJECT, queue=subjects.SUBMIT_QUEUE)
        log.info("serving %s queue=%s", subjects.SUBMIT_SUBJECT, subjects.SUBMIT_QUEUE)
        try:
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                reply = await self._submit_or_error(msg)
                if msg.reply:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.respond(msgspec.json.encode(reply))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _submit_or_error(self, msg: Msg) -> SubmitReply:
        try:
            return await self.submit(msg.data, dict(msg.headers or {}))
        except Exception as e:
            log.exception("submit failed")
            return SubmitReply(error=f"internal error: {e!r}")

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
            reply = await submission.submit(self.js, self.status, task, by=self.audit.by)
        log.info(
            "submitted task_id=%s action=%s cluster=%s duplicate=%s",
            task.task_id,
            task.action,
            task.cluster_name,
            reply.duplicate,
        )
        return reply


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
