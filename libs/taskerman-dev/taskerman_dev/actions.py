"""Test actions for the machinery: `test:sleep` (with failures on chosen nodes), `test:backup` and
`test:repair` (in the `io` exclusion group). The witness file records what acted, independently."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Annotated

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed
from taskcore.core.limits import MAX_NAME_CHARS, MAX_NODES, MAX_SLEEP_SECONDS
from taskcore.packs import common

WITNESS_ENV = "TASKERMAN_WITNESS_FILE"
PASSED_ENV = "TASKERMAN_WITNESS_PASSED_FILE"  # passed post_checks, for the chaos checker
CHECKPOINT_EVERY = 0.05


def witness(event: dict[str, object], env: str = WITNESS_ENV) -> None:
    """Append one line to the witness file, if one is configured: an independent record of what acted."""
    path = os.environ.get(env)
    if not path:
        return
    line = json.dumps(event, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write of a short line under O_APPEND: atomic on Linux
    finally:
        os.close(fd)


NodeNames = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]], msgspec.Meta(max_length=MAX_NODES)
]


class SleepArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`seconds` from 0 to MAX_SLEEP_SECONDS (an hour): no negative or absurd sleeps."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=MAX_SLEEP_SECONDS)] = 1.0
    fail: bool = False
    fail_nodes: NodeNames = []
    fail_attempts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0  # the first k attempts fail (on fail_nodes)
    post_check_fail_nodes: NodeNames = []
    post_check_seconds: Annotated[float, msgspec.Meta(ge=0, le=MAX_SLEEP_SECONDS)] = 0.0
    in_thread: bool = False  # sleep in a thread, which no cancellation stops (packs.common.in_thread)


class TestSleep(Action):
    """Sleeps; raises when `fail` is true or this node is in `fail_nodes` (with `fail_attempts`,
    only its first that many attempts: a node that recovers on a retry); its post_check fails on
    `post_check_fail_nodes`. Records its interval in the witness file. The node's operator may set
    `[packs.test] fail_marker = "/path"`: while that file exists the action fails (a fault that an
    operator can fix, for replay drills)."""

    name = "test:sleep"
    version = "1.0"
    Args = SleepArgs

    async def execute_action(self, ctx: ActionContext) -> None:
        """Sleep in short steps, checkpointing before each; the interval it records ends at the last
        moment it could vouch for its lease, so a paused runner's record stays honest."""
        args: SleepArgs = ctx.args
        told = args.fail or (
            ctx.node in args.fail_nodes and ctx.attempt <= (args.fail_attempts or ctx.attempt)
        )
        marker = ctx.pack_config.get("fail_marker")
        marked = isinstance(marker, str) and await asyncio.to_thread(os.path.exists, marker)
        start = time.time()

        def record(end: float) -> None:
            witness(
                {
                    "task_id": ctx.task.task_id,
                    "cluster": ctx.cluster,
                    "node": ctx.node,
                    "start": start,
                    "end": end,
                    "token": ctx.token,
                    "tokens": dict(ctx.tokens),
                    "attempt": ctx.attempt,
                    "pid": os.getpid(),
                    "failed": told or marked,  # the node is left broken: it is down until it retries
                }
            )

        def in_thread() -> None:
            time.sleep(args.seconds)
            record(time.time())

        if args.in_thread:  # the thread records its own end: no cancellation stops it
            ctx.checkpoint()
            await common.in_thread(in_thread)
        else:
            end = start
            try:
                ctx.checkpoint()
                while (left := start + args.seconds - time.time()) > 0:
                    await asyncio.sleep(min(left, CHECKPOINT_EVERY))
                    ctx.checkpoint()
                    end = time.time()
            finally:
                record(end)
        if told:
            raise ActionFailed("execute_action", f"test:sleep told to fail on {ctx.node}")
        if marked:
            raise ActionFailed("execute_action", f"fault marker {marker} is present on {ctx.node}")

    async def post_check(self, ctx: ActionContext) -> None:
        args: SleepArgs = ctx.args
        await asyncio.sleep(args.post_check_seconds)
        if ctx.node in args.post_check_fail_nodes:
            raise ActionFailed("post_check", f"cluster unhealthy after {ctx.node} (told to fail)")
        witness({"task_id": ctx.task.task_id, "node": ctx.node, "at": time.time()}, PASSED_ENV)


class TestBackup(TestSleep):
    """`test:sleep` in the `io` exclusion group, standing in for a backup."""

    name = "test:backup"
    exclusion_groups = ("io",)


class TestRepair(TestSleep):
    """`test:sleep` in the `io` exclusion group, standing in for a repair."""

    name = "test:repair"
    exclusion_groups = ("io",)
