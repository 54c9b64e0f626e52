"""The `chaos` pack through real router and runner processes: it kills and pauses the processes
the node config names."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus.tracking import StatusStore
from taskcore.runtime import procs

from .conftest import Stack, publish_raw, wait_final
from .node_runners import node_config, runner, task, wait_for


def proc_state(pid: int) -> str:
    return procs.state(pid) or "gone"


async def test_chaos_kills_and_pauses_processes_the_config_names(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, tmp_path: Path
) -> None:
    victim = await asyncio.create_subprocess_exec("sleep", "60")
    frozen = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        for name, p in (("victim", victim), ("frozen", frozen)):
            (tmp_path / f"{name}.pid").write_text(f"{p.pid}\n")
        processes = {name: {"pidfile": str(tmp_path / f"{name}.pid")} for name in ("victim", "frozen")}
        stack.router()
        runner(stack, ["n1"], node_config(stack, "c1", {"chaos": {"processes": processes, "max_pause": 5}}))
        await publish_raw(js[1], task("kill", "chaos:kill-process", ["n1"], args={"process": "victim"}))
        assert (await wait_final(status, "kill", stack=stack)).state == "succeeded"
        assert await asyncio.wait_for(victim.wait(), 5) == -signal.SIGKILL
        assert frozen.returncode is None

        await publish_raw(
            js[1], task("pause", "chaos:pause-process", ["n1"], args={"process": "frozen", "seconds": 1.5})
        )

        async def stopped() -> bool:
            return proc_state(frozen.pid) == "T"

        await wait_for(stopped, within=20)
        assert (await wait_final(status, "pause", stack=stack)).state == "succeeded"
        assert proc_state(frozen.pid) in ("S", "R")  # resumed
        assert frozen.returncode is None

        too_long = {"process": "frozen", "seconds": 60}
        await publish_raw(js[1], task("too-long", "chaos:pause-process", ["n1"], args=too_long))
        assert (await wait_final(status, "too-long", stack=stack)).state == "dead"
        [letter] = [d for _, d in await deadletter.entries(js[1]) if d.task_id == "too-long"]
        assert "longer than this node allows ([packs.chaos] max_pause = 5)" in letter.reason
    finally:
        for p in (victim, frozen):
            if p.returncode is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            await p.wait()
