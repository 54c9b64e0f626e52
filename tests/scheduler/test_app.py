"""Real `taskerman-scheduler` processes: the submit API, leader failover under SIGKILL, SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core.subjects import SUBMIT_SUBJECT
from taskerman_scheduler.scheduler import LEADER_PATH
from tests.e2e.conftest import Stack

from .helpers import published, slot_of

SCHEDULES = """\
[[schedule]]
name = "tick"
cron = "* * * * * *"
overlap = "allow"
catchup = "20s"
[schedule.task]
action = "test:sleep"
cluster_name = "c1"
nodes = ["n1"]

[[schedule]]
name = "tick-nocatch"
cron = "* * * * * *"
overlap = "allow"
[schedule.task]
action = "test:sleep"
cluster_name = "c1"
nodes = ["n1"]
"""


async def _request(nc: NATS, body: bytes, within: float = 30) -> dict[str, object]:
    """The submit API's reply, waiting (generously) for a replica to be listening."""
    deadline = time.monotonic() + within
    while True:
        try:
            msg = await nc.request(SUBMIT_SUBJECT, body, timeout=5)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        reply: dict[str, object] = msgspec.json.decode(msg.data)
        return reply


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float, stack: Stack) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within}s\n{stack.logs()}")
        await asyncio.sleep(0.2)


def _exits_on_sigterm(proc: subprocess.Popen[bytes], within: float = 5) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(within)  # raises TimeoutExpired when it hangs


async def test_submit_api(stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore) -> None:
    nc, jsc = js
    proc = stack.spawn("taskerman-scheduler")  # no schedule file: it still serves submissions
    ok = await _request(nc, b'{"action": "test:sleep", "cluster_name": "c1", "limit": 2}')
    assert set(ok) == {"task_id"}, ok
    generated = str(ok["task_id"])
    given = await _request(nc, b'{"action": "test:sleep", "cluster_name": "c1", "task_id": "mine-1"}')
    assert given == {"task_id": "mine-1"}
    duplicate = await _request(nc, b'{"action": "test:sleep", "cluster_name": "c1", "task_id": "mine-1"}')
    assert duplicate == {"task_id": "mine-1", "duplicate": True}
    taken = await _request(nc, b'{"action": "test:sleep", "cluster_name": "c2", "task_id": "mine-1"}')
    assert taken["field"] == "task_id", taken  # the id of another task: refused, not a duplicate
    assert "is already another task's" in str(taken["error"])

    bad = {
        b'{"action": "test:sleep", "cluster_name": "c1", "limit": 0}': "limit",
        b'{"action": "test:sleep"}': "cluster_name",
        b'{"action": "test:sleep", "cluster_name": "c1", "colour": "red"}': "colour",
        b'{"action": "nope:never", "cluster_name": "c1"}': "action",
        b'{"action": "test:sleep", "cluster_name": "c1", "version": "2.0"}': "version",
        b'{"action": "test:sleep", "cluster_name": "c1", "taskerman_params": {"action_args": {"x": 1}}}': (
            "taskerman_params.action_args"
        ),
    }
    for body, field in bad.items():
        reply = await _request(nc, body)
        assert reply.get("field") == field, (body, reply)
        assert field in str(reply["error"]), reply
        assert "task_id" not in reply
    garbage = await _request(nc, b"{not json")
    assert "not valid JSON" in str(garbage["error"])

    assert [msg_id for msg_id, _ in await published(jsc)] == [generated, "mine-1"]
    record = await status.get_task("mine-1")
    assert record is not None
    assert record.task is not None
    assert (record.state, record.task.cluster_name) == ("pending", "c1")  # the duplicate changed nothing
    started = time.monotonic()
    assert _exits_on_sigterm(proc) == 0, stack.logs()
    assert time.monotonic() - started < 5


async def test_invalid_schedule_file_exits_2(stack: Stack) -> None:
    path = stack.tmp / "bad.toml"
    path.write_text(SCHEDULES.replace('cron = "* * * * * *"', 'cron = "61 * * * *"', 1))
    proc = stack.spawn("taskerman-scheduler", "--schedules", str(path))
    assert proc.wait(60) == 2
    log = (stack.tmp / "taskerman-scheduler.log").read_text()
    assert "schedule[0] 'tick' (line 1): cron:" in log


