"""Metrics through OpenTelemetry, exposed on a Prometheus endpoint by each service
(`TASKERMAN_METRICS_PORT`, 0 = off). Counters and histograms are recorded where things happen;
fleet-wide gauges (queue lengths, dead letters, breakers, stale runners) are sampled by the router."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


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
        self.emitted = m.create_counter("taskerman_tasks_emitted", description="tasks emitted by schedules")
        self.routed = m.create_counter("taskerman_tasks_routed", description="tasks routed to their nodes")
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
    """Fleet gauges whose values a sampler refreshes; Prometheus reads the latest sample."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        m = metrics.get_meter("taskerman")
        for name, description in (
            ("taskerman_stream_pending", "messages waiting per stream and consumer"),
            ("taskerman_dead_letters", "dead letters in the DLQ"),
            ("taskerman_breaker_open", "1 while a cluster's breaker is open"),
            ("taskerman_runner_stale", "1 for a registered runner whose heartbeat is stale"),
            ("taskerman_lease_holders", "task slots held per cluster"),
            ("taskerman_canary_age_seconds", "age of the last completed canary ping"),
        ):
            m.create_observable_gauge(name, callbacks=[self._callback(name)], description=description)

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for labels, value in self.values.get(name, {}).items():
                yield Observation(value, dict(labels))

        return observe

    def set(self, name: str, samples: dict[tuple[tuple[str, str], ...], float]) -> None:
        """Replace every sample of one gauge (labels as sorted (key, value) pairs)."""
        self.values[name] = samples
