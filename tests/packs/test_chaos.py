"""The `chaos` pack's steps against real processes: kill and pause what the node config names (by
pidfile or by exact name in /proc), resume whatever happens, and never a pid from the task."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskcore.core.actions import Action, ActionContext, node_config
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.core.model import Task
from taskcore.packs.chaos import KillArgs, KillProcess, PauseProcess, Target, state, target


class Victims:
    """`sleep 60` processes under a name of their own (a symlink to sleep), reaped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.name = f"tkm{secrets.token_hex(4)}"
        (tmp / self.name).symlink_to(_which("sleep"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(self.tmp / self.name), "60"])
        self.procs.append(proc)
        return proc

    def pidfile(self, proc: subprocess.Popen[bytes]) -> Path:
        path = self.tmp / f"{proc.pid}.pid"
        path.write_text(f"{proc.pid}\n")
        return path

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _which(program: str) -> str:
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        if os.access(path := os.path.join(d, program), os.X_OK):
            return path
    raise AssertionError(f"{program} not found")


@pytest.fixture
def victims(tmp_path: Path) -> Iterator[Victims]:
    v = Victims(tmp_path)
    yield v
    v.close()


def _ctx(cls: type[Action], processes: dict[str, Any], max_pause: float = 5, **args: Any) -> ActionContext:
    table = {"processes": processes, "max_pause": max_pause}
    config = node_config(cls, cls.name, table)
    parsed = msgspec.convert(args, cls.Args)
    cls.check_args(parsed, config)
    task = Task(action=cls.name, cluster_name="c", task_id="t")
    return ActionContext(
        task=task, cluster="c", node="n1", args=parsed, token=1, attempt=1, pack_config=table, config=config
    )


async def _run(action: Action, ctx: ActionContext) -> None:
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    await action.post_check(ctx)


def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=5)


async def test_kill_a_process_named_by_pidfile(victims: Victims) -> None:
    proc, bystander = victims.spawn(), victims.spawn()
    ctx = _ctx(KillProcess, {"cache": {"pidfile": str(victims.pidfile(proc))}}, process="cache")
    action = KillProcess()
    await _run(action, ctx)
    assert _wait_exit(proc) == -9
    assert [t.pid for t in action.killed] == [proc.pid]
    assert bystander.poll() is None  # the same program, not named: untouched


async def test_kill_by_exact_name_with_term(victims: Victims) -> None:
    proc = victims.spawn()
    await asyncio.sleep(0.1)  # exec'd under its name
    ctx = _ctx(KillProcess, {"cache": {"name": victims.name}}, process="cache", signal="TERM")
    await _run(KillProcess(), ctx)
    assert _wait_exit(proc) == -15


async def test_a_name_matching_several_processes_is_refused_unless_all(victims: Victims) -> None:
    procs = [victims.spawn(), victims.spawn()]
    await asyncio.sleep(0.1)
    with pytest.raises(ActionFailed, match=rf"2 processes are named '{victims.name}'.*set all = true"):
        await KillProcess().pre_check(_ctx(KillProcess, {"c": {"name": victims.name}}, process="c"))
    assert all(p.poll() is None for p in procs)
    await _run(KillProcess(), _ctx(KillProcess, {"c": {"name": victims.name, "all": True}}, process="c"))
    assert [_wait_exit(p) for p in procs] == [-9, -9]


async def test_nothing_to_kill_fails_pre_check(victims: Victims, tmp_path: Path) -> None:
    with pytest.raises(ActionFailed, match="no process named"):
        await KillProcess().pre_check(_ctx(KillProcess, {"c": {"name": victims.name}}, process="c"))
    gone = victims.spawn()
    pidfile = victims.pidfile(gone)
    gone.kill()
    gone.wait()
    with pytest.raises(ActionFailed, match="is not running"):
        await KillProcess().pre_check(_ctx(KillProcess, {"c": {"pidfile": str(pidfile)}}, process="c"))
    with pytest.raises(ActionFailed, match="cannot read a pid"):
        await KillProcess().pre_check(
            _ctx(KillProcess, {"c": {"pidfile": str(tmp_path / "none")}}, process="c")
        )


