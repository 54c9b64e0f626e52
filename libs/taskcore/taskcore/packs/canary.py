"""`taskerman:ping`, the action of the heartbeat canary task."""

from __future__ import annotations

from taskcore.core.actions import Action, ActionContext


class Ping(Action):
    """`taskerman:ping`, the heartbeat canary's action: it does nothing, fast, so that a task crossing
    the whole pipeline (scheduler, router, a runner's leases and steps) measures the pipeline and not
    the work. Its checks are trivial: each step only confirms that the runner can still vouch for its
    leases (a runner with an untrusted ZooKeeper session fails the ping, as it should)."""

    name = "taskerman:ping"
    version = "1.0"

    async def pre_check(self, ctx: ActionContext) -> None:
        ctx.checkpoint()

    async def execute_action(self, ctx: ActionContext) -> None:
        ctx.checkpoint()

    async def post_check(self, ctx: ActionContext) -> None:
        ctx.checkpoint()
