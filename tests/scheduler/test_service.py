"""The Scheduler in-process on real NATS and ZooKeeper, driven tick by tick with a chosen `now`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters
from taskcore.coord import schedule_control as control
from taskcore.coord.runners import Registration
from taskcore.coord.schedule_control import PauseFlag
from taskcore.coord.session import ZkSession
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import LeaseLost
from taskcore.core.model import TaskRecord, decode_task
from taskerman_scheduler.scheduler import Scheduler
from taskerman_scheduler.schedules import Schedule, UnknownSchedule
from taskerman_scheduler.slots import slot_task_id
from taskerman_scheduler.state import ScheduleState, StateStore

from .helpers import published, slot_of

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
TEMPLATE = decode_task(b'{"action": "test:sleep", "cluster_name": "c1", "nodes": ["n1"]}')


def _sec(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def _schedules() -> list[Schedule]:
    return [
        Schedule(name="each", cron="* * * * * *", overlap="allow", task=TEMPLATE),
        Schedule(name="one at a time", cron="* * * * * *", overlap="skip", task=TEMPLATE),
    ]


def _scheduler(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore, holder: str
) -> Scheduler:
    nc, jsc = js
    return Scheduler(nc, jsc, zk, status, ActionRegistry.installed(), schedules=_schedules(), holder=holder)


async def test_leaders_continue_each_other_and_skip_overlapping_runs(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    a = _scheduler(js, zk, status, "replica-a")
    b = _scheduler(js, zk, status, "replica-b")
    slot_a = await a.leader.acquire(a.holder)

    # New schedules without catch-up start about now: two ticks back.
    assert await a.tick(slot_a, now=_sec(0)) == 3  # "each": -1 and 0; "one at a time": -1 (0 overlaps)
    first_skip = slot_task_id("one at a time", _sec(-1))
    assert await a.tick(slot_a, now=_sec(2)) == 2  # the skip schedule's first run is still pending
    state, _ = await StateStore(zk).load("one at a time")
    assert state is not None
    assert (state.last_slot, state.run_ids, state.skipped) == (_sec(2), (first_skip,), 3)  # 0, 1, 2
    assert "unfinished" in state.last_skip

    record = await status.get_task(first_skip)
    assert record is not None
    assert record.state == "pending"
    await status.put_task(first_skip, msgspec.structs.replace(record, state="succeeded"))
    assert await a.tick(slot_a, now=_sec(3)) == 2  # finished: the skip schedule runs again

    # Leadership moves: the old holder can no longer emit, the new one continues from the state.
    b_acquiring = b.leader.acquire(b.holder, max_wait=0.5)
    with pytest.raises(TimeoutError):
        await b_acquiring
    await a.leader.release(slot_a)
    slot_b = await b.leader.acquire(b.holder, max_wait=10)
    with pytest.raises(LeaseLost):
        await a.tick(slot_a, now=_sec(5))
    assert await b.tick(slot_b, now=_sec(5)) == 2  # "each" at 4 and 5; the run of 3 is pending
    assert await b.tick(slot_b, now=_sec(5)) == 0  # a repeat tick emits nothing

    published_tasks = await published(js[1])
    ids = [msg_id for msg_id, _ in published_tasks]
    assert len(ids) == len(set(ids))
    for msg_id, task in published_tasks:
        assert task.task_id == msg_id
        assert task.owner.startswith("schedule:")  # the template has none: the schedule is named
        assert msgspec.structs.replace(task, task_id="", owner="") == TEMPLATE
    each = sorted(s for i in ids if (s := slot_of(i, "each")))
    assert each == [_sec(n) for n in range(-1, 6)]  # every slot exactly once, no gap
    skip = sorted(s for i in ids if (s := slot_of(i, "one=20at=20a=20time")))
    assert skip == [_sec(-1), _sec(3)]
    for task_id in ids:
        rec = await status.get_task(task_id)
        assert isinstance(rec, TaskRecord)
        assert rec.task is not None
        assert rec.task.task_id == task_id


async def test_catchup_window_for_missed_and_new_schedules(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    window = timedelta(minutes=3)
    missed = Schedule(name="old", cron="* * * * *", catchup=window, overlap="skip", task=TEMPLATE)
    new = Schedule(name="new", cron="* * * * *", catchup=window, overlap="allow", task=TEMPLATE)
    nc, jsc = js
    s = Scheduler(nc, jsc, zk, status, ActionRegistry.installed(), schedules=[missed, new], holder="x")
    slot = await s.leader.acquire(s.holder)
    await StateStore(zk).save("old", ScheduleState(last_slot=T0 - timedelta(hours=5)), -1)
    assert await s.tick(slot, now=T0 + timedelta(seconds=30)) == 1
    minutes = [T0 - timedelta(minutes=2), T0 - timedelta(minutes=1), T0]  # within the 3 minutes
    assert [i for i, _ in await published(jsc)] == [slot_task_id("old", minutes[0])]
    state, _ = await StateStore(zk).load("old")
    assert state is not None
    assert state.last_slot == T0  # the other two overlapped the first run: skipped, not left for later
    assert await s.tick(slot, now=T0 + timedelta(seconds=59)) == 0
    # A new schedule starts when first seen, whatever its catch-up window: 12:01 is its first slot.
    assert await s.tick(slot, now=T0 + timedelta(seconds=60)) == 1
    assert [i for i, _ in await published(jsc)][1:] == [slot_task_id("new", T0 + timedelta(minutes=1))]


async def test_missed_slots_are_warned_of_once_not_every_tick(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An hourly schedule's last slot is older than the catch-up window at almost every tick,
    with nothing missed: only slots really skipped are worth the warning."""
    hourly = Schedule(name="hourly", cron="0 * * * *", overlap="allow", task=TEMPLATE)
    nc, jsc = js
    s = Scheduler(nc, jsc, zk, status, ActionRegistry.installed(), schedules=[hourly], holder="x")
    slot = await s.leader.acquire(s.holder)
    await StateStore(zk).save("hourly", ScheduleState(last_slot=T0 - timedelta(hours=5)), -1)
    with caplog.at_level("WARNING"):
        for second in range(60, 120):  # a minute of ticks, 12:01 to 12:02
            await s.tick(slot, now=T0 + timedelta(seconds=second))
    said = [r for r in caplog.records if "slots missed" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]  # the four hours missed, once


