"""One node's runner: pull a work item, run one attempt of it (attempt.py), settle.

Usable without one process per node: a process may run many NodeWorkers. Shutdown is staged: stop
fetching, give a running action its grace to finish, then cancel it and hand the item back (nak'd,
not counted as a failure, leases released); an item still waiting for its leases goes back at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Audit
from taskcore.bus.stops import StopSignals
from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters
from taskcore.coord.clusters import Breaker
from taskcore.coord.runners import ProcessHeartbeat, Registration
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask
from taskcore.core.limits import UNEXPECTED_STRIKES
from taskcore.core.model import decode_work_item, peek_task_id
from taskcore.core.settings import Settings
from taskcore.core.signing import SignatureError, verifier_for
from taskcore.obs import logs, tracing
from taskcore.obs.metrics import Instruments
from taskerman_runner.attempt import RELEASE_DELAY, Attempt, NodeServices, dead_letter
from taskerman_runner.config import DEFAULT_GRACE, ActionOverride
from taskerman_runner.guard import StepGuard
from taskerman_runner.health import HealthCheck, HealthWatch
from taskerman_runner.hooks import Hooks
from taskerman_runner.observers import (
    AuditObserver,
    CountersObserver,
    LogObserver,
    MetricsObserver,
    StatusObserver,
)
from taskerman_runner.outcomes import Dead, Failed, Outcome, Released, Retired, Succeeded

log = logging.getLogger(__name__)
ABORT_WAIT = 5.0  # after the grace: how long the cancelled action's release may take before we cancel it all
IDLE_FETCH_WAIT = 20.0  # a daemon's pull request waits this long for an item
DRAIN_WAIT = 1.0  # cron mode: nothing arrives for this long, so nothing more is due
DRAIN_RERUNS = 2  # cron mode: runs again of an item released back (not failed) in the same drain
STRIKES_KEPT = 1024  # items whose unexpected errors are remembered (the oldest are forgotten)
DrainResult = Literal["ok", "failed", "released"]


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
        stops: StopSignals | None = None,
        process: ProcessHeartbeat | None = None,
        away_grace: float = 0.0,
        health: HealthCheck | None = None,
    ) -> None:
        """`stops` and `process` may be shared by every node of a process (one subscription to
        stop records, one heartbeat); by default the node has its own. The trusted keys come from
        `settings` (secure by default: none, and not insecure, raises SigningConfigError)."""
        self.verifier = verifier_for(settings)
        self.js = js
        self.status = status
        self.zk = zk
        self.registry = registry
        self.settings = settings
        self.cluster = cluster
        self.node = node
        self.packs = packs or {}
        self.breaker = Breaker(zk, cluster, clusters.breaker_policy(settings))
        self.registration = Registration(
            zk, cluster, node, _version(), registry.names(), process=process, away_grace=away_grace
        )
        self.stops = stops or StopSignals(js._nc, status.kv)
        self.audit = Audit(js, audit.actor(f"runner:{node}"))
        self.metrics = Instruments()
        self.guard = StepGuard(zk)  # watches the running step; `guard.abort` ends it past the grace
        self.in_hand = False  # an item is being handled
        self.health = (
            HealthWatch(zk, self.audit, cluster=cluster, node=node, check=health, busy=lambda: self.in_hand)
            if health
            else None
        )
        self.hooks = Hooks(
            [
                StatusObserver(status),
                AuditObserver(self.audit),
                MetricsObserver(self.metrics),
                CountersObserver(zk),
                LogObserver(),
            ]
        )
        self.services = NodeServices(
            js=js,
            status=status,
            zk=zk,
            settings=settings,
            cluster=cluster,
            node=node,
            breaker=self.breaker,
            guard=self.guard,
            hooks=self.hooks,
            actor=self.audit.by,
            stops=self.stops,
            packs=self.packs,
            overrides=overrides or {},
        )
        self._sub: JetStreamContext.PullSubscription | None = None
        self._strikes: dict[int, int] = {}  # stream seq: unexpected errors of that item
        self._tracer = tracing.tracer(__name__)

    async def start(self) -> None:
        """Create this node's durable consumer, bind to it and register in ZooKeeper."""
        durable = await bus.ensure_runner_consumer(self.js, self.settings, self.cluster, self.node)
        self._sub = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.WORK_STREAM)
        await self.registration.register()

    async def run(self, stop: asyncio.Event, grace: float = DEFAULT_GRACE) -> None:
        """Fetch and handle items until `stop` is set; the action in hand gets `grace` seconds to
        finish, then it is cancelled and its item handed back."""
        self.guard.grace = grace
        loops = [asyncio.create_task(self.registration.heartbeat(stop))]
        if self.health is not None:
            loops.append(asyncio.create_task(self.health.run(stop)))
        try:
            while not stop.is_set():
                for msg in await self._fetch_until(stop):
                    self.in_hand = True
                    try:
                        await self._handle_until(stop, msg)
                    except bus.UNAVAILABLE as e:  # not settled: it comes back after ack_wait
                        log.warning("nats unavailable, item comes back node=%s error=%r", self.node, e)
                    except Exception:  # `handle` contains its errors; this is the last line
                        log.exception("item not handled node=%s", self.node)
                    finally:
                        self.in_hand = False
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.registration.leave()

    async def _fetch_until(self, stop: asyncio.Event) -> list[Msg]:
        """The next item, waiting long (an idle node costs the server one pull request every
        IDLE_FETCH_WAIT seconds, not one a second), or nothing once `stop` is set."""
        fetching = asyncio.create_task(self._fetch(wait=IDLE_FETCH_WAIT))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not fetching.done():
                fetching.cancel()
            await asyncio.gather(fetching, stopping, return_exceptions=True)
        return [] if fetching.cancelled() else fetching.result()

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
        self.guard.grace = grace
        self.services = dataclasses.replace(self.services, retry_in_place=False)
        results: dict[int, DrainResult] = {}
        reruns: dict[int, int] = {}
        expect_until = 0.0  # a released item should be back by then
        while not stop.is_set():
            batch = await self._fetch(wait=DRAIN_WAIT)
            if not batch:
                if time.monotonic() < expect_until and any(
                    r == "released" and reruns.get(seq, 0) < DRAIN_RERUNS for seq, r in results.items()
                ):
                    continue
                break
            for msg in batch:
                seq = msg.metadata.sequence.stream
                if results.get(seq) == "released":
                    if reruns.get(seq, 0) >= DRAIN_RERUNS:  # had its chances in this run
                        await asyncio.shield(msg.nak(delay=RELEASE_DELAY))
                        continue
                    reruns[seq] = reruns.get(seq, 0) + 1
                results[seq] = _drain_result(await self._handle_until(stop, msg))
                if results[seq] == "released":
                    expect_until = time.monotonic() + RELEASE_DELAY + 3 * DRAIN_WAIT
        unsettled = sorted(seq for seq, r in results.items() if r != "ok")
        if unsettled:
            log.warning(
                "drain node=%s: %d of %d item(s) did not succeed (stream seq %s)",
                self.node,
                len(unsettled),
                len(results),
                unsettled,
            )
        return len(unsettled)

    async def _handle_until(self, stop: asyncio.Event, msg: Msg) -> Outcome | None:
        """Handle one item; when `stop` is set meanwhile, the item goes through `_stop_item`. An
        item fetched just as `stop` was set is handed back unstarted. None: the item was handed
        back before its attempt ended."""
        if stop.is_set():
            await asyncio.shield(msg.nak())
            return None
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
        return None if work.cancelled() else work.result()

    async def _stop_item(self, work: asyncio.Task[Outcome]) -> None:
        """The runner is stopping with an item in hand. A running action gets the grace to finish;
        past it the guard sets `ctx.cancelled`, cancels the step and releases the item back (nak,
        leases released, not a failure). An item that has not started acting (waiting for its
        leases) is cancelled at once: it is nak'd and whatever leases it took are released."""
        grace = self.guard.grace
        if self.guard.acting is not None:
            log.info("stopping node=%s: the running action has %gs to finish", self.node, grace)
            await asyncio.wait({work}, timeout=grace)
            if work.done():
                return
            log.warning(
                "stopping node=%s: the action outlived the %gs grace, cancelling it", self.node, grace
            )
            self.guard.abort.set()
            await asyncio.wait({work}, timeout=ABORT_WAIT)
            if work.done():
                return
        log.info("stopping node=%s: handing the item back", self.node)
        work.cancel()
        await asyncio.wait({work})

    async def _fetch(self, wait: float) -> list[Msg]:
        assert self._sub is not None, "start() first"
        return await bus.fetch(self._sub, 1, wait=wait)

    async def handle(self, msg: Msg) -> Outcome:
        """Run one delivery of a work item to its end: ack, nak with backoff, or dead letter. An item
        this node will not run (unknown action, bad arguments, arguments its config does not allow,
        a missing or bad `[packs.<pack>]` table) is dead-lettered at once, before any lease or step.
        Nothing an item holds ends the runner: an unexpected error naks it, and the
        UNEXPECTED_STRIKES-th one dead-letters it with the error as its reason."""
        try:
            return await self._handle(msg)
        except bus.UNAVAILABLE:
            raise  # not settled: it comes back after ack_wait
        except Exception as e:
            return await self._contain(msg, e)

    async def _contain(self, msg: Msg, error: Exception) -> Outcome:
        """An item whose handling raised unexpectedly: handed back for another try, or dead-lettered
        (its node recorded dead) once it raised UNEXPECTED_STRIKES times in this process or has
        UNEXPECTED_STRIKES deliveries. Never raises: an item it cannot settle comes back after
        ack_wait, and the router dead-letters it at max deliver."""
        seq = msg.metadata.sequence.stream
        strikes = self._strikes.pop(seq, 0) + 1
        reason = f"the runner raised {error!r} on this item ({strikes} time(s))"
        try:
            if strikes < UNEXPECTED_STRIKES and msg.metadata.num_delivered < UNEXPECTED_STRIKES:
                self._strikes[seq] = strikes
                while len(self._strikes) > STRIKES_KEPT:
                    del self._strikes[next(iter(self._strikes))]
                log.error("item failed unexpectedly node=%s seq=%s", self.node, seq, exc_info=error)
                await msg.nak(delay=RELEASE_DELAY)
                return Released("handle", reason)
            log.error(
                "item failed unexpectedly, dead-lettering node=%s seq=%s", self.node, seq, exc_info=error
            )
            outcome = await self._poison(msg, reason)
            with contextlib.suppress(Exception):
                item = decode_work_item(msg.data)
                await self.status.update_node(
                    item.task.task_id, self.node, state="dead", error=reason, finished_at=time.time()
                )
            return outcome
        except Exception as e:
            log.warning("could not settle node=%s seq=%s error=%r", self.node, seq, e)
            return Released("handle", reason)

    async def _handle(self, msg: Msg) -> Outcome:
        deliveries = msg.metadata.num_delivered
        if self.verifier is not None:  # before anything reads the item: it may be hostile
            headers = msg.headers or {}
            try:
                self.verifier.verify(headers, msg.subject, headers.get("Nats-Msg-Id", ""), msg.data)
            except SignatureError as e:
                return await self._refuse(msg, str(e))
        try:
            item = decode_work_item(msg.data)
        except InvalidTask as e:
            return await self._poison(msg, f"invalid work item: {e}")
        with (
            logs.task_context(item.task.task_id, self.node),
            self._tracer.start_as_current_span(
                f"run {item.task.action}",
                context=tracing.extract_context(dict(msg.headers or {})),
                attributes={"task_id": item.task.task_id, "node": self.node, "deliveries": deliveries},
            ),
        ):
            attempt = Attempt(self.services, msg, item)
            try:
                action_cls, args, conf = self.registry.resolve_for_node(item.task, self.packs)
            except InvalidTask as e:
                return await attempt.reject(f"invalid work item: {e}")
            try:
                return await attempt.run(action_cls, args, conf)
            finally:
                self.guard.acting = None

    async def _refuse(self, msg: Msg, reason: str) -> Outcome:
        """An item no trusted key signed: dead-letter it unrun. Nothing it claims is believed, so no
        task's records or counters change (a forger could otherwise mark a real task's node dead);
        the letter and the node's audit trail say what was refused."""
        task_id = peek_task_id(msg.data, in_item=True)
        await dead_letter(
            self.js, msg, cluster=self.cluster, node=self.node, task_id=task_id, reason=reason, rec=None
        )
        await self.audit.record(
            "refused", cluster=self.cluster, node=self.node, detail=f"claimed task {task_id!r}: {reason}"
        )
        log.warning(
            "work item refused node=%s seq=%s reason=%s", self.node, msg.metadata.sequence.stream, reason
        )
        return Dead(reason)

    async def _poison(self, msg: Msg, reason: str) -> Outcome:
        """An item that can never run: dead-letter it at once, never spin through retries."""
        task_id = peek_task_id(msg.data, in_item=True)
        await dead_letter(
            self.js, msg, cluster=self.cluster, node=self.node, task_id=task_id, reason=reason, rec=None
        )
        log.warning("poison item dead-lettered node=%s reason=%s", self.node, reason)
        return Dead(reason)


def _drain_result(outcome: Outcome | None) -> DrainResult:
    """What a drain makes of an attempt: done (succeeded, or retired by a stopped task), failed
    (retried later, dead-lettered, rejected) or released back without a failure (also an item
    handed back before its attempt ended)."""
    if isinstance(outcome, Succeeded | Retired):
        return "ok"
    if isinstance(outcome, Failed | Dead):
        return "failed"
    return "released"
