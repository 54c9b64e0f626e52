"""One node's runner: pull a work item, take its leases, run the action's three steps, settle.

Usable without one process per node: a process may run many NodeWorkers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore import audit, bus, clusters, deadletter, logs, subjects, tracing
from taskcore.actions import Action, ActionContext, ActionRegistry
from taskcore.audit import Audit
from taskcore.clusters import Breaker
from taskcore.coordination import SlotSemaphore, ZkSession
from taskcore.errors import InvalidTask, LeaseLost, LeaseWaitTimeout
from taskcore.leases import Lease, LeaseSet, SemaphoreLease, SharedLease, SharedSlots
from taskcore.metrics import Instruments
from taskcore.model import DeadLetter, NodeRecord, WorkItem, decode_work_item
from taskcore.registry import Registration
from taskcore.settings import Settings
from taskcore.tracking import StatusStore, StopRecord
from taskerman_runner import policy
from taskerman_runner.config import ActionOverride

log = logging.getLogger(__name__)
RELEASE_DELAY = 2.0  # a lost lease or a long wait: the item goes back after this delay
GUARD_INTERVAL = 0.2
STOP_POLL = 3.0  # how often a waiting item looks whether its task was stopped


def lease_path(task_id: str) -> str:
    return f"/leases/tasks/{subjects.encode_token(task_id)}"


def _version() -> str:
    try:
        return version("taskerman")
    except PackageNotFoundError:
        return "unknown"


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
        overrides: Mapping[str, ActionOverride] | None = None,
    ) -> None:
        self.js = js
        self.status = status
        self.zk = zk
        self.registry = registry
        self.settings = settings
        self.cluster = cluster
        self.node = node
        self.packs = packs or {}
        self.overrides = overrides or {}
        self.failures = 0
        self.breaker = Breaker(zk, cluster, clusters.breaker_policy(settings))
        self.registration = Registration(zk, cluster, node, _version(), registry.names())
        self.audit = Audit(js, audit.actor(f"runner:{node}"))
        self.metrics = Instruments()
        self._sub: JetStreamContext.PullSubscription | None = None
        self._tracer = tracing.tracer(__name__)

    async def start(self) -> None:
        """Create this node's durable consumer, bind to it and register in ZooKeeper."""
        durable = await bus.ensure_runner_consumer(self.js, self.settings, self.cluster, self.node)
        self._sub = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
        await self.registration.register()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and handle items until `stop` is set; the item in hand is finished first."""
        heartbeat = asyncio.create_task(self.registration.heartbeat(stop))
        try:
            while not stop.is_set():
                for msg in await self._fetch(wait=1.0):
                    await self.handle(msg)
        finally:
            heartbeat.cancel()

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
        with (
            logs.task_context(item.task.task_id, self.node),
            self._tracer.start_as_current_span(
                f"run {item.task.action}",
                context=tracing.extract_context(dict(msg.headers or {})),
                attributes={"task_id": item.task.task_id, "node": self.node, "deliveries": deliveries},
            ),
        ):
            await self._run_item(msg, item, action_cls, args)

    def leases_for(self, item: WorkItem, action_cls: type[Action], budget: int | None) -> LeaseSet:
        """The leases a node needs, in the one global order: global lease, exclusion groups (sorted),
        the cluster's disruption budget, the task's own m-of-n slot."""
        task, zk, holder = item.task, self.zk, self.node
        override = self.overrides.get(task.action, ActionOverride())
        groups = (
            override.exclusion_groups
            if override.exclusion_groups is not None
            else action_cls.exclusion_groups
        )
        global_limit = override.global_limit if override.global_limit is not None else action_cls.global_limit
        leases: list[Lease] = []
        if global_limit:
            path = f"/global/{subjects.encode_token(task.action)}"
            slots = SharedSlots(zk, path, global_limit)
            leases.append(SharedLease(f"global:{task.action}", slots, owner=self.cluster, holder=holder))
        for group in sorted(set(groups)):
            path = clusters.cluster_path(self.cluster, "exclusion", subjects.encode_token(group))
            leases.append(SharedLease(f"exclusion:{group}", SharedSlots(zk, path, 1), task.task_id, holder))
        if budget:
            sem = SlotSemaphore(zk, clusters.cluster_path(self.cluster, "budget"), budget)
            leases.append(SemaphoreLease("budget", sem, holder))
        leases.append(SemaphoreLease("task", SlotSemaphore(zk, lease_path(task.task_id), task.limit), holder))
        return LeaseSet(leases)

    async def _take_leases(self, item: WorkItem, action_cls: type[Action]) -> LeaseSet | None:
        """Wait for a closed breaker and every lease (on watches, keeping the item claimed); a
        breaker that opened meanwhile sends us back to waiting. Every few seconds the wait looks
        whether the task was stopped (then None). LeaseWaitTimeout past the upper bound."""
        deadline = time.monotonic() + self.settings.lease_wait
        while True:
            if await self.status.stopped(item.task.task_id):
                return None
            round_end = min(deadline, time.monotonic() + STOP_POLL)
            try:
                await self.breaker.wait_closed(round_end - time.monotonic())
                budget = (await clusters.read_config(self.zk, self.cluster)).budget
                leases = self.leases_for(item, action_cls, budget)
                await leases.acquire(round_end)
            except TimeoutError as e:
                if time.monotonic() >= deadline:
                    raise LeaseWaitTimeout(str(e)) from e
                continue
            if await self.breaker.state() != "open":
                return leases
            await leases.release()

    async def _run_item(self, msg: Msg, item: WorkItem, action_cls: type[Action], args: Any) -> None:
        task = item.task
        rec = await self.status.get_node(task.task_id, self.node) or NodeRecord()
        if rec.failures > task.retry_count:  # settled as failed before, but the ack was lost
            await self._dead(msg, item, rec, rec.error or "attempt budget exhausted")
            return
        if rec.state == "running":  # the previous delivery never settled: its runner died or lost the ack
            await self._audit(
                "attempt-lost", task.task_id, f"attempt {rec.attempts} did not finish; not counted"
            )
        if await self._retired(msg, item):
            return
        keepalive = asyncio.create_task(self._keep_claim(msg))
        leases: LeaseSet | None = None
        step = "lease wait"
        try:
            with self._tracer.start_as_current_span("lease wait"):
                leases = await self._take_leases(item, action_cls)
            if leases is None or await self._retired(msg, item):
                if leases is None:  # stopped while we waited
                    await self._retired(msg, item)
                return
            await self._audit("lease-acquired", task.task_id, _lease_detail(leases))
            labels = {"cluster": self.cluster, "action": task.action}
            self.metrics.lease_wait.record(sum(leases.waited.values()), labels)
            self.metrics.executed.add(1, labels)
            began = time.monotonic()
            now = time.time()
            rec = await self.status.update_node(
                task.task_id,
                self.node,
                state="running",
                attempts=rec.attempts + 1,
                started_at=now,
                finished_at=None,
                first_attempt_at=rec.first_attempt_at or now,
                token=leases.tokens()["task"],
            )
            ctx = ActionContext(
                task=task,
                cluster=self.cluster,
                node=self.node,
                args=args,
                token=leases.tokens()["task"],
                attempt=rec.attempts,
                pack_config=self.packs.get(task.action.split(":", 1)[0], {}),
                tokens=leases.tokens(),
                checkpoint=self.zk.check,
            )
            action = action_cls()
            for step_fn in (action.pre_check, action.execute_action, action.post_check):
                step = step_fn.__name__
                await leases.verify()
                with self._tracer.start_as_current_span(step):
                    await self._guarded(step_fn(ctx), ctx)
                await self._audit(f"{step}-passed", task.task_id)
        except (LeaseLost, LeaseWaitTimeout) as e:
            log.warning("released back task_id=%s node=%s step=%s error=%s", task.task_id, self.node, step, e)
            await self._settle(msg.nak(delay=RELEASE_DELAY))
            state = "retrying" if isinstance(e, LeaseLost) else "pending"
            reason = f"{type(e).__name__}: {e}"
            await self.status.update_node(task.task_id, self.node, state=state, error=reason)
            await self._audit("released", task.task_id, f"at {step}: {reason}; not counted as a failure")
            return
        except asyncio.CancelledError:
            await self._settle(msg.nak())
            raise
        except Exception as e:
            await self._failed(msg, item, rec, step, f"{type(e).__name__}: {e}", leases=leases)
            return
        finally:
            keepalive.cancel()
            if leases is not None:
                await asyncio.shield(leases.release())
        self.metrics.succeeded.add(1, labels)
        self.metrics.action_duration.record(time.monotonic() - began, labels)
        self.metrics.end_to_end.record(max(time.time() - item.routed_at, 0.0), labels)
        await self._count(task.action, failed=False, leases=leases)
        await self.breaker.record_success()
        await self.status.update_node(
            task.task_id, self.node, state="succeeded", finished_at=time.time(), error=None
        )
        with self._tracer.start_as_current_span("ack"):
            await self._settle(msg.ack_sync())
        await self._audit("succeeded", task.task_id, f"attempt {rec.attempts}")
        log.info("succeeded task_id=%s node=%s attempt=%d", task.task_id, self.node, rec.attempts)

    async def _retired(self, msg: Msg, item: WorkItem) -> bool:
        """A stopped task's item that has not started is retired: acked and recorded as skipped
        (or cancelled). Nodes already running finish on their own."""
        stop = await self.status.stopped(item.task.task_id)
        if stop is None:
            return False
        state = "cancelled" if stop.reason == "cancelled" else "skipped"
        await self.status.update_node(
            item.task.task_id,
            self.node,
            state=state,
            finished_at=time.time(),
            error=f"task stopped: {stop.reason}",
        )
        await self._settle(msg.ack_sync())
        await self._audit(state, item.task.task_id, f"task stopped: {stop.reason} {stop.detail}".strip())
        return True

    async def _guarded(self, step: Awaitable[None], ctx: ActionContext) -> None:
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
                    raise LeaseLost("zookeeper session untrusted while the action ran")
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

    async def _count(self, action: str, failed: bool, leases: LeaseSet | None) -> None:
        waited = sum(leases.waited.values()) if leases else 0.0
        try:
            await clusters.count(self.zk, self.cluster, action, failed=failed, lease_wait_s=waited)
        except Exception as e:  # statistics never decide the outcome of an item
            log.warning("counters not updated cluster=%s error=%r", self.cluster, e)

    async def _failed(
        self, msg: Msg, item: WorkItem, rec: NodeRecord, step: str, reason: str, *, leases: LeaseSet | None
    ) -> None:
        """An attempt failed: count it, feed the breaker, then retry with backoff or dead-letter.
        A post_check failure is different: the cluster may be on fire, so the breaker trips, the
        node is dead-lettered at once and the whole task stops."""
        task = item.task
        self.failures += 1
        failures = rec.failures + 1
        on_fire = step == "post_check"
        log.warning(
            "failed task_id=%s node=%s step=%s attempt=%d error=%s",
            task.task_id,
            self.node,
            step,
            rec.attempts,
            reason,
        )
        await self._audit(f"{step}-failed", task.task_id, reason)
        self.metrics.failed.add(1, {"cluster": self.cluster, "action": task.action, "step": step})
        await self._count(task.action, failed=True, leases=leases)
        await self.breaker.record_failure(f"{task.task_id} on {self.node}: {reason}", trip=on_fire)
        rec = await self.status.update_node(task.task_id, self.node, failures=failures, error=reason)
        if on_fire or policy.after_failure(failures, task.retry_count) == "dead":
            await self._dead(msg, item, rec, reason)
            await self._node_failed(item, reason if on_fire else "")
            return
        await self.status.update_node(task.task_id, self.node, state="retrying")
        delay = policy.retry_delay(task.taskerman_params.workqueue_args, failures)
        self.metrics.retried.add(1, {"cluster": self.cluster, "action": task.action})
        with self._tracer.start_as_current_span("retry", attributes={"delay_s": delay, "failures": failures}):
            await self._settle(msg.nak(delay=delay))
        await self._audit(
            "retried", task.task_id, f"failure {failures} of {task.retry_count + 1}, in {delay:g}s"
        )

    async def _node_failed(self, item: WorkItem, post_check_reason: str) -> None:
        """Count a failed node against the task's max_failures; stop the task past it (or at once
        after a post_check failure)."""
        task = item.task
        failed = await self.status.add_failure(task.task_id)
        allowed = task.taskerman_params.max_failures
        if post_check_reason:
            reason, detail = "post_check", f"post_check failed on {self.node}: {post_check_reason}"
        elif failed > allowed:
            reason, detail = "failures", f"{failed} failed node(s), max_failures {allowed}"
        else:
            return
        stop = StopRecord(reason=reason, detail=detail, by=self.audit.by, at=time.time())
        if await self.status.stop(task.task_id, stop):
            await self._audit("stopped", task.task_id, detail)

    async def _dead(self, msg: Msg, item: WorkItem, rec: NodeRecord, reason: str) -> None:
        await self._dead_letter(msg, item.task.task_id, reason, rec)
        await self.status.update_node(
            item.task.task_id, self.node, state="dead", error=reason, finished_at=time.time()
        )
        await self._audit("dead-lettered", item.task.task_id, reason)
        self.metrics.dead.add(1, {"cluster": self.cluster, "action": item.task.action})
        log.warning(
            "dead-lettered task_id=%s node=%s attempts=%d", item.task.task_id, self.node, rec.attempts
        )

    async def _audit(self, kind: str, task_id: str, detail: str = "") -> None:
        await self.audit.record(kind, task_id=task_id, cluster=self.cluster, node=self.node, detail=detail)

    async def _poison(self, msg: Msg, deliveries: int, reason: str) -> None:
        """An item that can never run: dead-letter it at once, never spin through retries."""
        self.failures += 1
        await self._dead_letter(msg, _task_id_of(msg.data), reason, None)
        log.warning("poison item dead-lettered node=%s reason=%s", self.node, reason)

    async def _dead_letter(self, msg: Msg, task_id: str, reason: str, rec: NodeRecord | None) -> None:
        """Copy the item into the DLQ (its stream sequence is the message id), then ack it away."""
        letter = DeadLetter(
            task_id=task_id,
            cluster=self.cluster,
            node=self.node,
            reason=reason,
            deliveries=msg.metadata.num_delivered,
            payload=msg.data.decode(errors="replace"),
            trace_id=tracing.current_trace_id(),
            source_subject=msg.subject,
            first_attempt_at=rec.first_attempt_at if rec else None,
            last_attempt_at=rec.started_at if rec else None,
        )
        with self._tracer.start_as_current_span("dead-letter", attributes={"reason": reason}):
            await deadletter.send(self.js, letter, msg_id=f"{msg.metadata.sequence.stream}")
            await self._settle(msg.ack_sync())

    @staticmethod
    async def _settle(op: Awaitable[Any]) -> None:
        """Acks and naks must happen even while we are being cancelled."""
        await asyncio.shield(op)


def _lease_detail(leases: LeaseSet) -> str:
    tokens = leases.tokens()
    return ", ".join(
        f"{name} token {tokens[name]} after {waited:.2f}s" for name, waited in leases.waited.items()
    )


def _task_id_of(data: bytes) -> str:
    """Best-effort task id of an undecodable item, for the dead letter."""
    try:
        raw = msgspec.json.decode(data)
        return str(raw.get("task", {}).get("task_id", "")) if isinstance(raw, dict) else ""
    except msgspec.DecodeError:
        return ""
