"""One node's runner: pull a work item, take its leases, run the action's three steps, settle.

Usable without one process per node: a process may run many NodeWorkers. Shutdown is staged: stop
fetching, give a running action its grace to finish, then cancel it and hand the item back (nak'd,
not counted as a failure, leases released); an item still waiting for its leases goes back at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore.bus import audit, deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Audit
from taskcore.bus.tracking import StatusStore, StopRecord
from taskcore.coord import clusters
from taskcore.coord.clusters import Breaker
from taskcore.coord.leases import Lease, LeaseSet, SemaphoreLease, SharedLease, SharedSlots, lease_path
from taskcore.coord.runners import Registration
from taskcore.coord.session import SlotSemaphore, ZkSession
from taskcore.core import subjects
from taskcore.core.actions import Action, ActionContext, ActionRegistry
from taskcore.core.errors import ActionFailed, InvalidTask, LeaseLost, LeaseWaitTimeout, TaskermanError
from taskcore.core.model import DeadLetter, NodeRecord, WorkItem, decode_work_item
from taskcore.core.settings import Settings
from taskcore.obs import logs, tracing
from taskcore.obs.metrics import Instruments
from taskerman_runner import policy
from taskerman_runner.config import DEFAULT_GRACE, ActionOverride

log = logging.getLogger(__name__)
RELEASE_DELAY = 2.0  # a lost lease or a long wait: the item goes back after this delay
GUARD_INTERVAL = 0.2
STOP_POLL = 3.0  # how often a waiting item looks whether its task was stopped
ABORT_WAIT = 5.0  # after the grace: how long the cancelled action's release may take before we cancel it all
CANCEL_WAIT = 5.0  # how long a cancelled step may take to unwind
DRAIN_WAIT = 1.0  # cron mode: nothing arrives for this long, so nothing more is due
DRAIN_RERUNS = 2  # cron mode: runs again of an item released back (not failed) in the same drain
Outcome = Literal["ok", "failed", "released"]


class RunnerStopping(TaskermanError):
    """The runner is shutting down and the step outlived its grace: the attempt is released back
    (nak'd for redelivery, leases released), not counted as a failure."""


# Ends of an attempt that are not the action's failure: the item goes back, nothing is counted.
RELEASED_BACK: tuple[type[Exception], ...] = (LeaseLost, LeaseWaitTimeout, RunnerStopping, *bus.UNAVAILABLE)


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
        self._grace = DEFAULT_GRACE
        self._abort = asyncio.Event()  # set once the grace is over: the running step is cancelled
        self._acting: ActionContext | None = None  # the item in hand has started its steps

    async def start(self) -> None:
        """Create this node's durable consumer, bind to it and register in ZooKeeper."""
        durable = await bus.ensure_runner_consumer(self.js, self.settings, self.cluster, self.node)
        self._sub = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
        await self.registration.register()

    async def run(self, stop: asyncio.Event, grace: float = DEFAULT_GRACE) -> None:
        """Fetch and handle items until `stop` is set; the action in hand gets `grace` seconds to
        finish, then it is cancelled and its item handed back."""
        self._grace = grace
        heartbeat = asyncio.create_task(self.registration.heartbeat(stop))
        try:
            while not stop.is_set():
                for msg in await self._fetch(wait=1.0):
                    try:
                        await self._handle_until(stop, msg)
                    except bus.UNAVAILABLE as e:  # not settled: it comes back after ack_wait
                        log.warning("nats unavailable, item comes back node=%s error=%r", self.node, e)
        finally:
            heartbeat.cancel()

    async def drain(self, stop: asyncio.Event | None = None, grace: float = DEFAULT_GRACE) -> int:
        """Cron mode: handle what is due for this node now, then return how many of the items it
        handled did not succeed (0: every one did).

        An item that fails is nak'd with its backoff and left to the next run, which takes its
        retry: the drain never sleeps through a backoff, so a delayed nak cannot make it hang. An
        item released back without a failure (its leases took too long, its session was lost)
        returns after RELEASE_DELAY; the drain waits for it and runs it again (up to DRAIN_RERUNS
        times), and it counts as not done until it succeeds, so a run cannot end early with 0.
        `stop` (SIGTERM) works as in `run`."""
        stop = stop or asyncio.Event()
        self._grace = grace
        outcomes: dict[int, Outcome] = {}
        reruns: dict[int, int] = {}
        expect_until = 0.0  # a released item should be back by then
        while not stop.is_set():
            batch = await self._fetch(wait=DRAIN_WAIT)
            if not batch:
                if time.monotonic() < expect_until and any(
                    o == "released" and reruns.get(seq, 0) < DRAIN_RERUNS for seq, o in outcomes.items()
                ):
                    continue
                break
            for msg in batch:
                seq = msg.metadata.sequence.stream
                if outcomes.get(seq) == "released":
                    if reruns.get(seq, 0) >= DRAIN_RERUNS:  # had its chances in this run
                        await self._settle(msg.nak(delay=RELEASE_DELAY))
                        continue
                    reruns[seq] = reruns.get(seq, 0) + 1
                failures = self.failures
                await self._handle_until(stop, msg)
                outcomes[seq] = await self._outcome(msg, failures)
                if outcomes[seq] == "released":
                    expect_until = time.monotonic() + RELEASE_DELAY + 3 * DRAIN_WAIT
        unsettled = sorted(seq for seq, o in outcomes.items() if o != "ok")
        if unsettled:
            log.warning(
                "drain node=%s: %d of %d item(s) did not succeed (stream seq %s)",
                self.node,
                len(unsettled),
                len(outcomes),
                unsettled,
            )
        return len(unsettled)

    async def _outcome(self, msg: Msg, failures_before: int) -> Outcome:
        """What became of an item just handled: done (succeeded, or retired by a stopped task),
        failed (retried later, dead-lettered, rejected) or released back without a failure."""
        if self.failures > failures_before:
            return "failed"
        try:
            item = decode_work_item(msg.data)
        except InvalidTask:
            return "failed"
        rec = await self.status.get_node(item.task.task_id, self.node)
        state = rec.state if rec else "pending"
        if state in ("succeeded", "skipped", "cancelled"):
            return "ok"
        return "failed" if state in ("dead", "failed") else "released"

    async def _handle_until(self, stop: asyncio.Event, msg: Msg) -> None:
        """Handle one item; when `stop` is set meanwhile, the item goes through `_stop_item`. An
        item fetched just as `stop` was set is handed back unstarted."""
        if stop.is_set():
            await self._settle(msg.nak())
            return
        work = asyncio.create_task(self.handle(msg))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await self._stop_item(work)
        except asyncio.CancelledError:  # we are cancelled ourselves: so is the item (it is nak'd)
            work.cancel()
            await asyncio.wait({work}, timeout=ABORT_WAIT)
            raise
        finally:
            stopping.cancel()
        if not work.cancelled():
            work.result()

    async def _stop_item(self, work: asyncio.Task[None]) -> None:
        """The runner is stopping with an item in hand. A running action gets the grace to finish;
        past it the guard sets `ctx.cancelled`, cancels the step and releases the item back (nak,
        leases released, not a failure). An item that has not started acting (waiting for its
        leases) is cancelled at once: it is nak'd and whatever leases it took are released."""
        if self._acting is not None:
            log.info("stopping node=%s: the running action has %gs to finish", self.node, self._grace)
            await asyncio.wait({work}, timeout=self._grace)
            if work.done():
                return
            log.warning(
                "stopping node=%s: the action outlived the %gs grace, cancelling it", self.node, self._grace
            )
            self._abort.set()
            await asyncio.wait({work}, timeout=ABORT_WAIT)
            if work.done():
                return
        log.info("stopping node=%s: handing the item back", self.node)
        work.cancel()
        await asyncio.wait({work})

    async def _fetch(self, wait: float) -> list[Msg]:
        assert self._sub is not None, "start() first"
        return await bus.fetch(self._sub, 1, wait=wait)

    async def handle(self, msg: Msg) -> None:
        """Run one delivery of a work item to its end: ack, nak with backoff, or dead letter. An item
        this node will not run (unknown action, bad arguments, arguments its config does not allow,
        a missing or bad `[packs.<pack>]` table) is dead-lettered at once, before any lease or step."""
        deliveries = msg.metadata.num_delivered
        try:
            item = decode_work_item(msg.data)
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
            try:
                action_cls, args, conf = self.registry.resolve_for_node(item.task, self.packs)
            except InvalidTask as e:
                await self._reject(msg, item, f"invalid work item: {e}")
                return
            try:
                await self._run_item(msg, item, action_cls, args, conf)
            finally:
                self._acting = None

    async def _reject(self, msg: Msg, item: WorkItem, reason: str) -> None:
        """A decodable item this node will not run: dead-letter it at once, never spin through
        retries, and record the node as dead with the reason so that the task finishes."""
        self.failures += 1
        rec = await self.status.get_node(item.task.task_id, self.node) or NodeRecord()
        await self._dead(msg, item, rec, reason)
        await self._node_failed(item, "")

    def leases_for(self, item: WorkItem, action_cls: type[Action], budget: int | None) -> LeaseSet:
        """The leases a node needs, in the one global order: global lease, exclusion groups (sorted),
        the task's topology lease, the cluster's disruption budget, the task's own m-of-n slot.

        Every item takes its leases in this one order, so waits cannot form a cycle: an item
        only ever waits for a lease later in the order than every lease it holds, so the holder
        of the latest contested lease never waits and always finishes. The topology lease (one
        zone or rack of the task at a time; owner = the node's zone, so the nodes of one zone
        share it) is task-scoped like the task slot but comes before the budget, not right before
        the slot: a node of another zone then waits holding nothing cluster-wide, instead of
        sitting on a budget slot that other tasks, and the zone now acting, could use."""
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
        topology = task.taskerman_params.topology
        if topology:
            zone = item.attributes.get(topology)
            if not zone:  # the router never routes such an item; refuse rather than act unfenced
                raise InvalidTask(f"node {self.node!r} has no {topology!r} attribute", "attributes")
            # `~` never occurs in an encoded task id, so this path cannot be another task's slots
            slots = SharedSlots(zk, f"{lease_path(task.task_id)}~topology", 1)
            leases.append(SharedLease(f"topology:{topology}", slots, owner=zone, holder=holder))
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

    async def _run_item(
        self, msg: Msg, item: WorkItem, action_cls: type[Action], args: Any, conf: Any = None
    ) -> None:
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
                config=conf,
            )
            action = action_cls()
            timeout = self._step_timeout(task.action, action_cls)
            for step_fn in (action.pre_check, action.execute_action, action.post_check):
                step = step_fn.__name__
                await leases.verify()
                with self._tracer.start_as_current_span(step):
                    await self._guarded(step_fn(ctx), ctx, step, timeout)
                await self._audit(f"{step}-passed", task.task_id)
        except RELEASED_BACK as e:
            log.warning("released back task_id=%s node=%s step=%s error=%s", task.task_id, self.node, step, e)
            await self._settle(msg.nak(delay=RELEASE_DELAY))
            state = "pending" if isinstance(e, LeaseWaitTimeout) else "retrying"
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

    def _step_timeout(self, action: str, action_cls: type[Action]) -> float | None:
        """The node's `[actions."<name>"] timeout`, else the action's own."""
        override = self.overrides.get(action)
        return override.timeout if override and override.timeout is not None else action_cls.timeout

    async def _guarded(
        self,
        step: Coroutine[Any, Any, None],
        ctx: ActionContext,
        name: str = "step",
        time_limit: float | None = None,
    ) -> None:
        """Run a step while watching the session, the step's timeout and the runner's shutdown
        grace. When one of them ends it: set `ctx.cancelled`, cancel the step, and raise LeaseLost,
        ActionFailed ("timed out") or RunnerStopping."""
        self._acting = ctx
        if self._abort.is_set():
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
                elif self._abort.is_set():
                    error = RunnerStopping(
                        f"the runner is stopping: {name} outlived the {self._grace:g}s grace"
                    )
                elif deadline is not None and loop.time() >= deadline:
                    error = ActionFailed(name, f"timed out after {time_limit:g}s")
                else:
                    continue
                ctx.cancelled.set()
                work.cancel()
                await asyncio.wait({work}, timeout=CANCEL_WAIT)
                if not work.done():
                    log.error(
                        "%s ignored its cancellation for %gs task_id=%s", name, CANCEL_WAIT, ctx.task.task_id
                    )
                elif not work.cancelled():
                    work.exception()  # retrieved: what it raised while unwinding is beside the point
                raise error
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
            span_id=tracing.current_span_id(),
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
