"""Runner processes for the e2e tests of packs and runner modes: node config files with pack
settings, spawning runners, task payloads, polling, and a task audit trail by kind."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from taskcore.bus import audit

from .conftest import Stack, task_json


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def node_config(stack: Stack, cluster: str, packs: dict[str, dict[str, Any]], **top: Any) -> Path:
    """A runner config file with nested pack settings (services, probes, processes)."""
    path = stack.tmp / f"node-{len(stack.procs)}.toml"
    lines = [f"cluster = {json.dumps(cluster)}"] + [f"{k} = {_toml(v)}" for k, v in top.items()]
    for pack, table in packs.items():
        lines.append(f"[packs.{pack}]")
        lines += [f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def runner(stack: Stack, nodes: list[str], conf: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = ["--config", str(conf)]
    for n in nodes:
        args += ["--node", n]
    return stack.spawn("taskerman-runner", *args, *extra)


def task(task_id: str, action: str, nodes: list[str], limit: int = 1, **params: Any) -> bytes:
    args = params.pop("args", {})
    return task_json(
        action=action,
        cluster_name="c1",
        nodes=nodes,
        limit=limit,
        task_id=task_id,
        taskerman_params={"action_args": args, **params},
    )


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def kinds(js: JetStreamContext, task_id: str, through: str | None = None) -> list[str]:
    """The kinds of the task's audit events; with `through`, once one of that kind is there (an
    event is published after the record it follows, so a reader of the record may be early)."""
    found: list[str] = []

    async def read() -> bool:
        nonlocal found
        found = [e.kind for e in await audit.task_events(js, task_id)]
        return through is None or through in found

    await wait_for(read, within=10)
    return found
