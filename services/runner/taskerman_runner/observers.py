"""What listens to a runner's attempts: the node's tracking record, the audit trail, the metrics,
the cluster's counters in ZooKeeper and the log. Spans are not here: a span wraps the work it
measures (the lease wait, each step, the ack), so the attempt opens them around that work."""

from __future__ import annotations

import asyncio
import logging
import time

from taskcore.bus.audit import Audit
from taskcore.bus.tracking import StatusStore, StopRecord
from taskcore.coord import clusters
from taskcore.coord.leases import LeaseSet
from taskcore.coord.session import ZkSession
from taskcore.obs.metrics import Instruments
from taskerman_runner.hooks import AttemptObserver, AttemptState

log = logging.getLogger(__name__)


class StatusObserver(AttemptObserver):
    """Writes the node's tracking record at each transition the attempt made to it; the record
    is the attempt's own state, so a failed write fails the attempt (`contained = False`)."""

    contained = False

    def __init__(self, status: StatusStore) -> None:
        self.status = status

    async def _write(self, s: AttemptState) -> None:
        await self.status.put_node(s.task_id, s.node, s.record)

    async def after_waiting(self, s: AttemptState) -> None:
        await self._write(s)

    async def after_started(self, s: AttemptState) -> None:
        await self._write(s)

    async def after_executed(self, s: AttemptState) -> None:
        await self._write(s)

    async def after_step_failed(self, s: AttemptState, reason: str) -> None:
        await self._write(s)  # counted before the item settles: a lost ack cannot undo it

    async def before_retried(self, s: AttemptState, delay: float) -> None:
        await self._write(s)

    async def after_released(self, s: AttemptState, error: Exception) -> None:
        await self._write(s)

    async def before_retired(self, s: AttemptState, stop: StopRecord) -> None:
        await self._write(s)

    async def before_succeeded(self, s: AttemptState) -> None:
        await self._write(s)

    async def after_dead_lettered(self, s: AttemptState, reason: str) -> None:
        await self._write(s)


