"""The step guard: one step of an action runs while the guard watches the ZooKeeper session, the
step's timeout and the runner's shutdown grace, and cancels the step when one of them ends it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from taskcore.coord.session import ZkSession
from taskcore.core.actions import ActionContext
from taskcore.core.errors import ActionFailed, LeaseLost, TaskermanError
from taskerman_runner.config import DEFAULT_GRACE

log = logging.getLogger(__name__)
GUARD_INTERVAL = 0.2
CANCEL_WAIT = 5.0  # how often a cancelled step that goes on is logged


async def _until_ended(work: asyncio.Future[None], name: str, ctx: ActionContext) -> None:
    """Wait for a cancelled step to have really ended: the attempt's leases are held until then,
    so that a step that ignores its cancellation (work in a thread cannot be cancelled) never
    overlaps the next holder's. Logged every CANCEL_WAIT seconds while it goes on."""
    waited = 0.0
    while not work.done():
        await asyncio.wait({work}, timeout=CANCEL_WAIT)
        if not work.done():
            waited += CANCEL_WAIT
            log.error(
                "%s ignores its cancellation for %gs, its leases held until it ends task_id=%s node=%s",
                name,
                waited,
                ctx.task.task_id,
                ctx.node,
            )


class RunnerStopping(TaskermanError):
    """The runner is shutting down and the step outlived its grace: the attempt is released back
    (nak'd for redelivery, leases released), not counted as a failure."""


class StepGuard:
    """Guards the steps of one node's items. `acting` is the context of the item whose attempt has
    started (None while it waits for its leases); `abort` is set once the shutdown grace is over."""

    def __init__(self, zk: ZkSession) -> None:
        self.zk = zk
        self.grace = DEFAULT_GRACE
        self.abort = asyncio.Event()
        self.acting: ActionContext | None = None

    async def run(
        self,
        step: Coroutine[Any, Any, None],
        ctx: ActionContext,
        name: str = "step",
        time_limit: float | None = None,
    ) -> None:
        """Run a step while watching the session, the step's timeout and the runner's shutdown
        grace. When one of them ends it: set `ctx.cancelled`, cancel the step, and raise LeaseLost,
        ActionFailed ("timed out") or RunnerStopping."""
        self.acting = ctx
        if self.abort.is_set():
            step.close()
            raise RunnerStopping(f"the runner is stopping: {name} not started")
        loop = asyncio.get_running_loop()
        deadline = None if time_limit is None else loop.time() + time_limit
        work = asyncio.ensure_future(step)
        try:
            while not work.done():
                left = GUARD_INTERVAL if deadline is None else min(GUARD_INTERVAL, deadline - loop.time())
                await asyncio.wait({work}, timeout=max(left, 0.0))
                if work.done():
                    break
                error: Exception
                if not self.zk.is_safe():
                    error = LeaseLost("zookeeper session untrusted while the action ran")
                elif self.abort.is_set():
                    error = RunnerStopping(
                        f"the runner is stopping: {name} outlived the {self.grace:g}s grace"
                    )
                elif deadline is not None and loop.time() >= deadline:
                    error = ActionFailed(name, f"timed out after {time_limit:g}s")
                else:
                    continue
                ctx.cancelled.set()
                work.cancel()
                await _until_ended(work, name, ctx)
                if not work.cancelled():
                    work.exception()  # retrieved: what it raised while unwinding is beside the point
                raise error
            work.result()
        finally:
            if not work.done():
                work.cancel()
