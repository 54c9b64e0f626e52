"""Metrics through OpenTelemetry, exposed on a Prometheus endpoint by each service
(`TASKERMAN_METRICS_PORT`, 0 = off). Counters and histograms are recorded where things happen;
fleet-wide gauges (queue lengths, dead letters, breakers, stale runners, task slots held, canary age)
are sampled by every router (`FleetSampler`), so dashboards and alerts take `max` across routers.

The exporter names counters `<name>_total` and histograms `<name>_bucket|_sum|_count`; a unit of
"s" on a name already ending in `_seconds` adds nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

from taskcore.bus import queues
from taskcore.bus.tracking import StatusStore
from taskcore.coord import fleet, runners
from taskcore.coord.clusters import BreakerPolicy, BreakerStateName
from taskcore.coord.leases import TASK_LEASES_ROOT
from taskcore.coord.runners import RunnerInfo
from taskcore.coord.schedule_control import CANARY_PATH, CanaryState
from taskcore.coord.semaphore import live_owners
from taskcore.coord.session import ZkSession, read_json
from taskcore.core import subjects
from taskcore.core.errors import InvalidName

log = logging.getLogger(__name__)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
SAMPLE_SECONDS = 10.0  # how often a router refreshes the fleet gauges
SAMPLE_TIMEOUT = 5.0  # one source (a stream, a znode tree) that takes longer is left unsampled this time


STREAM_PENDING = "taskerman_stream_pending"
DEAD_LETTERS = "taskerman_dead_letters"
BREAKER_OPEN = "taskerman_breaker_open"
RUNNER_STALE = "taskerman_runner_stale"
LEASE_HOLDERS = "taskerman_lease_holders"
CANARY_AGE = "taskerman_canary_age_seconds"
GAUGES = {
    STREAM_PENDING: "messages not yet acked per stream and consumer (waiting + delivered, unacked)",
    DEAD_LETTERS: "dead letters in the DLQ",
    BREAKER_OPEN: "a cluster's breaker: 1 open, 0.5 half-open (the next attempt decides), 0 closed",
    RUNNER_STALE: "1 for a registered runner whose heartbeat is stale, 0 for a live one",
    LEASE_HOLDERS: "task slots held per cluster (nodes acting now)",
    CANARY_AGE: "seconds since the last canary ping completed end to end",
}
BREAKER_VALUE: dict[BreakerStateName, float] = {"closed": 0.0, "half-open": 0.5, "open": 1.0}

Labels = tuple[tuple[str, str], ...]
Samples = dict[Labels, float]


def setup(service_name: str, port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics on `addr:port` (when port > 0) for this process's meter provider."""
    if port <= 0 or isinstance(metrics.get_meter_provider(), MeterProvider):
        return
    from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415
    from prometheus_client import start_http_server  # noqa: PLC0415

    start_http_server(port, addr=addr)
    provider = MeterProvider(
        resource=Resource.create({"service.name": service_name}), metric_readers=[PrometheusMetricReader()]
    )
    metrics.set_meter_provider(provider)
    log.info("metrics on %s:%d/metrics", addr, port)