class AuditObserver(AttemptObserver):
    """Appends each transition to the task's audit trail (`taskerman events`)."""

    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    async def _record(self, s: AttemptState, kind: str, detail: str = "") -> None:
        await self.audit.record(kind, task_id=s.task_id, cluster=s.cluster, node=s.node, detail=detail)

    async def after_attempt_lost(self, s: AttemptState) -> None:
        await self._record(s, "attempt-lost", f"attempt {s.record.attempts} did not finish; not counted")

    async def after_lease_taken(self, s: AttemptState) -> None:
        assert s.leases is not None
        await self._record(s, "lease-acquired", lease_detail(s.leases))

    async def after_step_passed(self, s: AttemptState, step: str) -> None:
        await self._record(s, f"{step}-passed")

    async def after_step_failed(self, s: AttemptState, reason: str) -> None:
        await self._record(s, f"{s.step}-failed", reason)

    async def after_retried(self, s: AttemptState, delay: float) -> None:
        budget = s.item.task.retry_count + 1
        await self._record(s, "retried", f"failure {s.record.failures} of {budget}, in {delay:g}s")

    async def after_released(self, s: AttemptState, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        await self._record(s, "released", f"at {s.step}: {reason}; not counted as a failure")

    async def after_retired(self, s: AttemptState, stop: StopRecord) -> None:
        await self._record(s, s.record.state, f"task stopped: {stop.reason} {stop.detail}".strip())

    async def after_succeeded(self, s: AttemptState) -> None:
        await self._record(s, "succeeded", f"attempt {s.record.attempts}")

    async def after_dead_lettered(self, s: AttemptState, reason: str) -> None:
        await self._record(s, "dead-lettered", reason)

    async def after_task_stopped(self, s: AttemptState, detail: str) -> None:
        await self._record(s, "stopped", detail)

    async def after_breaker_opened(self, s: AttemptState, reason: str) -> None:
        await self._record(s, "breaker-opened", reason)


class MetricsObserver(AttemptObserver):
    """Counts and times attempts on the runner's instruments."""

    def __init__(self, metrics: Instruments) -> None:
        self.metrics = metrics

    async def after_lease_taken(self, s: AttemptState) -> None:
        assert s.leases is not None
        labels = {"cluster": s.cluster, "action": s.action}
        self.metrics.lease_wait.record(sum(s.leases.waited.values()), labels)

    async def after_started(self, s: AttemptState) -> None:
        self.metrics.executed.add(1, {"cluster": s.cluster, "action": s.action})  # every attempt

    async def after_step_failed(self, s: AttemptState, reason: str) -> None:
        self.metrics.failed.add(1, {"cluster": s.cluster, "action": s.action, "step": s.step})

    async def before_retried(self, s: AttemptState, delay: float) -> None:
        self.metrics.retried.add(1, {"cluster": s.cluster, "action": s.action})

    async def before_succeeded(self, s: AttemptState) -> None:
        labels = {"cluster": s.cluster, "action": s.action}
        self.metrics.succeeded.add(1, labels)
        self.metrics.action_duration.record(time.monotonic() - s.began, labels)
        self.metrics.end_to_end.record(max(time.time() - s.item.routed_at, 0.0), labels)

    async def after_dead_lettered(self, s: AttemptState, reason: str) -> None:
        self.metrics.dead.add(1, {"cluster": s.cluster, "action": s.action})


class CountersObserver(AttemptObserver):
    """Feeds the cluster's run counters in ZooKeeper (`taskerman cluster stats`). The counts of
    one (cluster, action) are added up while a write of them is under way and go in the next one:
    one compare-and-set in flight per counter, however many of the process's nodes finish at once
    (a thousand nodes in one runner otherwise race each other for the one znode)."""

    def __init__(self, zk: ZkSession) -> None:
        self.zk = zk
        self._pending: dict[tuple[str, str], clusters.Stats] = {}
        self._writers: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def _count(self, s: AttemptState, failed: bool) -> None:
        waited = sum(s.leases.waited.values()) if s.leases else 0.0
        key = (s.cluster, s.action)
        self._pending[key] = clusters.added(self._pending.get(key), failed=failed, lease_wait_s=waited)
        if key not in self._writers:  # else the write under way takes it next
            self._writers[key] = asyncio.create_task(self._write(key))

    async def _write(self, key: tuple[str, str]) -> None:
        """Write what is pending for `key` until nothing is (the item that counted never waits)."""
        try:
            while (counts := self._pending.pop(key, None)) is not None:
                try:
                    await clusters.count(self.zk, *key, counts)
                except Exception as e:  # statistics never decide the outcome of an item
                    log.warning("counters not updated cluster=%s error=%r", key[0], e)
        finally:
            del self._writers[key]

    async def after_step_failed(self, s: AttemptState, reason: str) -> None:
        await self._count(s, failed=True)

    async def before_succeeded(self, s: AttemptState) -> None:
        await self._count(s, failed=False)


class LogObserver(AttemptObserver):
    """One greppable line per outcome (the task id is also in the log context)."""

    async def after_step_failed(self, s: AttemptState, reason: str) -> None:
        log.warning(
            "failed task_id=%s node=%s step=%s attempt=%d error=%s",
            s.task_id,
            s.node,
            s.step,
            s.record.attempts,
            reason,
        )

    async def after_waiting(self, s: AttemptState) -> None:
        waiting = s.record.waiting_for
        log.info("waiting task_id=%s node=%s for=%s", s.task_id, s.node, waiting.reason if waiting else "")

    async def before_released(self, s: AttemptState, error: Exception) -> None:
        log.warning("released back task_id=%s node=%s step=%s error=%s", s.task_id, s.node, s.step, error)

    async def after_succeeded(self, s: AttemptState) -> None:
        log.info("succeeded task_id=%s node=%s attempt=%d", s.task_id, s.node, s.record.attempts)

    async def after_dead_lettered(self, s: AttemptState, reason: str) -> None:
        log.warning("dead-lettered task_id=%s node=%s attempts=%d", s.task_id, s.node, s.record.attempts)


def lease_detail(leases: LeaseSet) -> str:
    tokens = leases.tokens()
    return ", ".join(
        f"{name} token {tokens[name]} after {waited:.2f}s" for name, waited in leases.waited.items()
    )
