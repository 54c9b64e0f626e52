"""The hooks an attempt emits and the observers that listen, in the manner of dramatiq's broker
middleware: the attempt calls `emit(AttemptObserver.after_succeeded, state)`, every observer that
overrides the hook runs in turn, and an unexpected failure of one is logged and contained, never
the attempt's failure. Only an observer that keeps the attempt's own record (`contained = False`)
fails the attempt with it, as a failed write of that record always did.

`before_*` hooks run before the item is settled (acked, nak'd), `after_*` hooks once it is."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Concatenate, ParamSpec

from taskcore.bus.tracking import StopRecord
from taskcore.coord.leases import LeaseSet
from taskcore.core.model import NodeRecord, WorkItem

log = logging.getLogger(__name__)
P = ParamSpec("P")
Through = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]  # makes a call, maybe retried


@dataclass
class AttemptState:
    """What an attempt knows so far. The hooks read it; only the attempt changes it. `record` is
    the node's tracking record as the attempt last left it (read once, when the attempt began)."""

    item: WorkItem
    cluster: str
    node: str
    record: NodeRecord = field(default_factory=NodeRecord)
    leases: LeaseSet | None = None
    step: str = "lease wait"  # where the attempt is: "lease wait", then each step in turn
    began: float = 0.0  # time.monotonic() when the steps began
    acted: bool = False  # marked down before execute_action (or a resumed post_check): it may be disrupted

    @property
    def task_id(self) -> str:
        return self.item.task.task_id

    @property
    def action(self) -> str:
        return self.item.task.action

    @property
    def holder(self) -> str:
        """Who this attempt is, to the breaker's half-open probe: the task and the node."""
        return f"{self.item.task.task_id}/{self.node}"


class AttemptObserver:
    """Listens to the hooks of attempts; every hook does nothing unless overridden."""

    contained: ClassVar[bool] = True  # False: a failure of this observer is the attempt's failure

    async def after_attempt_lost(self, s: AttemptState) -> None:
        """The previous delivery started and never settled (not counted as a failure)."""

    async def after_waiting(self, s: AttemptState) -> None:
        """The node waits for something new before it can start: `s.record.waiting_for` says
        what (emitted when the reason changes, not while it stays the same)."""

    async def after_lease_taken(self, s: AttemptState) -> None:
        """Every lease is held (`s.leases`)."""

    async def after_started(self, s: AttemptState) -> None:
        """The attempt counts: `s.record` is running, with its attempt number and token."""

    async def after_step_passed(self, s: AttemptState, step: str) -> None:
        """A step returned."""

    async def after_executed(self, s: AttemptState) -> None:
        """execute_action passed and `s.record.executed` says so: the attempt moves on only once
        this has been recorded (a resumed attempt then never runs the side effect again)."""

    async def after_step_failed(self, s: AttemptState, reason: str) -> None:
        """The attempt failed at `s.step` and the failure is counted in `s.record`."""

    async def before_retried(self, s: AttemptState, delay: float) -> None:
        """A failed attempt is about to go back with a backoff of `delay` seconds."""

    async def after_retried(self, s: AttemptState, delay: float) -> None:
        """A failed attempt went back; it is redelivered after `delay` seconds."""

    async def before_released(self, s: AttemptState, error: Exception) -> None:
        """The attempt ended without the action failing (a lost lease, a long wait, shutdown)."""

    async def after_released(self, s: AttemptState, error: Exception) -> None:
        """The item went back, not counted as a failure."""

    async def before_retired(self, s: AttemptState, stop: StopRecord) -> None:
        """The task was stopped before this node acted: the item is about to be acked away."""

    async def after_retired(self, s: AttemptState, stop: StopRecord) -> None:
        """A stopped task's item was acked away unrun."""

    async def before_succeeded(self, s: AttemptState) -> None:
        """Every step passed and the leases are released; the ack comes next."""

    async def after_succeeded(self, s: AttemptState) -> None:
        """The item is acked."""

    async def after_dead_lettered(self, s: AttemptState, reason: str) -> None:
        """The item is in the dead-letter queue and acked away."""

    async def after_task_stopped(self, s: AttemptState, detail: str) -> None:
        """This node's failure stopped the whole task."""

    async def after_breaker_opened(self, s: AttemptState, reason: str) -> None:
        """This node's failure opened its cluster's breaker."""


class Hooks:
    """Emits an attempt's hooks to its observers, in order."""

    def __init__(self, observers: Sequence[AttemptObserver]) -> None:
        self.observers = tuple(observers)

    async def emit(
        self,
        hook: Callable[Concatenate[AttemptObserver, P], Awaitable[None]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """Call `hook` (named through AttemptObserver, e.g. `AttemptObserver.after_succeeded`) on
        every observer that overrides it."""
        await self.emit_through(_once, hook, *args, **kwargs)

    async def emit_through(
        self,
        through: Through,
        hook: Callable[Concatenate[AttemptObserver, P], Awaitable[None]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """`emit`, each observer's call made by `through` (which may retry it through a bus
        failover): an observer whose call went through is not called again when a later one is
        retried, so a retried record write does not append its audit event twice."""
        name = hook.__name__
        for observer in self.observers:
            if getattr(type(observer), name) is hook:
                continue  # the no-op of the base class
            method = getattr(observer, name)
            await through(
                functools.partial(_call, observer, name, functools.partial(method, *args, **kwargs))
            )


async def _call(observer: AttemptObserver, name: str, call: Callable[[], Awaitable[None]]) -> None:
    """One observer's hook: a contained observer's failure is logged, never raised."""
    if not observer.contained:
        await call()
        return
    try:
        await call()
    except Exception:
        log.exception("unexpected failure in %s of %s, ignored", name, type(observer).__name__)


async def _once(call: Callable[[], Awaitable[None]]) -> None:
    await call()