async def test_respect_windows_skips_the_slots_of_a_closed_cluster(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    sched = Schedule(name="polite", cron="* * * * * *", overlap="allow", respect_windows=True, task=TEMPLATE)
    nc, jsc = js
    s = Scheduler(nc, jsc, zk, status, ActionRegistry.installed(), schedules=[sched], holder="x")
    slot = await s.leader.acquire(s.holder)
    await clusters.freeze(zk, "c1", time.time() + 600, "release week", "test")
    assert await s.tick(slot, now=_sec(0)) == 0
    state, _ = await StateStore(zk).load("polite")
    assert state is not None
    assert state.skipped >= 1
    assert "cluster c1 frozen (release week)" in state.last_skip
    await clusters.freeze(zk, "c1", time.time(), "", "test")  # lifted
    assert await s.tick(slot, now=_sec(1)) == 1
    assert [i for i, _ in await published(jsc)] == [slot_task_id("polite", _sec(1))]


async def test_submit_validates_assigns_ids_and_reports_duplicates(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    s = _scheduler(js, zk, status, "x")
    reply = await s.submit(b'{"action": "test:sleep", "cluster_name": "c1", "limit": 0}')
    assert reply.field == "limit"
    assert not reply.task_id
    reply = await s.submit(b'{"action": "test:sleep", "cluster_name": "c1"}')
    assert reply.task_id
    assert not reply.duplicate
    again = await s.submit(
        b'{"action": "test:sleep", "cluster_name": "c1", "task_id": "%s"}' % reply.task_id.encode()
    )
    assert again.task_id == reply.task_id
    assert again.duplicate
    assert [i for i, _ in await published(js[1])] == [reply.task_id]


async def _finish(status: StatusStore, task_id: str) -> None:
    record = await status.get_task(task_id)
    assert record is not None
    await status.put_task(task_id, msgspec.structs.replace(record, state="succeeded"))


async def test_queue_overlap_waits_for_the_run_and_keeps_one(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    nc, jsc = js
    queued = Schedule(name="q", cron="* * * * * *", overlap="queue", task=TEMPLATE)
    s = Scheduler(nc, jsc, zk, status, ActionRegistry.installed(), schedules=[queued], holder="x")
    slot = await s.leader.acquire(s.holder)
    first, second = slot_task_id("q", _sec(-1)), slot_task_id("q", _sec(0))

    assert await s.tick(slot, now=_sec(0)) == 1  # -1 runs; 0 waits for it
    state, _ = await StateStore(zk).load("q")
    assert state is not None
    assert (state.last_task_id, state.queued_slot, state.skipped) == (first, _sec(0), 0)
    assert await s.tick(slot, now=_sec(2)) == 0  # 1 and 2: one run waits already, so they are skipped
    state, _ = await StateStore(zk).load("q")
    assert state is not None
    assert (state.queued_slot, state.skipped, state.last_slot) == (_sec(0), 2, _sec(2))
    assert "queued already" in state.last_skip

    await _finish(status, first)
    assert await s.tick(slot, now=_sec(2)) == 1  # the run finished: the waiting slot goes out
    state, _ = await StateStore(zk).load("q")
    assert state is not None
    assert (state.last_task_id, state.queued_slot) == (second, None)
    assert await s.tick(slot, now=_sec(3)) == 0  # and 3 waits for it in turn
    state, _ = await StateStore(zk).load("q")
    assert state is not None
    assert state.queued_slot == _sec(3)
    assert [i for i, _ in await published(jsc)] == [first, second]  # by its own slot's id
    kinds = [e.kind for e in await audit.task_events(jsc, slot_task_id("q", _sec(1)))]
    assert kinds == ["skipped"]


async def test_pause_skips_slots_and_trigger_runs_now(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore
) -> None:
    nc, jsc = js
    skip = Schedule(name="p", cron="* * * * * *", overlap="skip", task=TEMPLATE)
    s = Scheduler(nc, jsc, zk, status, ActionRegistry.installed(), schedules=[skip], holder="x")
    slot = await s.leader.acquire(s.holder)
    assert await control.pause(zk, "p", PauseFlag(by="ops", reason="maintenance")) is None
    assert await s.tick(slot, now=_sec(0)) == 0
    assert await s.tick(slot, now=_sec(3)) == 0
    state, _ = await StateStore(zk).load("p")
    assert state is not None
    assert (state.skipped, state.last_slot, state.run_ids) == (5, _sec(3), ())  # -1 … 3
    assert "paused by ops (maintenance)" in state.last_skip
    events = await audit.task_events(jsc, slot_task_id("p", _sec(2)))
    assert [(e.kind, "paused by ops" in e.detail) for e in events] == [("skipped", True)]

    # A manual run goes out while paused (an operator asked), and is the run `skip` waits for.
    ids = await s.trigger("p", slot, now=_sec(3) + timedelta(milliseconds=250), by="ops")
    assert ids == ("sched-p-manual-20300101T120003.250",)
    assert await control.resume(zk, "p") is not None
    assert await s.tick(slot, now=_sec(5)) == 0  # 4 and 5: the manual run is unfinished
    await _finish(status, ids[0])
    assert await s.tick(slot, now=_sec(6)) == 1  # resumed: only slots after the pause, no catch-up
    assert [i for i, _ in await published(jsc)] == [*ids, slot_task_id("p", _sec(6))]
    with pytest.raises(UnknownSchedule, match="'p'"):
        await s.trigger("nope", slot)


async def test_pattern_schedule_targets_inventory_and_registry_clusters(
    js: tuple[NATS, JetStreamContext], zk: ZkSession, status: StatusStore, tmp_path: Path
) -> None:
    nc, jsc = js
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        '[clusters."cassandra:a"]\nnodes = ["n1"]\n[clusters."cassandra:b"]\nnodes = ["n1"]\n'
        '[clusters."redis:x"]\nnodes = ["n1"]\n'
    )
    await Registration(zk, "cassandra:c", "n1", "1.0", []).register()  # known from the registry only
    template = msgspec.structs.replace(TEMPLATE, cluster_name="", nodes=())
    pattern = Schedule(
        name="rep", cron="* * * * * *", overlap="allow", cluster_pattern="cassandra:*", task=template
    )
    none = Schedule(
        name="none", cron="* * * * * *", overlap="allow", cluster_pattern="kafka:*", task=template
    )
    s = Scheduler(
        nc,
        jsc,
        zk,
        status,
        ActionRegistry.installed(),
        schedules=[pattern, none],
        inventory=inventory,
        holder="x",
    )
    slot = await s.leader.acquire(s.holder)
    assert await s.tick(slot, now=_sec(0)) == 6  # slots -1 and 0, three clusters each

    tasks = await published(jsc)
    clusters = ["cassandra:a", "cassandra:b", "cassandra:c"]
    for n, when in enumerate((_sec(-1), _sec(0))):
        run = tasks[3 * n : 3 * n + 3]
        assert [t.cluster_name for _, t in run] == clusters
        assert [i for i, _ in run] == [slot_task_id("rep", when, c) for c in clusters]
        assert {slot_of(i, "rep") for i, _ in run} == {when}
        assert all(t.owner == "schedule:rep" and t.task_id == i for i, t in run)
    emitted = await audit.task_events(jsc, slot_task_id("rep", _sec(0), "cassandra:b"))
    assert [e.detail for e in emitted] == [f"schedule rep, slot {_sec(0).isoformat()}, cluster 2 of 3"]
    state, _ = await StateStore(zk).load("rep")
    assert state is not None
    assert state.run_ids == tuple(slot_task_id("rep", _sec(0), c) for c in clusters)
    nothing, _ = await StateStore(zk).load("none")
    assert nothing is not None
    assert nothing.skipped == 2
    assert "no known cluster matches 'kafka:*'" in nothing.last_skip