async def test_one_leader_emits_each_slot_once_across_a_sigkill(
    stack: Stack, js: tuple[NATS, JetStreamContext], zk: ZkSession
) -> None:
    jsc = js[1]
    path = stack.tmp / "schedules.toml"
    path.write_text(SCHEDULES)
    procs = {p.pid: p for p in (stack.spawn("taskerman-scheduler", "--schedules", str(path)) for _ in "ab")}
    leader_lock = FairSemaphore(zk, LEADER_PATH, 1)

    async def slots(name: str) -> list[datetime]:
        return sorted(s for i, _ in await published(jsc) if (s := slot_of(i, name)))

    async def started() -> bool:
        return bool(await slots("tick"))

    await _until(started, "a first slot emitted", 45, stack)
    first = (await slots("tick"))[-1]

    async def led_a_while() -> bool:
        return (await slots("tick"))[-1] >= first + timedelta(seconds=2)

    await _until(led_a_while, "the leader emitting for 2 s", 30, stack)
    (holder,) = await leader_lock.holder_ids()
    leader_pid = int(holder.split("#")[0].rsplit(":", 1)[1])
    procs[leader_pid].kill()
    procs[leader_pid].wait()
    killed_at = datetime.now(UTC)

    async def survivor_emits() -> bool:
        emitted = await slots("tick")
        return emitted[-1] >= killed_at + timedelta(seconds=3)

    await _until(survivor_emits, "a slot emitted by the new leader", 45, stack)
    (survivor,) = (p for pid, p in procs.items() if pid != leader_pid)
    assert _exits_on_sigterm(survivor) == 0, stack.logs()

    logs = (stack.tmp / "taskerman-scheduler.log").read_text()
    emitted_by = Counter(re.findall(r"\[(\d+)\] \S+: emitted schedule=tick ", logs))
    assert set(emitted_by) == set(map(str, procs)), emitted_by  # both led, one after the other
    resent = re.findall(r"emitted schedule=\S+ slot=\S+ task_id=(\S+) duplicate=True", logs)
    assert len(resent) <= 2, resent  # only a slot in flight at the kill may be sent again

    ids = [msg_id for msg_id, _ in await published(jsc)]
    assert max(Counter(ids).values()) == 1
    tick = await slots("tick")
    expected = [tick[0] + timedelta(seconds=n) for n in range(int((tick[-1] - tick[0]).total_seconds()) + 1)]
    assert tick == expected, "with catch-up, every slot from the first to the last exactly once"
    nocatch = await slots("tick-nocatch")
    assert nocatch == sorted(set(nocatch))
    gaps = [b - a for a, b in itertools.pairwise(nocatch)]
    assert max(gaps) <= timedelta(seconds=stack.settings.zk_session_timeout + 3), gaps


PATTERN = """\
[[schedule]]
name = "rep"
cron = "* * * * * *"
overlap = "allow"
cluster_pattern = "cassandra:*"
[schedule.task]
action = "test:sleep"
"""


async def test_pattern_schedule_over_an_inventory_and_a_broken_reload(
    stack: Stack, js: tuple[NATS, JetStreamContext]
) -> None:
    jsc = js[1]
    clusters = ["cassandra:a", "cassandra:b", "cassandra:c"]
    inventory = stack.inventory({**{c: ["n1"] for c in clusters}, "redis:x": ["n1"]})
    path = stack.tmp / "schedules.toml"
    path.write_text(PATTERN)
    proc = stack.spawn("taskerman-scheduler", "--schedules", str(path), "--inventory", str(inventory))
    log_path = stack.tmp / "taskerman-scheduler.log"

    async def runs(name: str) -> dict[datetime, list[str]]:
        """Task clusters per slot, the newest slot left out (its run may be going out now)."""
        out: dict[datetime, list[str]] = {}
        for msg_id, task in await published(jsc):
            if (when := slot_of(msg_id, name)) is not None:
                out.setdefault(when, []).append(task.cluster_name)
        return {w: c for w, c in out.items() if w != max(out)}

    async def two_runs() -> bool:
        return len(await runs("rep")) >= 2

    await _until(two_runs, "two runs of the pattern schedule", 45, stack)
    for when, run in (await runs("rep")).items():
        assert run == clusters, (when, run)  # one task per matching cluster, per slot

    path.write_text(PATTERN.replace('cron = "* * * * * *"', 'cron = "61 * * * *"'))

    async def rejected() -> bool:
        return "schedule file reload rejected" in log_path.read_text()

    await _until(rejected, "the broken reload logged", 20, stack)
    assert "schedule[0] 'rep' (line 1): cron:" in log_path.read_text()
    broken_at = datetime.now(UTC)

    async def still_runs() -> bool:
        return max(await runs("rep")) > broken_at + timedelta(seconds=1)

    await _until(still_runs, "the last good schedule running on", 20, stack)
    assert proc.poll() is None

    path.write_text(PATTERN.replace('"rep"', '"rep2"'))

    async def reloaded() -> bool:
        return bool(await runs("rep2"))

    await _until(reloaded, "the fixed file's schedule running", 20, stack)
    assert "schedules reloaded count=1 added=['rep2'] removed=['rep']" in log_path.read_text()
    assert _exits_on_sigterm(proc) == 0, stack.logs()
