"""The router: a durable consumer of `tasks.global` that validates, discovers, orders and fans out;
it also turns MAX_DELIVERIES advisories into dead letters, sweeps abandoned lease folders
(`taskcore.coord.sweep`, with the reconciler), answers plan previews
(`taskerman.api.plan`) and, with metrics on, samples the fleet gauges (`metrics.FleetSampler`).
Stateless: any number may run on the one durable consumer; a task redelivered to a second router is
published again under the same message ids, which JetStream drops, and the per-node tracking
records make the second router skip nodes already routed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus import audit, deadletter, queues, tracking
from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Audit
from taskcore.bus.tracking import StatusStore
from taskcore.coord import sweep
from taskcore.coord.clusters import BreakerPolicy
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import DiscoveryError, InvalidTask
from taskcore.core.limits import UNEXPECTED_STRIKES
from taskcore.core.model import (
    NodeRecord,
    PlannedNode,
    PlanReply,
    Task,
    TaskRecord,
    decode_task,
    decode_work_item,
    peek_task_id,
    resolved,
    with_task_id,
)
from taskcore.core.signing import Signer
from taskcore.obs import metrics, tracing
from taskcore.plugins import Discovery, Routing
from taskerman_router import routing
from taskerman_router.planner import Planner
from taskerman_router.rejection import TaskIdTaken, record_dead, same_task, taken

log = logging.getLogger(__name__)
ROUTE_BATCH = 32  # tasks fetched, and routed side by side, at once
FAN_OUT_WINDOW = 256  # work-item publishes in flight at once
CLAIM_EVERY = 5.0  # in-progress acks while a large fan-out runs (well inside any ack_wait)
# How long a new task waits for the runners of its nodes to register before the missing ones are
# recorded `unserved`: long enough for a runner started with the task, short against ack_wait.
UNSERVED_WAIT = 5.0


async def _keep_claimed(msg: Msg) -> None:
    """Tell JetStream we are still on it, so a long fan-out is not delivered to another router."""
    while True:
        await asyncio.sleep(CLAIM_EVERY)
        with contextlib.suppress(Exception):
            await msg.in_progress()


class Advisory(msgspec.Struct):
    """The fields we use of a JetStream MAX_DELIVERIES advisory."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