async def test_a_stale_pidfile_naming_another_program_is_refused(victims: Victims) -> None:
    proc = victims.spawn()
    await asyncio.sleep(0.1)
    ctx = _ctx(
        KillProcess, {"c": {"pidfile": str(victims.pidfile(proc)), "name": "redis-server"}}, process="c"
    )
    with pytest.raises(ActionFailed, match="is not 'redis-server': stale pidfile"):
        await KillProcess().pre_check(ctx)
    assert proc.poll() is None


async def test_pause_stops_then_resumes(victims: Victims) -> None:
    proc = victims.spawn()
    ctx = _ctx(PauseProcess, {"c": {"pidfile": str(victims.pidfile(proc))}}, process="c", seconds=0.8)
    action = PauseProcess()
    await action.pre_check(ctx)
    step = asyncio.create_task(action.execute_action(ctx))
    await asyncio.sleep(0.4)
    me = target(proc.pid)
    assert me is not None
    assert state(me) == "T"  # stopped
    await step
    assert state(me) in ("S", "R")
    await action.post_check(ctx)


async def test_a_cancelled_pause_still_resumes(victims: Victims) -> None:
    proc = victims.spawn()
    ctx = _ctx(PauseProcess, {"c": {"pidfile": str(victims.pidfile(proc))}}, process="c", seconds=5)
    step = asyncio.create_task(PauseProcess().execute_action(ctx))
    await asyncio.sleep(0.3)
    me = Target(pid=proc.pid, started=target(proc.pid).started)  # type: ignore[union-attr]
    assert state(me) == "T"
    ctx.cancelled.set()
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    assert state(me) in ("S", "R")


async def test_a_paused_process_is_not_paused_again(victims: Victims) -> None:
    proc = victims.spawn()
    os.kill(proc.pid, 19)  # SIGSTOP
    try:
        await asyncio.sleep(0.1)
        ctx = _ctx(PauseProcess, {"c": {"pidfile": str(victims.pidfile(proc))}}, process="c", seconds=1)
        with pytest.raises(ActionFailed, match="already stopped"):
            await PauseProcess().pre_check(ctx)
    finally:
        os.kill(proc.pid, 18)  # SIGCONT


# --- what a task may name -------------------------------------------------------------------------------


def test_only_processes_the_config_names() -> None:
    with pytest.raises(InvalidTask) as info:
        _ctx(KillProcess, {"cache": {"name": "redis-server"}}, process="sshd")
    assert info.value.field == "taskerman_params.action_args.process"
    assert "process 'sshd' is not in this node's [packs.chaos] config (allowed: cache)" in info.value.problem
    with pytest.raises(msgspec.ValidationError, match="unknown field `pid`"):
        msgspec.convert({"process": "cache", "pid": 1}, KillArgs)
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'STOP'"):
        msgspec.convert({"process": "cache", "signal": "STOP"}, KillArgs)


def test_pause_is_capped_by_the_node() -> None:
    with pytest.raises(InvalidTask) as info:
        _ctx(PauseProcess, {"c": {"name": "x"}}, max_pause=10, process="c", seconds=30)
    assert info.value.field == "taskerman_params.action_args.seconds"
    assert "30s is longer than this node allows ([packs.chaos] max_pause = 10)" in info.value.problem


@pytest.mark.parametrize(
    ("processes", "says"),
    [
        ({"c": {}}, "needs `pidfile` or `name`"),
        ({"c": {"pidfile": "run/x.pid"}}, "must be an absolute path"),
        ({"c": {"pid": 1}}, "unknown field `pid`"),
    ],
)
def test_process_config_is_checked(processes: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidTask, match=says):
        node_config(KillProcess, "chaos:kill-process", {"processes": processes})
