"""`taskerman schedules list|next|pause|resume|trigger` against a real `taskerman-scheduler` process."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.cli import main as cli
from taskcore.coord import schedule_control as control
from taskcore.coord.session import ZkSession
from tests.e2e.conftest import Stack
from tests.scheduler.helpers import published, slot_of

SCHEDULES = """\
[[schedule]]
name = "nightly"
cron = "0 3 * * *"
timezone = "Europe/Berlin"
jitter = "10m"
[schedule.task]
action = "test:sleep"
cluster_name = "c1"

[[schedule]]
name = "fast"
cron = "* * * * * *"
overlap = "allow"
[schedule.task]
action = "test:sleep"
cluster_name = "c1"
nodes = ["n1"]
"""


async def run(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Dispatch like `taskerman ARGV` does, in this process; (exit code, stdout, stderr)."""
    args = cli.build_parser().parse_args(list(argv))
    code = await args.command.exec(args, stack.settings)
    out, err = capsys.readouterr()
    return code, out, err


async def run_json(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = await run(stack, capsys, *argv, "--json")
    assert code == 0, err
    return msgspec.json.decode(out)


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float, stack: Stack) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within}s\n{stack.logs()}")
        await asyncio.sleep(0.2)


async def test_without_a_scheduler_the_commands_say_so(stack: Stack) -> None:
    res = await asyncio.to_thread(stack.cli, "schedules", "list", "--wait", "0.5")
    assert res.returncode == 1, res
    assert "no scheduler is leading" in res.stderr
    res = await asyncio.to_thread(stack.cli, "schedules", "trigger", "fast", "--wait", "0")
    assert res.returncode == 1, res


async def test_schedules_commands_against_a_real_scheduler(
    stack: Stack, js: tuple[NATS, JetStreamContext], zk: ZkSession, capsys: pytest.CaptureFixture[str]
) -> None:
    jsc = js[1]
    path = stack.tmp / "schedules.toml"
    path.write_text(SCHEDULES)
    proc = stack.spawn("taskerman-scheduler", "--schedules", str(path))

    listed = await run_json(stack, capsys, "schedules", "list", "--wait", "45")
    assert listed["leader"]
    by_name = {s["name"]: s for s in listed["schedules"]}
    assert list(by_name) == ["nightly", "fast"]
    assert (by_name["nightly"]["target"], by_name["nightly"]["jitter_s"]) == ("cluster 'c1'", 600.0)
    assert by_name["fast"]["paused"] is None

    nxt = await run_json(stack, capsys, "schedules", "next", "nightly", "-n", "3")
    (nightly,) = nxt["schedules"]
    slots = [msgspec.convert(n["slot"], datetime) for n in nightly["next"]]
    emits = [msgspec.convert(n["emit_at"], datetime) for n in nightly["next"]]
    berlin = [s.astimezone(ZoneInfo("Europe/Berlin")) for s in slots]
    assert [(b.hour, b.minute) for b in berlin] == [(3, 0)] * 3
    assert [b - a for a, b in itertools.pairwise(berlin)] == [timedelta(days=1)] * 2
    assert all(timedelta(0) <= e - s < timedelta(minutes=10) for s, e in zip(slots, emits, strict=True))
    assert nightly["next"][0]["task_id"] == f"sched-nightly-{slots[0].strftime('%Y%m%dT%H%M%S')}"

    code, out, _ = await run(stack, capsys, "schedules", "list")
    assert code == 0
    assert "nightly  [active]" in out
    assert "0 3 * * * (Europe/Berlin)" in out

    async def fast_slots() -> list[datetime]:
        return sorted(s for i, _ in await published(jsc) if (s := slot_of(i, "fast")))

    async def fast_runs() -> bool:
        return bool(await fast_slots())

    await _until(fast_runs, "the fast schedule running", 20, stack)

    code, out, _ = await run(stack, capsys, "schedules", "pause", "fast", "--reason", "drill")
    assert (code, out) == (
        0,
        "fast: paused; its slots are skipped (not caught up later) until it is resumed\n",
    )
    paused_at = datetime.now(UTC)
    flag = await control.read_pause(zk, "fast")
    assert flag is not None
    assert (flag.reason, flag.by.startswith("cli:")) == ("drill", True)
    code, out, _ = await run(stack, capsys, "schedules", "pause", "fast")
    assert (code, out.startswith("fast: already paused (PAUSED by cli:")) == (0, True)
    code, _, err = await run(stack, capsys, "schedules", "pause", "nope")
    assert code == 1
    assert "unknown schedule 'nope'" in err

    await asyncio.sleep(2.5)
    assert max(await fast_slots()) < paused_at + timedelta(seconds=1)  # a tick in flight at most
    (fast,) = (await run_json(stack, capsys, "schedules", "list", "fast"))["schedules"]
    assert fast["paused"]["reason"] == "drill"
    assert fast["skipped"] >= 2
    assert "paused by cli:" in fast["last_skip"]

    # A manual run goes out now, paused or not.
    triggered = await run_json(stack, capsys, "schedules", "trigger", "fast")
    (manual,) = triggered["task_ids"]
    assert manual.startswith("sched-fast-manual-")
    assert manual in [i for i, _ in await published(jsc)]
    code, _, err = await run(stack, capsys, "schedules", "trigger", "nope")
    assert code == 1
    assert "unknown schedule 'nope' (the leader runs: 'nightly', 'fast')" in err

    code, out, _ = await run(stack, capsys, "schedules", "resume", "fast")
    assert code == 0
    assert out.startswith("fast: resumed (was PAUSED by cli:")
    resumed_at = datetime.now(UTC)

    async def running_again() -> bool:
        return max(await fast_slots()) > resumed_at

    await _until(running_again, "the fast schedule running again", 20, stack)
    emitted = await fast_slots()
    gap = [s for s in emitted if paused_at + timedelta(seconds=1) < s < resumed_at - timedelta(seconds=1)]
    assert gap == []  # paused slots are not caught up
    assert await run(stack, capsys, "schedules", "resume", "fast") == (0, "fast: was not paused\n", "")
    proc.terminate()
    assert proc.wait(10) == 0