class Router:
    """Routes tasks to node subjects, once per node."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        status: StatusStore,
        registry: ActionRegistry,
        discovery: dict[str, Discovery],
        *,
        signer: Signer | None,
        routings: dict[str, Routing] | None = None,
        zk: ZkSession | None = None,
        breaker_policy: BreakerPolicy | None = None,
        reconcile_interval: float = 30.0,
        sample_interval: float | None = None,
        unserved_wait: float = UNSERVED_WAIT,
    ) -> None:
        """`signer` signs every work item (`core/signing.py`; None: unsigned, insecure mode only);
        `sample_interval`: seconds between samples of the fleet gauges; None, no gauges (metrics off)."""
        self.nc = nc
        self.signer = signer
        self.js = js
        self.status = status
        self.registry = registry
        self.planner = Planner(
            discovery,
            routing.load_routings() if routings is None else routings,
            registry,
            zk=zk,
            breaker_policy=breaker_policy,
        )
        self.reconcile_interval = reconcile_interval
        self.zk = zk
        self.unserved_wait = unserved_wait
        self.sampler = (
            metrics.FleetSampler(metrics.Gauges(), js, status, zk, breaker_policy, every=sample_interval)
            if sample_interval is not None
            else None
        )
        self.metrics = metrics.Instruments()
        self.audit = Audit(js, audit.actor("router"))
        self._tracer = tracing.tracer(__name__)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume `tasks.global` and advisories until `stop` is set."""
        sub = await self.js.pull_subscribe_bind(durable=subjects.ROUTER_DURABLE, stream=subjects.TASKS_STREAM)
        # one router of the group handles each advisory (the others would race it to the same letter)
        adv = await self.nc.subscribe(
            f"{subjects.MAX_DELIVERIES_ADVISORY}.>", queue=subjects.ROUTER_QUEUE, cb=self._on_advisory
        )
        api = await self.nc.subscribe(subjects.PLAN_SUBJECT, queue=subjects.ROUTER_QUEUE, cb=self._on_plan)
        loops = [asyncio.create_task(self._reconcile_every(stop), name="router-reconcile")]
        if self.sampler is not None:
            loops.append(asyncio.create_task(self.sampler.run(stop), name="router-sample"))
        try:
            while not stop.is_set():
                # the tasks of one batch are independent: route them side by side
                batch = await bus.fetch(sub, ROUTE_BATCH, wait=1.0)
                await asyncio.gather(*(self._handle_one(msg) for msg in batch))
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await api.unsubscribe()
            await adv.unsubscribe()

    async def _handle_one(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except bus.UNAVAILABLE as e:  # not acked: it comes back after ack_wait
            log.warning("nats unavailable, routing later seq=%s error=%r", msg.metadata.sequence.stream, e)
        except Exception:  # `handle` contains its errors; this is the last line
            log.exception("message not handled seq=%s", msg.metadata.sequence.stream)

    async def _reconcile_every(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.reconcile_interval)
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed")
            if self.zk is not None:
                try:
                    await sweep.sweep(self.zk)
                except Exception as e:  # ZooKeeper away: next time
                    log.warning("lease folder sweep failed error=%r", e)

    async def reconcile(self) -> int:
        """Dead-letter items that reached max deliveries without one (advisories are fire-and-forget
        and only sent while someone fetches). Such an item stays in the WorkQueue stream at or below
        its consumer's ack floor, where every other item has been acked away. Returns how many."""
        found = 0
        for stream in (subjects.WORK_STREAM, subjects.TASKS_STREAM):
            for info in await queues.consumers(self.js, stream):
                subject = info.config.filter_subject
                if not subject:
                    continue
                acked, delivered = info.ack_floor, info.delivered
                if acked is None or delivered is None:
                    continue
                floor = delivered.stream_seq if info.num_ack_pending == 0 else acked.stream_seq
                seq = 1
                while seq <= floor:
                    try:
                        raw = await self.js.get_msg(stream, seq, subject=subject, next=True)
                    except NotFoundError:
                        break
                    if raw.seq is None or raw.seq > floor:
                        break
                    await self.dead_letter_max_delivered(
                        Advisory(
                            stream=stream,
                            consumer=info.name,
                            stream_seq=raw.seq,
                            deliveries=info.config.max_deliver or 0,
                        ),
                        reconciled=True,
                    )
                    found += 1
                    seq = raw.seq + 1
        if found:
            log.warning("reconciler dead-lettered %d stuck item(s)", found)
        return found

    async def handle(self, msg: Msg) -> None:
        """Route one message of `tasks.global`. Whatever it holds, it ends routed or dead-lettered
        with its reason, never a crash: a transient bus error leaves it to come back, any other
        error naks it, and the UNEXPECTED_STRIKES-th such error dead-letters it with the error."""
        try:
            await self._handle(msg)
        except bus.UNAVAILABLE:
            raise  # not acked: it comes back after ack_wait
        except Exception as e:
            await self._contain(msg, e)

    async def _handle(self, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        with self._tracer.start_as_current_span("route", context=tracing.extract_context(headers)) as span:
            task: Task | None = None
            try:
                task = self._task_of(msg, headers)
                span.set_attribute("task_id", task.task_id)
                self.registry.resolve(task)
                await self._route(task, msg)
            except TaskIdTaken as e:
                await self._reject(msg, task, str(e), "conflict")
            except InvalidTask as e:
                await self._reject(msg, task, str(e), "invalid")
            except DiscoveryError as e:
                await self._reject(msg, task, str(e), "discovery")
            await msg.ack_sync()

    def _task_of(self, msg: Msg, headers: dict[str, str]) -> Task:
        """The message's task, decoded and validated, with its task id (given or derived)."""
        task = decode_task(msg.data)
        task_id = routing.derive_task_id(
            task.task_id or headers.get("Nats-Msg-Id"),
            msg.metadata.sequence.stream,
            msg.metadata.timestamp.timestamp(),
        )
        return with_task_id(task, task_id)

    async def _contain(self, msg: Msg, error: Exception) -> None:
        """A message whose routing raised unexpectedly: nak it for another try, or, on its
        UNEXPECTED_STRIKES-th delivery, dead-letter it with the error as its reason. This never
        raises: a message it cannot settle comes back after ack_wait (and reaches max deliver)."""
        seq = msg.metadata.sequence.stream
        deliveries = msg.metadata.num_delivered
        try:
            if deliveries < UNEXPECTED_STRIKES:
                log.error("routing failed, will be redelivered seq=%s", seq, exc_info=error)
                await msg.nak(delay=2)
                return
            task: Task | None = None
            with contextlib.suppress(Exception):
                task = self._task_of(msg, dict(msg.headers or {}))
            reason = f"routing raised {error!r} on {deliveries} deliveries"
            log.error("routing failed, dead-lettering seq=%s", seq, exc_info=error)
            await self._reject(msg, task, reason, "error")
            await msg.ack_sync()
        except Exception as e:
            log.warning("could not settle seq=%s, it comes back after ack_wait error=%r", seq, e)

    async def _route(self, task: Task, msg: Msg | None = None) -> None:
        """Record the task's plan (once: the first router to commit it wins), then publish exactly
        the nodes it holds, many at a time, keeping the task claimed while the fan-out runs."""
        began = time.monotonic()
        # planned while the record is read: nearly every task is new, and a plan made in vain
        # (a redelivery, a taken id) only costs its reads
        planning = asyncio.create_task(self._plan_served(task))
        try:
            nodes, fresh, unserved = await self._commit_plan(task, planning)
        finally:
            planning.cancel()
            await asyncio.gather(planning, return_exceptions=True)
        planned = time.monotonic()
        keepalive = asyncio.create_task(_keep_claimed(msg)) if msg is not None else None
        try:
            if fresh and unserved:
                await self._record_unserved(task, unserved)
            # the items carry numbers: the percentages resolved against the plan's nodes; the
            # record keeps the task as it came, so a redelivery is still recognised as its own
            items_task = resolved(task, len(nodes))
            published = await self._fan_out(items_task, nodes, fresh, frozenset(unserved))
        finally:
            if keepalive is not None:
                keepalive.cancel()
        await self.audit.record(
            "routed",
            task_id=task.task_id,
            cluster=task.cluster_name,
            detail=f"{len(nodes)} node(s), {published} new"
            + (f", {len(unserved)} unserved" if unserved else ""),
        )
        if fresh:
            self.metrics.routed.add(1, {"cluster": task.cluster_name, "action": task.action})
        log.info(
            "routed task_id=%s nodes=%d published=%d plan_s=%.3f fan_out_s=%.3f",
            task.task_id,
            len(nodes),
            published,
            planned - began,
            time.monotonic() - planned,
        )

    async def _commit_plan(
        self, task: Task, planning: asyncio.Task[tuple[list[PlannedNode], list[str]]]
    ) -> tuple[list[PlannedNode], bool, list[str]]:
        """The task's nodes, whether this router committed its plan (fresh), and the unserved
        ones: the plan of a record routed already (a redelivery, another router), else `planning`'s,
        committed with the record unless another router commits first."""
        kept = msgspec.structs.replace(task, nodes=())  # the nodes live in the plan, not in the record
        for _ in range(3):
            entry = await self.status.get_task_entry(task.task_id)
            known, revision = entry if entry else (None, None)
            if known is not None and not same_task(known, task):
                raise TaskIdTaken(taken(task.task_id, known))
            if known is not None and known.state == "routed" and known.plan_id:
                return await self.status.plan(known), False, []
            nodes, unserved = await planning
            plan_id = uuid.uuid4().hex[:16]
            chunks = await self.status.put_plan(task.task_id, plan_id, nodes)
            now = time.time()
            record = TaskRecord(
                task=kept,
                state="routed",
                node_count=len(nodes),
                created_at=known.created_at if known else now,
                routed_at=now,
                plan_id=plan_id,
                plan_chunks=chunks,
            )
            if await self.status.commit_task(task.task_id, record, revision):
                return nodes, True, unserved
            await self.status.delete_plan(task.task_id, plan_id, chunks)  # another router was first
        raise RuntimeError(f"task {task.task_id!r}: its record kept changing while routing")

    async def _plan_served(self, task: Task) -> tuple[list[PlannedNode], list[str]]:
        """The task's planned nodes and those of them no runner serves."""
        nodes = await self._plan(task)
        return nodes, await self.planner.unserved(task, [n.name for n in nodes], self.unserved_wait)

    async def _record_unserved(self, task: Task, names: list[str]) -> None:
        """Nodes no runner serves get a final record saying so, and no work item: an item that
        nobody fetches would sit in WORK forever and keep the task `routed`."""
        now = time.time()
        reason = (
            f"unserved: no runner is registered for this node in cluster {task.cluster_name!r}; start "
            "taskerman-runner for it (or give its node config an away_grace) and submit the task again"
        )
        rec = NodeRecord(state="unserved", finished_at=now, error=reason)
        window = asyncio.Semaphore(FAN_OUT_WINDOW)

        async def one(node: str) -> None:
            async with window:
                await self.status.create_node(task.task_id, node, rec)

        await asyncio.gather(*(one(n) for n in names))
        await self.audit.record(
            "unserved",
            task_id=task.task_id,
            cluster=task.cluster_name,
            detail=f"{len(names)} node(s) without a runner: {', '.join(names[:10])}"
            + (" …" if len(names) > 10 else ""),
        )
        log.warning("task_id=%s: %d node(s) unserved, first %s", task.task_id, len(names), names[0])

    async def _plan(self, task: Task) -> list[PlannedNode]:
        resolved = await self.planner.resolve(task)
        attributes = {n.name: n.attributes for n in resolved.nodes if n.attributes}
        return tracking.planned(resolved.waves, attributes)

    async def _fan_out(
        self, task: Task, nodes: list[PlannedNode], fresh: bool, skip: frozenset[str] = frozenset()
    ) -> int:
        """Publish the work items of the nodes not in `skip`, FAN_OUT_WINDOW in flight at once. A
        repeated routing (a redelivery, a second router) skips nodes that already have a record:
        their item was published and taken; the rest go again under the same message ids
        (JetStream drops the duplicates within its window)."""
        todo = routing.routes(task, nodes, time.time())
        todo = [r for r in todo if r.node not in skip]
        if not fresh:
            have = await self.status.get_nodes(task.task_id, [r.node for r in todo])
            todo = [r for r in todo if r.node not in have]
        window = asyncio.Semaphore(FAN_OUT_WINDOW)

        async def one(route: routing.Route) -> None:
            async with window:
                payload = msgspec.json.encode(route.item)
                await bus.publish_work(self.js, self.signer, route.subject, payload, route.msg_id)

        await asyncio.gather(*(one(r) for r in todo))
        return len(todo)

    async def _on_plan(self, msg: Msg) -> None:
        """`taskerman.api.plan`: the plan of the task in the request, never routed."""
        with self._tracer.start_as_current_span(
            "plan", context=tracing.extract_context(dict(msg.headers or {}))
        ):
            reply = await self.preview(msg.data)
        try:
            await msg.respond(msgspec.json.encode(reply))
        except Exception as e:  # the requester gave up (or sent no reply subject)
            log.warning("plan reply not sent error=%r", e)

    async def preview(self, data: bytes) -> PlanReply:
        """Validate a task and resolve its routing without publishing or recording anything."""
        try:
            task = with_task_id(decode_task(data))
            return PlanReply(plan=await self.planner.preview(task))
        except InvalidTask as e:
            return PlanReply(error=e.problem, field=e.field)
        except DiscoveryError as e:
            return PlanReply(error=str(e))
        except Exception as e:
            log.exception("plan failed")
            return PlanReply(error=f"the router could not plan the task: {e!r}")

    async def _reject(self, msg: Msg, task: Task | None, reason: str, kind: str) -> None:
        """Dead-letter a task that cannot be routed; `kind` (invalid, discovery, conflict, error)
        labels the count. Its task id is kept (read from the raw JSON when the task did not
        decode) and its record marked dead, unless the id belongs to another task: records are
        written only by their own task, so the letter then names the conflict instead."""
        seq = msg.metadata.sequence.stream
        task_id = task.task_id if task else peek_task_id(msg.data)
        wrote = False
        if task_id and kind != "conflict":
            conflict = await record_dead(self.status, task_id, task, reason)
            wrote = conflict is None
            if conflict is not None:
                reason = f"{reason}; {conflict}"
        letter = deadletter.letter(
            data=msg.data,
            subject=msg.subject,
            deliveries=msg.metadata.num_delivered,
            reason=reason,
            task_id=task_id,
            cluster=task.cluster_name if task else "",
        )
        await deadletter.send(self.js, letter, msg_id=f"global:{seq}")
        if wrote:
            await self.audit.record("rejected", task_id=task_id, cluster=letter.cluster, detail=reason)
        self.metrics.rejected.add(1, {"reason": kind})
        log.warning("rejected task seq=%d task_id=%s reason=%s", seq, task_id, reason)

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            adv = msgspec.json.decode(msg.data, type=Advisory)
            await self.dead_letter_max_delivered(adv)
        except Exception:
            log.exception("could not handle advisory %r", msg.data[:200])

    async def dead_letter_max_delivered(self, adv: Advisory, reconciled: bool = False) -> None:
        """Copy an item that reached max deliveries into the DLQ by stream sequence, then delete it
        (a WorkQueue stream would keep it forever)."""
        try:
            raw = await self.js.get_msg(adv.stream, adv.stream_seq)
        except NotFoundError:
            return  # already settled (e.g. the runner dead-lettered it itself)
        payload = raw.data or b""
        cluster = node = task_id = action = ""
        reason = f"reached max deliveries ({adv.deliveries}) on consumer {adv.consumer}"
        if reconciled:
            reason += " (found by the reconciler)"
        if adv.stream == subjects.WORK_STREAM:
            try:
                item = decode_work_item(payload)
                cluster, node, task_id = item.task.cluster_name, item.node, item.task.task_id
                action = item.task.action
                rec = await self.status.get_node(task_id, node)
                if rec is not None and rec.error:
                    reason = f"{reason}; last error: {rec.error}"
            except InvalidTask as e:
                reason = f"{reason}; undecodable: {e}"
        headers = dict(raw.headers or {})
        with self._tracer.start_as_current_span("dead-letter", context=tracing.extract_context(headers)):
            letter = deadletter.letter(
                data=payload,
                subject=raw.subject or "",
                deliveries=adv.deliveries,
                reason=reason,
                task_id=task_id,
                cluster=cluster,
                node=node,
            )
            prefix = "" if adv.stream == subjects.WORK_STREAM else "global:"
            await deadletter.send(self.js, letter, msg_id=f"{prefix}{adv.stream_seq}")
        if task_id and node:
            await self.status.update_node(task_id, node, state="dead", error=reason, finished_at=time.time())
            await self.audit.record(
                "dead-lettered", task_id=task_id, cluster=cluster, node=node, detail=reason
            )
        await self.js.delete_msg(adv.stream, adv.stream_seq)
        if adv.stream == subjects.WORK_STREAM:  # the runner counts the items it dead-letters itself
            self.metrics.dead.add(1, {"cluster": cluster, "action": action})
        else:  # a task that kept failing to route
            self.metrics.rejected.add(1, {"reason": "max-deliveries"})
        log.warning("dead-lettered by advisory stream=%s seq=%d", adv.stream, adv.stream_seq)
