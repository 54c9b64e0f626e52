"""The Prometheus endpoints of real router, runner and scheduler processes, scraped over HTTP: the
counters move as the tasks go, the histograms get samples, and the router's sampler fills the
fleet gauges from JetStream and ZooKeeper."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters
from taskcore.coord.clusters import BreakerState
from taskcore.coord.leases import lease_path
from taskcore.coord.runners import RunnerInfo, node_path
from taskcore.coord.schedule_control import CANARY_PATH
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession, update_json
from taskcore.core import subjects
from taskcore.core.model import TASK_FINISHED, Task, TaskRecord
from taskcore.core.settings import Settings
from taskcore.obs import metrics
from taskerman_dev.launchers import free_ports

from .conftest import Stack, publish_raw, task_json, wait_final

NODES = ["n1", "n2", "n3", "n4"]
SAMPLE = "0.3"  # seconds between the router's samples of the fleet gauges
ACTION = "test:sleep"
SLEEP = 0.8


class Scrape:
    """One scrape of a /metrics endpoint: sample name and labels → value."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
        ]

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def series(self, name: str, **labels: str) -> list[float]:
        """Values of every series of `name` whose labels include `labels`."""
        return [v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the matching series (0 when there is none, as for a counter never moved)."""
        return sum(self.series(name, **labels))

    def one(self, name: str, **labels: str) -> float | None:
        """The value of the one matching series, None when there is none."""
        found = self.series(name, **labels)
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None


def _get(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except (urllib.error.URLError, OSError):
        return None  # not listening yet


async def scrape(port: int) -> Scrape | None:
    text = await asyncio.to_thread(_get, port)
    return None if text is None else Scrape(text)


async def wait_scrape(
    port: int, check: Callable[[Scrape], bool], stack: Stack, what: str, within: float = 30
) -> Scrape:
    """Scrape until `check` holds for a scrape; that scrape."""
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = await scrape(port)
        if last is not None and check(last):
            return last
        await asyncio.sleep(0.2)
    taskerman = sorted(str(s) for s in (last.samples if last else []) if s[0].startswith("taskerman_"))
    raise AssertionError(f"{what}: not seen on :{port} in {within}s; last: {taskerman}\n{stack.logs()}")


@pytest.fixture
async def zk(settings: Settings) -> AsyncIterator[ZkSession]:
    async with ZkSession.from_settings(settings) as session:
        yield session


def metrics_env(port: int) -> dict[str, str]:
    return {"TASKERMAN_METRICS_PORT": str(port), "TASKERMAN_SAMPLE_INTERVAL": SAMPLE}


def test_taskcore_reads_where_the_scheduler_and_runner_write() -> None:
    """taskcore may not import them, so the paths are repeated there."""
    assert metrics.CANARY_PATH == CANARY_PATH
    assert lease_path("x").rpartition("/")[0] == metrics.TASK_LEASES_ROOT


async def test_counters_histograms_and_stream_gauges(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    router_port, runner_port = free_ports(2)
    stack.router({"c1": NODES}, extra_env=metrics_env(router_port))
    runner = stack.runner("c1", NODES, extra_env=metrics_env(runner_port), away_grace=600)
    labels = {"cluster": "c1", "action": ACTION}

    # a rolling task: 4 nodes, 2 at a time; the router's gauge sees the 2 task slots held
    await publish_raw(
        js[1],
        task_json(
            action=ACTION,
            cluster_name="c1",
            limit=2,
            task_id="roll-1",
            taskerman_params={"action_args": {"seconds": SLEEP}},
        ),
    )
    holders: list[float] = []
    deadline = time.monotonic() + 60
    while (view := await status.view("roll-1")) is None or view.state not in TASK_FINISHED:
        assert time.monotonic() < deadline, stack.logs()
        got = await scrape(router_port)
        if got is not None and (held := got.one("taskerman_lease_holders", cluster="c1")) is not None:
            holders.append(held)
        await asyncio.sleep(0.1)
    assert view.state == "succeeded", view
    assert max(holders) == 2, holders  # the limit, reached and never passed

    # a failing task: one node, 1 retry, so 2 failed attempts and a dead letter
    await publish_raw(
        js[1],
        task_json(
            action=ACTION,
            cluster_name="c1",
            nodes=["n1"],
            task_id="fail-1",
            taskerman_params={
                "action_args": {"seconds": 0.05, "fail": True},
                "workqueue_args": {"retry_count": 1, "backoff": 0.1},
            },
        ),
    )
    assert (await wait_final(status, "fail-1", stack=stack)).state == "dead"

    def runner_settled(s: Scrape) -> bool:
        return s.value("taskerman_items_dead_lettered_total", **labels) == 1

    ran = await wait_scrape(runner_port, runner_settled, stack, "the runner's counters")
    executed = ran.value("taskerman_items_executed_total", **labels)
    succeeded = ran.value("taskerman_items_succeeded_total", **labels)
    failed = ran.value("taskerman_items_failed_total", **labels)
    assert (executed, succeeded, failed) == (6, 4, 2)
    assert executed == succeeded + failed
    assert ran.series("taskerman_items_failed_total", step="execute_action", **labels) == [2]
    assert ran.value("taskerman_items_retried_total", **labels) == 1
    # histograms: a sample per success (action, end to end) or per attempt started (lease wait)
    assert ran.value("taskerman_action_duration_seconds_count", **labels) == 4
    assert ran.value("taskerman_action_duration_seconds_bucket", le="0.5", **labels) == 0  # each slept 0.8 s
    assert ran.value("taskerman_action_duration_seconds_sum", **labels) >= 4 * SLEEP
    assert ran.value("taskerman_end_to_end_seconds_count", **labels) == 4
    assert ran.value("taskerman_lease_wait_seconds_count", **labels) == 5  # the retry kept its leases
    assert ran.value("taskerman_lease_wait_seconds_bucket", le="+Inf", **labels) == 5
    assert "taskerman_action_duration_seconds_seconds_count" not in ran.names()  # no doubled unit

    # the router: routed counts, then the gauges after a sampler cycle
    consumers = [subjects.runner_durable("c1", n) for n in NODES]

    def router_settled(s: Scrape) -> bool:
        return (
            s.one("taskerman_dead_letters") == 1
            and s.one("taskerman_lease_holders", cluster="c1") == 0  # the dead node has let go
            and all(s.one("taskerman_stream_pending", stream="WORK", consumer=c) == 0 for c in consumers)
        )

    routed = await wait_scrape(router_port, router_settled, stack, "a dead letter, no holder, no backlog")
    assert routed.value("taskerman_tasks_routed_total", **labels) == 2
    assert routed.value("taskerman_tasks_rejected_total") == 0
    assert routed.one("taskerman_stream_pending", stream="TASKS", consumer=subjects.ROUTER_DURABLE) == 0
    assert routed.one("taskerman_breaker_open", cluster="c1") == 0  # 2 failures, below the threshold
    for node in NODES:
        assert routed.one("taskerman_runner_stale", cluster="c1", node=node) == 0
    assert routed.series("taskerman_canary_age_seconds") == []  # no scheduler, no canary
    assert "taskerman_items_executed_total" not in routed.names()  # the runners' counters stay theirs

    # an invalid task is rejected by the router and dead-lettered
    await publish_raw(js[1], task_json(action="no:such-action", cluster_name="c1", task_id="bad-1"))
    rejected = await wait_scrape(
        router_port,
        lambda s: (
            s.value("taskerman_tasks_rejected_total", reason="invalid") == 1
            and s.one("taskerman_dead_letters") == 2
        ),
        stack,
        "the rejected task",
    )
    assert rejected.value("taskerman_tasks_routed_total") == 2

    # with the runner gone, an item waits in its node's queue; the runner deregisters
    runner.send_signal(signal.SIGTERM)
    await asyncio.to_thread(runner.wait, 15)
    await publish_raw(
        js[1],
        task_json(
            action=ACTION,
            cluster_name="c1",
            nodes=["n2"],
            task_id="waits-1",
            taskerman_params={"action_args": {"seconds": 0}},
        ),
    )
    waiting = await wait_scrape(
        router_port,
        lambda s: s.one("taskerman_stream_pending", stream="WORK", consumer=consumers[1]) == 1,
        stack,
        "an item pending for n2",
    )
    assert waiting.one("taskerman_stream_pending", stream="WORK", consumer=consumers[0]) == 0
    assert waiting.series("taskerman_runner_stale", cluster="c1") == []


async def test_zookeeper_gauges_and_the_canary(
    stack: Stack, settings: Settings, status: StatusStore, zk: ZkSession
) -> None:
    router_port, runner_port, scheduler_port = free_ports(3)
    # a cool-down, so that a breaker opened long enough ago reads half-open
    stack.router({"c1": ["n1"]}, extra_env={**metrics_env(router_port), "TASKERMAN_BREAKER_COOLDOWN": "300"})
    stack.runner("c1", ["n1"], extra_env=metrics_env(runner_port))
    stack.spawn(
        "taskerman-scheduler",
        "--canary-cluster",
        "c1",
        "--canary-every",
        "1",
        extra_env=metrics_env(scheduler_port),
    )

    # what the gauges read, set as a failing fleet would leave it
    now = time.time()
    await clusters.Breaker(zk, "c2", clusters.BreakerPolicy()).record_failure("test", trip=True)
    await update_json(
        zk,
        clusters.cluster_path("c3", "breaker"),
        BreakerState,
        lambda _s: BreakerState(state="open", opened_at=now - 600, reason="long ago"),
    )
    ghost = RunnerInfo(
        cluster="c1", node="ghost", pid=1, version="0", actions=(), since=now - 100, heartbeat=now - 100
    )
    await zk.client.ensure_path("/registry/c1")
    await zk.client.create(node_path("c1", "ghost"), data=msgspec.json.encode(ghost), ephemeral=True)
    task = Task(action=ACTION, cluster_name="c2", limit=2, task_id="held-1")
    await status.put_task("held-1", TaskRecord(task=task, state="routed", created_at=now))
    slot = await FairSemaphore(zk, lease_path("held-1"), 2).acquire("n9")

    def sampled(s: Scrape) -> bool:
        return (
            s.one("taskerman_canary_age_seconds") is not None
            and s.one("taskerman_runner_stale", cluster="c1", node="n1") == 0
            and s.one("taskerman_lease_holders", cluster="c2") == 1
        )

    fleet = await wait_scrape(router_port, sampled, stack, "the canary and ZooKeeper gauges", within=60)
    assert fleet.one("taskerman_breaker_open", cluster="c2") == 1
    assert fleet.one("taskerman_breaker_open", cluster="c3") == 0.5  # half-open
    assert fleet.one("taskerman_breaker_open", cluster="c1") is None  # never recorded
    assert fleet.one("taskerman_runner_stale", cluster="c1", node="ghost") == 1
    # a registered runner: the gauge is there, 0 or the canary ping's slot (every second on n1)
    assert fleet.one("taskerman_lease_holders", cluster="c1") in (0, 1)
    age = fleet.one("taskerman_canary_age_seconds")
    assert age is not None
    assert 0 <= age < 30

    emitted = await wait_scrape(
        scheduler_port,
        lambda s: s.value("taskerman_tasks_emitted_total", schedule="(canary)") >= 1,
        stack,
        "the canary pings emitted",
    )
    assert emitted.series("taskerman_tasks_routed_total") == []

    # a reset breaker reads closed; with its slot released, c2 (no runner registered) has no series
    await FairSemaphore(zk, lease_path("held-1"), 2).release(slot)
    await clusters.Breaker(zk, "c2", clusters.BreakerPolicy()).reset()
    await wait_scrape(
        router_port,
        lambda s: (
            s.one("taskerman_breaker_open", cluster="c2") == 0
            and s.one("taskerman_lease_holders", cluster="c2") is None
        ),
        stack,
        "the reset breaker and the released slot",
    )