class Instruments:
    """The counters and histograms of the task pipeline (no-ops until `setup` installs a provider)."""

    def __init__(self) -> None:
        m = metrics.get_meter("taskerman")
        self.emitted = m.create_counter(
            "taskerman_tasks_emitted", description="tasks emitted by schedules and the canary"
        )
        self.routed = m.create_counter("taskerman_tasks_routed", description="tasks routed to their nodes")
        self.rejected = m.create_counter(
            "taskerman_tasks_rejected", description="tasks the router dead-lettered instead of routing"
        )
        self.executed = m.create_counter(
            "taskerman_items_executed", description="node items whose action started"
        )
        self.succeeded = m.create_counter(
            "taskerman_items_succeeded", description="node items that succeeded"
        )
        self.failed = m.create_counter("taskerman_items_failed", description="failed attempts")
        self.retried = m.create_counter(
            "taskerman_items_retried", description="attempts retried with backoff"
        )
        self.dead = m.create_counter("taskerman_items_dead_lettered", description="items dead-lettered")
        self.action_duration = m.create_histogram(
            "taskerman_action_duration_seconds",
            unit="s",
            description="pre_check to post_check of one attempt",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.lease_wait = m.create_histogram(
            "taskerman_lease_wait_seconds",
            unit="s",
            description="time to take all of an item's leases",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.end_to_end = m.create_histogram(
            "taskerman_end_to_end_seconds",
            unit="s",
            description="task creation to a node's success",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )


class Gauges:
    """Fleet gauges whose values a sampler refreshes; Prometheus reads the latest sample.

    A scrape runs on the exporter's HTTP thread: `set` swaps in a new dict, never mutates one."""

    def __init__(self) -> None:
        self.values: dict[str, Samples] = {}
        m = metrics.get_meter("taskerman")
        for name, description in GAUGES.items():
            m.create_observable_gauge(name, callbacks=[self._callback(name)], description=description)

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for labels, value in self.values.get(name, {}).items():
                yield Observation(value, dict(labels))

        return observe

    def set(self, name: str, samples: Samples) -> None:
        """Replace every sample of one gauge (labels as sorted (key, value) pairs)."""
        self.values[name] = samples


def labels(**pairs: str) -> Labels:
    """Gauge labels in the form `Gauges.set` keys them by."""
    return tuple(sorted(pairs.items()))


# --- samples from what was read (pure) -------------------------------------------------------------------


def pending_samples(stream: str, consumers: Iterable[ConsumerInfo]) -> Samples:
    """Per consumer: messages waiting for delivery plus delivered and not yet acked."""
    return {
        labels(stream=stream, consumer=c.name): float((c.num_pending or 0) + (c.num_ack_pending or 0))
        for c in consumers
    }


def stale_samples(runners: Iterable[RunnerInfo], now: float) -> Samples:
    return {labels(cluster=r.cluster, node=r.node): float(r.stale(now)) for r in runners}


def canary_samples(completed_at: float | None, now: float) -> Samples:
    """The age of the last completed ping; none before one completed (the series is absent)."""
    return {} if completed_at is None else {(): max(now - completed_at, 0.0)}


# --- the sampler -----------------------------------------------------------------------------------------


class FleetSampler:
    """Refreshes the fleet gauges from JetStream and ZooKeeper (without `zk`: the streams only).

    Each gauge is read on its own; one that cannot be read is cleared (a scrape shows it absent,
    not stale) and logged, except the canary age, which keeps growing from the last completion seen."""

    def __init__(
        self,
        gauges: Gauges,
        js: JetStreamContext,
        status: StatusStore,
        zk: ZkSession | None = None,
        breaker_policy: BreakerPolicy | None = None,
        *,
        every: float = SAMPLE_SECONDS,
        timeout: float = SAMPLE_TIMEOUT,
    ) -> None:
        self.gauges = gauges
        self.js = js
        self.status = status
        self.zk = zk
        self.breaker_policy = breaker_policy or BreakerPolicy()
        self.every = every
        self.timeout = timeout
        self._canary_done: float | None = None
        self._task_clusters: dict[str, str] = {}  # task id -> cluster, for the tasks holding slots
        self._runner_clusters: set[str] = set()  # the clusters of the runners registered at the last pass

    async def run(self, stop: asyncio.Event) -> None:
        """Sample now and then every `every` seconds until `stop` is set."""
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)

    async def sample(self) -> None:
        """One pass over every gauge."""
        now = time.time()
        sources: list[tuple[str, Callable[[], Awaitable[Samples]]]] = [
            (STREAM_PENDING, self._pending),
            (DEAD_LETTERS, self._dead_letters),
        ]
        if (zk := self.zk) is not None:
            sources += [
                (BREAKER_OPEN, lambda: self._breakers(zk, now)),
                (RUNNER_STALE, lambda: self._runners(zk, now)),
                (LEASE_HOLDERS, lambda: self._lease_holders(zk)),  # after RUNNER_STALE: its clusters
                (CANARY_AGE, lambda: self._canary(zk, now)),
            ]
        for name, read in sources:
            try:
                async with asyncio.timeout(self.timeout):
                    samples = await read()
            except Exception as e:
                log.warning("gauge not sampled gauge=%s error=%r", name, e)
                samples = canary_samples(self._canary_done, now) if name == CANARY_AGE else {}
            self.gauges.set(name, samples)

    async def _pending(self) -> Samples:
        samples: Samples = {}
        for stream in (subjects.TASKS_STREAM, subjects.WORK_STREAM):
            samples |= pending_samples(stream, await queues.consumers(self.js, stream))
        return samples

    async def _dead_letters(self) -> Samples:
        return {(): float(await queues.stream_messages(self.js, subjects.DEAD_STREAM))}

    async def _breakers(self, zk: ZkSession, now: float) -> Samples:
        """Every cluster whose breaker was ever recorded (a reset one reads closed)."""
        return {
            labels(cluster=b.cluster): BREAKER_VALUE[b.state]
            for b in await fleet.breakers(zk, self.breaker_policy, now)
        }

    async def _runners(self, zk: ZkSession, now: float) -> Samples:
        found = await runners.registered(zk)
        self._runner_clusters = {r.cluster for r in found}
        return stale_samples(found, now)

    async def _lease_holders(self, zk: ZkSession) -> Samples:
        """Places held in each task's lease (owners of `<root>/<task token>/h/*`, a node's
        down marker counting with its holder as one, until it expires) summed per cluster of the
        task (from the status bucket, remembered while the task holds slots); clusters with a
        registered runner and none held read 0."""
        held: dict[str, int] = {}
        now = time.time()
        for token in await fleet.children(zk, TASK_LEASES_ROOT):
            try:
                task_id = subjects.decode_token(token)  # `<token>~topology` is not a task slot
            except InvalidName:
                continue
            owners = live_owners(await fleet.children(zk, f"{TASK_LEASES_ROOT}/{token}/h"), now)
            if owners:
                held[task_id] = len(owners)
        for task_id in self._task_clusters.keys() - held.keys():
            del self._task_clusters[task_id]
        per_cluster = dict.fromkeys(self._runner_clusters, 0)
        for task_id, count in held.items():
            if task_id not in self._task_clusters:
                record = await self.status.get_task(task_id)
                if record is None or record.task is None:
                    continue
                self._task_clusters[task_id] = record.task.cluster_name
            cluster = self._task_clusters[task_id]
            per_cluster[cluster] = per_cluster.get(cluster, 0) + count
        return {labels(cluster=c): float(n) for c, n in per_cluster.items()}

    async def _canary(self, zk: ZkSession, now: float) -> Samples:
        record = await read_json(zk, CANARY_PATH, CanaryState)
        self._canary_done = record.last_completed_at if record is not None else None
        return canary_samples(self._canary_done, now)
