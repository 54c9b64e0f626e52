"""One attempt of one work item on its node, as explicit stages:

    admit → lease wait → pre_check → execute_action → post_check → settle

and one outcome: succeeded; failed at a step (retried with backoff); released back (a lost lease,
shutdown: nak'd, not counted); retired (the task was stopped, or the node waited past the task's
deadline: acked unrun); or dead (dead-lettered). Waiting for the leases costs nothing per second:
the semaphores' watches, the breaker's watch and the process's stop signals wake it, and the item
stays claimed with in-progress acks, which JetStream does not count as deliveries, so a node may
wait for days and still run. A success once recorded is final: a redelivery only acks it; so is
a side effect: execute_action's success is recorded before post_check starts, and an attempt that
did not settle (its runner died, its lease or its bus went away) resumes with post_check alone.
A node keeps its place with down markers from the moment it may be disrupted (before
execute_action, `_mark_acting`) until it succeeds, or, after a failure or a hand-back, until its
next attempt (`_mark_down`): a runner that freezes, dies or is cut off meanwhile leaves the place
held for the node.

The node's tracking record is read once, at admission, and changed here only; every transition is
emitted as a hook (see hooks.py), and the observers keep the record, the audit trail, the metrics
and the log. While the node waits, its record says for what (`waiting_for`, see waits.py): written
when the reason changes (the breaker seen open, a lease not granted at once, the task paused),
cleared by the next transition. Acks, naks and lease releases are shielded from
cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from aiozk import exc as zk_exc
from msgspec.structs import replace
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.stops import StopSignals
from taskcore.bus.tracking import PauseRecord, StatusStore, StopRecord
from taskcore.coord import clusters
from taskcore.coord.clusters import Breaker, BreakerState, BreakerStateName
from taskcore.coord.leases import Lease, LeaseSet
from taskcore.coord.session import ZkSession
from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import LeaseLost
from taskcore.core.model import NodeRecord, NodeStateName, Waiting, WorkItem
from taskcore.core.settings import Settings
from taskcore.obs import tracing
from taskerman_runner import policy, waits
from taskerman_runner.config import ActionOverride
from taskerman_runner.guard import RunnerStopping, StepGuard
from taskerman_runner.hooks import AttemptObserver, AttemptState, Hooks
from taskerman_runner.lease_plan import leases_for
from taskerman_runner.outcomes import Dead, Failed, Outcome, Released, Retired, Succeeded

RELEASE_DELAY = 2.0  # a lost lease: the item goes back after this delay
PROGRESS_PATIENCE = 120.0  # seconds a holding attempt waits out a bus failover (`_patiently`)
PROGRESS_RETRY = 0.5
MAX_BLIPS = 5  # times an attempt goes on in place after its session wavered; then it is handed back

# Ends of an attempt that are not the action's failure: the item goes back, nothing is counted
# (ZooKeeper failing a request of the lease wait, say, is the coordination's trouble, not the node's).
RELEASED_BACK: tuple[type[Exception], ...] = (LeaseLost, RunnerStopping, zk_exc.ZKError, *bus.UNAVAILABLE)

_tracer = tracing.tracer(__name__)
_T = TypeVar("_T")
P = ParamSpec("P")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeServices:
    """What every attempt on one node uses."""

    js: JetStreamContext
    status: StatusStore
    zk: ZkSession
    settings: Settings
    cluster: str
    node: str
    breaker: Breaker
    guard: StepGuard
    hooks: Hooks
    actor: str  # who acts, for the stop records this node writes
    stops: StopSignals
    packs: Mapping[str, Mapping[str, Any]]
    overrides: Mapping[str, ActionOverride]
    # a failed attempt keeps its leases through its backoff and retries on the spot (`run`);
    # False in cron mode (`drain`), which hands it back with its backoff for the next run
    retry_in_place: bool = True


class Attempt:
    """One delivery of one work item, run to one outcome."""

    def __init__(self, node: NodeServices, msg: Msg, item: WorkItem) -> None:
        self.node = node
        self.msg = msg
        self.state = AttemptState(item=item, cluster=node.cluster, node=node.node)
        self.emit = node.hooks.emit

    async def emit_patiently(
        self,
        hook: Callable[Concatenate[AttemptObserver, P], Awaitable[None]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """`emit` through a bus failover, each observer's call retried on its own (`_patiently`)."""
        await self.node.hooks.emit_through(_patiently, hook, *args, **kwargs)

    async def run(self, action_cls: type[Action], args: Any, conf: Any = None) -> Outcome:
        """admit → lease wait → pre_check → execute_action → post_check → settle. An item that
        ends (succeeded, dead-lettered, retired) after an earlier attempt, here or in a runner
        before us, clears the down markers it may have left (`LeaseSet.mark_down`)."""
        outcome = await self._run(action_cls, args, conf)
        record = self.state.record
        if isinstance(outcome, Succeeded | Dead | Retired) and (record.failures or record.attempts > 1):
            await self._clear_down(action_cls)
        return outcome

    async def _run(self, action_cls: type[Action], args: Any, conf: Any) -> Outcome:
        if ended := await self._admit():
            return ended
        keepalive = asyncio.create_task(self._keep_claim())
        try:
            handbacks = 0
            while True:
                try:
                    ended = await self._lease_and_act(action_cls, args, conf)
                    break
                except RELEASED_BACK as e:
                    handbacks += 1
                    if not self._stays(e, handbacks):
                        return await self._release(e)
                    self.node.guard.acting = None  # a shutdown now hands it back at once
                    try:  # the record says so; for people, the hold goes on if it is not written
                        await self._release(e, settle=False)
                    except Exception as unsaid:
                        log.warning("hand-back in place not recorded error=%r", unsaid)
                    await asyncio.sleep(RELEASE_DELAY)
        except asyncio.CancelledError:
            await _settle(self.msg.nak())
            raise
        finally:
            keepalive.cancel()
        # None: every step passed; the success is settled once, outside the hand-backs
        return ended if ended is not None else await self._succeed()

    def _stays(self, error: Exception, handbacks: int) -> bool:
        """Whether an attempt handed back after it acted waits for its leases again in place rather
        than going back to JetStream: the node may be half-done and holds its place with down
        markers, so it retakes them at once, and meanwhile its runner must not take up another of
        its items (one at a time per node): that item could wait for the very place the markers
        hold, or outlast them. Not in cron mode, nor when the runner stops; after MAX_BLIPS
        hand-backs in place the item goes back."""
        return (
            self.state.acted
            and self.node.retry_in_place
            and not isinstance(error, RunnerStopping)
            and handbacks <= MAX_BLIPS
        )

    async def _lease_and_act(self, action_cls: type[Action], args: Any, conf: Any) -> Outcome | None:
        """One hold of the leases: wait for them, then the steps, retried in place after a
        failure while they are held; they go back at the end, with the markers made while acting
        if every step passed (then None: the success is `_run`'s to settle). An end that is not
        the action's (RELEASED_BACK) is raised, after an attempt that acted marks the node down
        through the new session (`_mark_down`)."""
        s = self.state
        passed = False  # every step passed: the leases go back with the markers made while acting
        leases: LeaseSet | None = None
        try:
            with _tracer.start_as_current_span("lease wait"):
                waited = await self._lease_wait(action_cls)
            if isinstance(waited, StopRecord):  # stopped while we waited
                return await self._retire(waited)
            s.leases = leases = waited
            await self.emit(AttemptObserver.after_lease_taken, s)
            blips = 0
            while True:
                ctx = await self._start(args, conf)
                try:
                    await self._steps(action_cls(), ctx, self._step_timeout(action_cls))
                    passed = True
                    break
                except LeaseLost:
                    blips += 1
                    if blips > MAX_BLIPS or not await self._still_held():
                        raise
                    log.info("zookeeper came back, leases still held: attempt again in place")
                except RELEASED_BACK:
                    raise
                except Exception as e:
                    hold = self.node.retry_in_place
                    if ended := await self._fail(f"{type(e).__name__}: {e}", hold=hold):
                        return ended
        except RELEASED_BACK:
            if s.acted and leases is not None:  # the node may be down: it keeps its place
                await self._mark_down(RELEASE_DELAY)
            raise
        except Exception as e:  # not a cancellation: the item's nak is `_run`'s
            failed = await self._fail(f"{type(e).__name__}: {e}", hold=False)
            assert failed is not None  # without `hold` a failure always ends the attempt
            return failed
        finally:
            if leases is not None:
                await asyncio.shield(leases.release(ended=passed))
        return None

    async def reject(self, reason: str) -> Outcome:
        """A decodable item this node will not run: dead-letter it at once, never spin through
        retries, and record the node as dead with the reason so that the task finishes."""
        s = self.state
        s.record = await self.node.status.get_node(s.task_id, self.node.node) or NodeRecord()
        outcome = await self._dead(reason)
        await self._node_failed("")
        return outcome

    # --- the stages -----------------------------------------------------------------------------

    async def _admit(self) -> Outcome | None:
        """Read the node's record (the attempt's one read of it) and end here what may not run: an
        item whose attempt budget an earlier delivery spent. The item of a stopped task ends in the
        lease wait, whose first look reads the stop once it listens for one."""
        s, task = self.state, self.state.item.task
        s.record = await self.node.status.get_node(task.task_id, self.node.node) or NodeRecord()
        if s.record.state == "succeeded":  # it ran; only the ack was lost
            await _settle(self.msg.ack_sync())
            return Succeeded()
        if s.record.failures > task.retry_count:  # settled as failed before, but the ack was lost
            return await self._dead(s.record.error or "attempt budget exhausted")
        if s.record.state == "running":
            # the previous delivery never settled: its runner died or lost the ack
            await self.emit(AttemptObserver.after_attempt_lost, s)
        return None

    async def _lease_wait(self, action_cls: type[Action]) -> LeaseSet | StopRecord:
        """Wait for a closed breaker and every lease, on watches, as long as it takes; a breaker
        that opened meanwhile sends us back to waiting. A stop of the task (heard, not polled)
        ends the wait with its stop record; so does the task's deadline, with one of its own.
        While the task is paused the node waits out of every queue, for the resume (heard too),
        then queues again: by its plan position for the task's own slot, so its place among the
        task's nodes is kept."""
        node, task = self.node, self.state.item.task
        deadline_s = task.taskerman_params.deadline_s
        until = None if deadline_s is None else self.state.item.routed_at + deadline_s
        async with node.stops.watching(task.task_id) as stop_heard, self._canary_watch() as canary_heard:
            while True:
                stop_heard.clear()  # before the look: a stop from here on is heard
                canary_heard.clear()
                stop, pause = await self._stop_or_pause()
                if stop:
                    return stop
                left = None if until is None else until - time.time()
                if left is not None and left <= 0:
                    return _expired(deadline_s)
                if pause:
                    await self._note_waiting(waits.paused(task.task_id, pause))
                    await _either(stop_heard, at_most=left)
                    continue
                if self._behind_canary():
                    pending = await self._canary()
                    if isinstance(pending, StopRecord):
                        return pending
                    if pending:
                        await self._note_waiting(waits.canary(pending))
                        await _either(stop_heard, canary_heard, at_most=left)
                        continue
                taking = asyncio.create_task(self._take_leases(action_cls))
                hearing = asyncio.create_task(stop_heard.wait())
                try:
                    first = asyncio.FIRST_COMPLETED
                    await asyncio.wait({taking, hearing}, timeout=left, return_when=first)
                finally:
                    hearing.cancel()
                    if not taking.done():
                        taking.cancel()  # what it took is released on the way out
                    await asyncio.gather(taking, hearing, return_exceptions=True)
                if not taking.cancelled() and (got := taking.result()) is not None:
                    return got

    def _behind_canary(self) -> bool:
        """The task has a canary wave and this node is not in it."""
        canary = self.state.item.canary
        return bool(canary) and self.node.node not in canary

    def _canary_watch(self) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """Changes of the task's node records, heard while a node waits for its canary."""
        if self._behind_canary():
            return self.node.stops.watching_nodes(self.state.task_id, self.state.item.canary)
        return contextlib.nullcontext(asyncio.Event())

    async def _canary(self) -> list[str] | StopRecord:
        """The canary nodes that have not succeeded yet (none: go on), read at once; or, when one
        ended without succeeding, the task's stop (the first to see it writes it; the canary's
        own runner does too when it dead-letters it), so nothing else starts."""
        canary = list(self.state.item.canary)
        found = await self.node.status.get_nodes(self.state.task_id, canary)
        if failed := sorted(n for n, r in found.items() if r.state in CANARY_FAILED):
            stop = StopRecord(
                reason="canary",
                detail=f"canary node(s) {', '.join(failed)} did not succeed",
                by=self.node.actor,
                at=time.time(),
            )
            await self.node.status.stop(self.state.task_id, stop)
            return await self.node.status.stopped(self.state.task_id) or stop
        return [n for n in canary if (r := found.get(n)) is None or r.state != "succeeded"]

    async def _stop_or_pause(self) -> tuple[StopRecord | None, PauseRecord | None]:
        """The task's stop and pause records, read at once (one round trip's wait, not two)."""
        status, task_id = self.node.status, self.state.task_id
        return await asyncio.gather(status.stopped(task_id), status.paused(task_id))

    async def _take_leases(self, action_cls: type[Action]) -> LeaseSet | StopRecord | None:
        """A closed breaker and an open cluster (not frozen, inside a maintenance window), then
        every lease; None when the breaker opened, the cluster closed or the task was paused
        meanwhile (a closed cluster is waited for here first, on a watch of its config, until it
        opens), the stop record when it was stopped."""
        node, item = self.node, self.state.item
        _, config = await asyncio.gather(
            node.breaker.wait_closed(None, who=self.state.holder, on_open=self._breaker_open),
            clusters.read_config(node.zk, node.cluster),
        )
        if shut := config.closed(time.time()):  # nothing starts; the wait ends when it opens
            await self._note_waiting(waits.closed(node.cluster, shut))
            await clusters.wait_config_change(node.zk, node.cluster, shut.until - time.time())
            return None
        budget = config.budget
        leases = leases_for(
            item,
            action_cls,
            budget,
            zk=node.zk,
            cluster=node.cluster,
            node=node.node,
            override=node.overrides.get(item.task.action),
        )
        await leases.acquire(on_blocked=self._lease_blocked)
        try:  # taken but not yet the attempt's: a failed look (or a stop) must not leave them held
            breaker, (stop, pause), config = await asyncio.gather(
                node.breaker.state(), self._stop_or_pause(), clusters.read_config(node.zk, node.cluster)
            )
        except BaseException:
            await asyncio.shield(leases.release())
            raise
        if breaker != "open" and not stop and not pause and not config.closed(time.time()):
            return leases
        await leases.release()
        return stop

    async def _breaker_open(self, state: BreakerState, seen: BreakerStateName) -> None:
        await self._note_waiting(waits.breaker(self.node.cluster, state, seen))

    async def _lease_blocked(self, lease: Lease) -> None:
        """A lease is not granted at once: say which and who holds it (one read of its holders
        per wait, before the node queues; the wait itself sends nothing)."""
        try:
            holders = await lease.holders()
        except Exception as e:  # the words only; the wait goes on without the names
            log.warning("lease holders not read lease=%s error=%r", lease.name, e)
            holders = []
        await self._note_waiting(waits.lease(lease.name, lease.limit, holders))

    async def _note_waiting(self, waiting: Waiting) -> None:
        """Record what the node waits for, when the words differ from the record's. They are for
        people: a failed write is logged and the wait goes on, never counted as a failure."""
        s = self.state
        if not waits.changed(s.record.waiting_for, waiting):
            return
        before, s.record = s.record, replace(s.record, waiting_for=replace(waiting, since=time.time()))
        try:
            await self.emit(AttemptObserver.after_waiting, s)
        except Exception as e:
            s.record = before  # not written: the next look writes it again
            log.warning("waiting not recorded task_id=%s node=%s error=%r", s.task_id, s.node, e)

    async def _start(self, args: Any, conf: Any) -> ActionContext:
        """The attempt counts from here: the record becomes running, with its attempt number. The
        guard knows the item is acting before the record says so, so a shutdown that sees the
        record running gives the action its grace instead of handing the item back."""
        s = self.state
        assert s.leases is not None
        s.began = time.monotonic()
        now = time.time()
        admitted, s.record = (
            s.record,
            replace(
                s.record,
                state="running",
                attempts=s.record.attempts + 1,
                started_at=now,
                finished_at=None,
                waiting_for=None,
                first_attempt_at=s.record.first_attempt_at or now,
                token=s.leases.tokens()["task"],
            ),
        )
        ctx = self._context(args, conf)
        self.node.guard.acting = ctx
        try:  # the leases are held: a bus failover is waited out, not a reason to hand them back
            await self.emit_patiently(AttemptObserver.after_started, s)
        except Exception:
            s.record = admitted  # not written: the attempt did not start
            raise
        return ctx

    def _context(self, args: Any, conf: Any) -> ActionContext:
        s, task = self.state, self.state.item.task
        assert s.leases is not None
        return ActionContext(
            task=task,
            cluster=s.cluster,
            node=s.node,
            args=args,
            token=s.leases.tokens()["task"],
            attempt=s.record.attempts,
            pack_config=self.node.packs.get(task.action.split(":", 1)[0], {}),
            tokens=s.leases.tokens(),
            checkpoint=functools.partial(s.leases.checkpoint, self.node.zk),
            config=conf,
        )

    def _step_timeout(self, action_cls: type[Action]) -> float | None:
        """The node's `[actions."<name>"] timeout`, else the action's own."""
        override = self.node.overrides.get(self.state.action)
        return override.timeout if override and override.timeout is not None else action_cls.timeout

    async def _steps(self, action: Action, ctx: ActionContext, time_limit: float | None) -> None:
        """pre_check, execute_action, post_check; an attempt resumed after its side effect was
        recorded done runs post_check only. The node's finish time is taken when the last step
        returns, while every lease is still held: the record's [started_at, finished_at] then lies
        inside the leases, so no two records overlap beyond the limit and budget that held them."""
        s = self.state
        assert s.leases is not None
        steps = (action.pre_check, action.execute_action, action.post_check)
        marked = False  # each attempt marks the node down once, before its side effect
        for step_fn in steps[2:] if s.record.executed else steps:
            s.step = step_fn.__name__
            await s.leases.verify(self.node.zk)
            if step_fn != action.pre_check and not marked:
                await self._mark_acting(time_limit)
                marked = True
            with _tracer.start_as_current_span(s.step):
                await self.node.guard.run(step_fn(ctx), ctx, s.step, time_limit)
            if step_fn == action.execute_action:
                await self._record_executed()
            if step_fn == steps[-1]:
                s.record = replace(s.record, finished_at=time.time())
            await self.emit(AttemptObserver.after_step_passed, s, s.step)

    async def _still_held(self) -> bool:
        """After a step stopped because the session could not be vouched for: whether, once
        ZooKeeper answers again (within the session's lifetime), every lease is still ours. Then
        the attempt goes on in place (a failed node keeps its slot, a resumed one starts after its
        recorded side effect) instead of handing the leases to the next node."""
        assert self.state.leases is not None
        try:
            await self.state.leases.verify()
        except LeaseLost:
            return False
        return True

    async def _record_executed(self) -> None:
        """The side effect is done: record it before post_check starts, through a bus failover
        if need be, so that no fault from here on runs it again."""
        s = self.state
        s.record = replace(s.record, executed=True)
        await self.emit_patiently(AttemptObserver.after_executed, s)

    # --- settle ---------------------------------------------------------------------------------

    async def _succeed(self) -> Outcome:
        s = self.state
        try:  # a half-open breaker closes on it; if ZooKeeper fails it now, the next success closes it
            await self.node.breaker.record_success()
        except zk_exc.ZKError as e:
            log.warning("breaker success not recorded task_id=%s node=%s error=%r", s.task_id, s.node, e)
        finished_at = s.record.finished_at or time.time()  # taken by `_steps`, before the release
        s.record = replace(s.record, state="succeeded", finished_at=finished_at, error=None)
        # through a bus failover: a success not recorded would run the node again
        await self.emit_patiently(AttemptObserver.before_succeeded, s)
        with _tracer.start_as_current_span("ack"):
            await _settle(self.msg.ack_sync())
        await self.emit(AttemptObserver.after_succeeded, s)
        return Succeeded()

    async def _release(self, error: Exception, *, settle: bool = True) -> Outcome:
        """The attempt ends without the action's failure: the item goes back after RELEASE_DELAY,
        or, without `settle`, stays claimed here for another hold (`_stays`)."""
        s = self.state
        reason = f"{type(error).__name__}: {error}"
        s.record = replace(s.record, state="retrying", error=reason, waiting_for=None)
        await self.emit(AttemptObserver.before_released, s, error)
        if settle:
            await _settle(self.msg.nak(delay=RELEASE_DELAY))
        await self.emit(AttemptObserver.after_released, s, error)
        return Released(s.step, reason)

    async def _fail(self, reason: str, *, hold: bool) -> Outcome | None:
        """An attempt failed: count it, feed the breaker, then retry with backoff or dead-letter.
        A post_check failure is different: the cluster may be on fire, so the breaker trips, the
        node is dead-lettered at once and the whole task stops.

        With `hold` the node keeps its leases: a node whose action failed is presumed disrupted,
        so it holds its slot (and its budget slot) through its backoff and its retries until it
        succeeds, is dead-lettered or its task is stopped; None then means "retry now" (the backoff
        has passed, the breaker is closed). Without, the item goes back with its backoff."""
        s, task = self.state, self.state.item.task
        on_fire = s.step == "post_check"
        breaker, opened = await self.node.breaker.record_failure(
            f"{task.task_id} on {s.node}: {reason}", trip=on_fire
        )
        if opened:
            await self.emit(AttemptObserver.after_breaker_opened, s, breaker.reason)
        # a failed pre_check or execute_action runs every step again; anything else (outside the
        # steps) leaves a recorded side effect recorded: the retry resumes at post_check
        executed = s.record.executed and s.step not in ("pre_check", "execute_action")
        s.record = replace(s.record, failures=s.record.failures + 1, error=reason, executed=executed)
        await self.emit_patiently(AttemptObserver.after_step_failed, s, reason)
        if on_fire or policy.after_failure(s.record.failures, task.retry_count) == "dead":
            outcome = await self._dead(reason)
            await self._node_failed(reason if on_fire else "")
            return outcome
        s.record = replace(s.record, state="retrying")
        delay = policy.retry_delay(task.taskerman_params.workqueue_args, s.record.failures)
        await self.emit_patiently(AttemptObserver.before_retried, s, delay)
        attributes = {"delay_s": delay, "failures": s.record.failures, "holding": hold}
        with _tracer.start_as_current_span("retry", attributes=attributes):
            if hold:
                await self._mark_down(delay)
                await self.emit(AttemptObserver.after_retried, s, delay)
                stop = await self._hold(delay)
                return await self._retire(stop) if stop else None
            await _settle(self.msg.nak(delay=delay))
        await self.emit(AttemptObserver.after_retried, s, delay)
        return Failed(s.step, reason)

    async def _mark_acting(self, time_limit: float | None) -> None:
        """From here on the node may be disrupted: down markers on every lease before the side
        effect starts, lasting the step's time limit, a redelivery and a session timeout, twice
        over, so that the node keeps its place even if its runner freezes or is cut off from
        ZooKeeper while it acts (its session, and its slots with it, may then go at any moment).
        They go with the leases when every step passed (`LeaseSet.release`)."""
        s, settings = self.state, self.node.settings
        assert s.leases is not None
        horizon = (time_limit or 0.0) + settings.ack_wait + settings.zk_session_timeout
        if lost := await s.leases.mark_down(time.time() + 2 * horizon):
            raise LeaseLost(f"lease(s) {', '.join(lost)} taken by another node before acting")
        s.acted = True

    async def _mark_down(self, delay: float) -> None:
        """The node keeps its place even if this runner dies before its next attempt: down markers
        on every lease, lasting `delay`, a redelivery (ack_wait) and a session timeout, twice over,
        replacing those made before. Made after a failure (the backoff) and when an attempt that
        acted is handed back (its session went while the action ran: its slots are gone, but the
        markers made before it acted hold its place, and the new ones are made through the new
        session, ZooKeeper retried for up to a session timeout). Without them (ZooKeeper failing
        throughout) the node holds as long as the markers made before it acted do."""
        assert self.state.leases is not None
        settings = self.node.settings
        until = time.time() + 2 * (delay + settings.ack_wait + settings.zk_session_timeout)
        give_up = time.monotonic() + settings.zk_session_timeout
        while True:
            try:
                if lost := await self.state.leases.mark_down(until):
                    log.warning(
                        "place taken while the session was gone task_id=%s node=%s leases=%s",
                        self.state.task_id,
                        self.node.node,
                        ",".join(lost),
                    )
                return
            except zk_exc.ZKError as e:
                if time.monotonic() > give_up:
                    log.warning(
                        "down markers not made task_id=%s node=%s error=%r",
                        self.state.task_id,
                        self.node.node,
                        e,
                    )
                    return
                await asyncio.sleep(PROGRESS_RETRY)

    async def _clear_down(self, action_cls: type[Action]) -> None:
        """Delete the item's down markers on every lease it takes (left, they expire)."""
        node, s = self.node, self.state
        try:
            leases = leases_for(
                s.item,
                action_cls,
                1,  # the budget's size does not matter here, only its path
                zk=node.zk,
                cluster=node.cluster,
                node=node.node,
                override=node.overrides.get(s.item.task.action),
            )
            await asyncio.shield(leases.clear_down())
        except Exception as e:
            log.warning("down markers not cleared task_id=%s node=%s error=%r", s.task_id, s.node, e)

    async def _hold(self, delay: float) -> StopRecord | None:
        """Keep the leases through `delay`, then until the breaker is closed; a stop of the task
        (heard, not polled) ends the wait with its stop record."""
        node, task_id = self.node, self.state.task_id

        async def backoff() -> None:
            await asyncio.sleep(delay)
            await node.breaker.wait_closed(None, who=self.state.holder, on_open=self._breaker_open)

        async with node.stops.watching(task_id) as stop_heard:
            if stop := await _patiently(lambda: node.status.stopped(task_id)):
                return stop
            waiting = asyncio.create_task(backoff())
            hearing = asyncio.create_task(stop_heard.wait())
            try:
                await asyncio.wait({waiting, hearing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (waiting, hearing):
                    t.cancel()
                await asyncio.gather(waiting, hearing, return_exceptions=True)
            if not waiting.cancelled() and (e := waiting.exception()) is not None:
                raise e
            return await _patiently(lambda: node.status.stopped(task_id))

    async def _retire(self, stop: StopRecord) -> Outcome:
        """A stopped task's item that has not started is retired: acked and recorded as skipped
        (or cancelled). Nodes already running finish on their own."""
        s = self.state
        state: NodeStateName = "skipped"
        error = f"task stopped: {stop.reason}"
        if stop.reason == "cancelled":
            state = "cancelled"
        elif stop.reason == DEADLINE:
            state, error = "expired", f"expired: {stop.detail}"
        s.record = replace(s.record, state=state, finished_at=time.time(), error=error, waiting_for=None)
        await self.emit(AttemptObserver.before_retired, s, stop)
        await _settle(self.msg.ack_sync())
        await self.emit(AttemptObserver.after_retired, s, stop)
        return Retired(stop.reason)

    async def _dead(self, reason: str) -> Outcome:
        s = self.state
        await dead_letter(
            self.node.js,
            self.msg,
            cluster=s.cluster,
            node=s.node,
            task_id=s.task_id,
            reason=reason,
            rec=s.record,
        )
        s.record = replace(s.record, state="dead", error=reason, finished_at=time.time(), waiting_for=None)
        await self.emit(AttemptObserver.after_dead_lettered, s, reason)
        return Dead(reason)

    async def _node_failed(self, post_check_reason: str) -> None:
        """Count a failed node against the task's max_failures; stop the task past it (or at once
        after a post_check failure)."""
        s, task = self.state, self.state.item.task
        failed = await self.node.status.add_failure(task.task_id)
        allowed = task.resolved_max_failures
        if post_check_reason:
            reason, detail = "post_check", f"post_check failed on {s.node}: {post_check_reason}"
        elif s.node in s.item.canary:
            reason, detail = "canary", f"canary node {s.node} failed"
        elif failed > allowed:
            reason, detail = "failures", f"{failed} failed node(s), max_failures {allowed}"
        else:
            return
        stop = StopRecord(reason=reason, detail=detail, by=self.node.actor, at=time.time())
        if await self.node.status.stop(task.task_id, stop):
            await self.emit(AttemptObserver.after_task_stopped, s, detail)

    async def _keep_claim(self) -> None:
        """In-progress acks while we hold the item, so the server does not redeliver it."""
        while True:
            await asyncio.sleep(self.node.settings.ack_wait / 3)
            with contextlib.suppress(Exception):
                await self.msg.in_progress()


async def dead_letter(
    js: JetStreamContext,
    msg: Msg,
    *,
    cluster: str,
    node: str,
    task_id: str,
    reason: str,
    rec: NodeRecord | None,
) -> None:
    """Copy the item into the DLQ (its stream sequence is the message id), then ack it away."""
    letter = deadletter.letter(
        data=msg.data,
        subject=msg.subject,
        deliveries=msg.metadata.num_delivered,
        attempts=rec.attempts if rec else 0,
        reason=reason,
        task_id=task_id,
        cluster=cluster,
        node=node,
        first_attempt_at=rec.first_attempt_at if rec else None,
        last_attempt_at=rec.started_at if rec else None,
    )
    with _tracer.start_as_current_span("dead-letter", attributes={"reason": letter.reason}):
        await deadletter.send(js, letter, msg_id=f"{msg.metadata.sequence.stream}")
        await _settle(msg.ack_sync())


DEADLINE = "deadline"  # the reason of the stop record a node writes itself when its wait expires


def _expired(deadline_s: float | None) -> StopRecord:
    detail = f"waited past the task's deadline of {deadline_s:g}s without starting"
    return StopRecord(reason=DEADLINE, detail=detail, at=time.time())


# a canary node in one of these states will never succeed: the task stops
CANARY_FAILED: frozenset[NodeStateName] = frozenset(
    {"dead", "failed", "skipped", "cancelled", "expired", "unserved"}
)


async def _either(*events: asyncio.Event, at_most: float | None) -> None:
    """Until one of the events is set, or `at_most` seconds (None: no limit)."""
    waits = {asyncio.ensure_future(e.wait()) for e in events}
    try:
        await asyncio.wait(waits, timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def _patiently(call: Callable[[], Awaitable[_T]]) -> _T:
    """`await call()` through a bus failover, up to PROGRESS_PATIENCE: while an attempt holds its
    leases (acting, or a failed node in its backoff), a NATS outage is waited out rather than made
    a reason to hand the leases back to the next node."""
    deadline = time.monotonic() + PROGRESS_PATIENCE
    while True:
        try:
            return await call()
        except bus.UNAVAILABLE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(PROGRESS_RETRY)


async def _settle(op: Awaitable[Any]) -> None:
    """Acks and naks must happen even while we are being cancelled."""
    await asyncio.shield(op)
