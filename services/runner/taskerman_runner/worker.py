"""One node's runner: pull a work item, take the task's slot, run the action's three steps, settle.

Usable without one process per node: a process may run many NodeWorkers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore import bus, deadletter, subjects, tracing
from taskcore.actions import Action, ActionContext, ActionRegistry
from taskcore.coordination import Slot, SlotSemaphore, ZkSession
from taskcore.errors import InvalidTask, LeaseLost
from taskcore.model import DeadLetter, WorkItem, decode_work_item
from taskcore.settings import Settings
from taskcore.tracking import StatusStore
from taskerman_runner import policy

log = logging.getLogger(__name__)
LEASE_WAIT_MAX = 600.0
LEASE_LOST_DELAY = 2.0
GUARD_INTERVAL = 0.2


def lease_path(task_id: str) -> str:
    return f"/leases/tasks/{subjects.encode_token(task_id)}"


def registry_path(cluster: str, node: str) -> str:
    return f"/registry/{subjects.encode_token(cluster)}/{subjects.encode_token(node)}"


class NodeWorker:
    """Pulls and runs the work items of one node, one at a time."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        status: StatusStore,
        zk: ZkSession,
        registry: ActionRegistry,
        settings: Settings,
        cluster: str,
        node: str,
        packs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.js = js
        self.status = status
        self.zk = zk
        self.registry = registry
        self.settings = settings
        self.cluster = cluster
        self.node = node
        self.packs = packs or {}
        self.failures = 0
        self._sub: JetStreamContext.PullSubscription | None = None
        self._tracer = tracing.tracer(__name__)

    async def start(self) -> None:
        """Create this node's durable consumer, bind to it and register in ZooKeeper."""
        durable = await bus.ensure_runner_consumer(self.js, self.settings, self.cluster, self.node)
        self._sub = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
        await self._register()

    async def _register(self) -> None:
        path = registry_path(self.cluster, self.node)
        await self.zk.client.ensure_path(path.rsplit("/", 1)[0])
        data = msgspec.json.encode(
            {"cluster": self.cluster, "node": self.node, "pid": os.getpid(), "since": time.time()}
        )
        with contextlib.suppress(Exception):
            await self.zk.client.delete(path, force=True)  # a previous session's node, if any
        await self.zk.client.create(path, data=data, ephemeral=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and handle items until `stop` is set; the item in hand is finished first."""
        while not stop.is_set():
            for msg in await self._fetch(wait=1.0):
                await self.handle(msg)

    async def drain(self) -> int:
        """Handle what is waiting now, then return (cron mode); returns the number of failures."""
        while batch := await self._fetch(wait=1.0):
            for msg in batch:
                await self.handle(msg)
        return self.failures

    async def _fetch(self, wait: float) -> list[Msg]:
        assert self._sub is not None, "start() first"
        try:
            return await self._sub.fetch(1, timeout=wait)
        except TimeoutError:
            return []  # an empty queue is normal

    async def handle(self, msg: Msg) -> None:
        """Run one delivery of a work item to its end: ack, nak with backoff, or dead letter."""
        deliveries = msg.metadata.num_delivered
        try:
            item = decode_work_item(msg.data)
            action_cls, args = self.registry.resolve(item.task)
        except InvalidTask as e:
            await self._poison(msg, deliveries, f"invalid work item: {e}")
            return
        ctx_token = tracing.extract_context(dict(msg.headers or {}))
        with self._tracer.start_as_current_span(
            f"run {item.task.action}",
            context=ctx_token,
            attributes={"task_id": item.task.task_id, "node": self.node, "deliveries": deliveries},
        ):
            await self._run_item(msg, item, action_cls, args, deliveries)

    async def _run_item(
        self, msg: Msg, item: WorkItem, action_cls: type[Action], args: Any, deliveries: int
    ) -> None:
        task = item.task
        budget = policy.attempt_budget(task.retry_count)
        previous = await self.status.get_node(task.task_id, self.node)
        if deliveries > budget:  # the server redelivered past the budget (e.g. a crash in the last try)
            reason = (previous.error if previous else None) or "attempt budget exhausted"
            await self._dead(msg, item, reason, deliveries)
            return
        await self.status.update_node(task.task_id, self.node, attempts=deliveries, finished_at=None)
        keepalive = asyncio.create_task(self._keep_claim(msg))
        sem = SlotSemaphore(self.zk, lease_path(task.task_id), task.limit)
        slot: Slot | None = None
        try:
            with self._tracer.start_as_current_span("lease wait"):
                slot = await sem.acquire(self.node, max_wait=LEASE_WAIT_MAX)
            await self.status.update_node(  # started: the action's own interval, not the lease wait
                task.task_id, self.node, state="running", started_at=time.time(), token=slot.token
            )
            ctx = ActionContext(
                task=task,
                cluster=self.cluster,
                node=self.node,
                args=args,
                token=slot.token,
                attempt=deliveries,
                pack_config=self.packs.get(task.action.split(":", 1)[0], {}),
            )
            action = action_cls()
            for step in (action.pre_check, action.execute_action, action.post_check):
                await sem.verify(slot)
                with self._tracer.start_as_current_span(step.__name__):
                    await self._guarded(step(ctx), sem, slot, ctx)
        except LeaseLost as e:
            log.warning("lease lost task_id=%s node=%s error=%s", task.task_id, self.node, e)
            await self._settle(msg.nak(delay=LEASE_LOST_DELAY))
            await self.status.update_node(task.task_id, self.node, state="retrying", error=f"LeaseLost: {e}")
            return
        except TimeoutError as e:
            await self._settle(msg.nak(delay=LEASE_LOST_DELAY))
            await self.status.update_node(task.task_id, self.node, state="retrying", error=str(e))
            return
        except asyncio.CancelledError:
            await self._settle(msg.nak())
            raise
        except Exception as e:
            await self._failed(msg, item, f"{type(e).__name__}: {e}", deliveries)
            return
        finally:
            keepalive.cancel()
            if slot is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(sem.release(slot))
        await self.status.update_node(
            task.task_id, self.node, state="succeeded", finished_at=time.time(), error=None
        )
        await self._settle(msg.ack_sync())
        log.info("succeeded task_id=%s node=%s attempt=%d", task.task_id, self.node, deliveries)

    async def _guarded(
        self, step: Awaitable[None], sem: SlotSemaphore, slot: Slot, ctx: ActionContext
    ) -> None:
        """Run a step while watching the session; when it can no longer be trusted, tell the action
        to stop and cancel it."""
        work = asyncio.ensure_future(step)
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=GUARD_INTERVAL)
                if not work.done() and not self.zk.is_safe():
                    ctx.cancelled.set()
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    raise LeaseLost(f"zookeeper session untrusted while running, slot {slot.path}")
            work.result()
        finally:
            if not work.done():
                work.cancel()

    async def _keep_claim(self, msg: Msg) -> None:
        """In-progress acks while we hold the item, so the server does not redeliver it."""
        while True:
            await asyncio.sleep(self.settings.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _failed(self, msg: Msg, item: WorkItem, reason: str, deliveries: int) -> None:
        task = item.task
        self.failures += 1
        log.warning(
            "failed task_id=%s node=%s attempt=%d error=%s", task.task_id, self.node, deliveries, reason
        )
        if policy.after_failure(deliveries, task.retry_count) == "dead":
            await self._dead(msg, item, reason, deliveries)
            return
        await self.status.update_node(task.task_id, self.node, state="retrying", error=reason)
        delay = policy.backoff_delay(task.taskerman_params.workqueue_args.backoff, deliveries)
        await self._settle(msg.nak(delay=delay))

    async def _dead(self, msg: Msg, item: WorkItem, reason: str, deliveries: int) -> None:
        await self._dead_letter(msg, item.task.task_id, reason, deliveries)
        await self.status.update_node(
            item.task.task_id,
            self.node,
            state="dead",
            error=reason,
            attempts=deliveries,
            finished_at=time.time(),
        )
        log.warning(
            "dead-lettered task_id=%s node=%s deliveries=%d", item.task.task_id, self.node, deliveries
        )

    async def _poison(self, msg: Msg, deliveries: int, reason: str) -> None:
        """An item that can never run: dead-letter it at once, never spin through retries."""
        self.failures += 1
        await self._dead_letter(msg, _task_id_of(msg.data), reason, deliveries)
        log.warning("poison item dead-lettered node=%s reason=%s", self.node, reason)

    async def _dead_letter(self, msg: Msg, task_id: str, reason: str, deliveries: int) -> None:
        """Copy the item into the DLQ (its stream sequence is the message id), then ack it away."""
        letter = DeadLetter(
            task_id=task_id,
            cluster=self.cluster,
            node=self.node,
            reason=reason,
            deliveries=deliveries,
            payload=msg.data.decode(errors="replace"),
            trace_id=tracing.current_trace_id(),
            source_subject=msg.subject,
        )
        await deadletter.send(self.js, letter, msg_id=f"{msg.metadata.sequence.stream}")
        await self._settle(msg.ack_sync())

    @staticmethod
    async def _settle(op: Awaitable[Any]) -> None:
        """Acks and naks must happen even while we are being cancelled."""
        await asyncio.shield(op)


def _task_id_of(data: bytes) -> str:
    """Best-effort task id of an undecodable item, for the dead letter."""
    try:
        raw = msgspec.json.decode(data)
        return str(raw.get("task", {}).get("task_id", "")) if isinstance(raw, dict) else ""
    except msgspec.DecodeError:
        return ""
