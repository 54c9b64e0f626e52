"""Taskerman at fleet size, measured side by side in one run (`make bench`).

Starts its own nats-server and ZooKeeper, a router and one runner process serving every simulated
node, and prints, next to the targets of the scale issue:

- makespan of a rolling `test:sleep` against the ideal ceil(n/m)·T, and against Ansible-style
  batches (the next batch starts after the slowest of the current one) on the same durations;
  T fixed (one task, limit m) and T ~ U(0.5, 1.5) per node (one task per node, cluster budget m);
- dispatch latency, publish → action start, of single-node tasks, next to a raw two-hop
  JetStream relay (publish → a consumer on its own connection republishes → a consumer receives)
  on the same servers;
- fan-out: routing one task to 10,000 nodes;
- ZooKeeper requests per hand-off and per waiting node per second (the server's own counter), at
  50 and at 950 waiters of the fair semaphore;
- the runner's RSS per simulated node.

The same figures go to benchmarks/results/latest.json. `--quick` runs small sizes (the test suite
runs it to keep the benchmark working; its figures mean little on a busy machine).

    .venv/bin/python benchmarks/scale.py [--quick] [--skip makespan,dispatch,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext, api

sys.path.insert(0, str(Path(__file__).parent))
import handoff

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters
from taskcore.coord.runners import Registration
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import Slot, ZkSession
from taskcore.core import subjects
from taskcore.core.model import Task, TaskermanParams, WorkItem
from taskcore.core.settings import Settings
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.zkstats import packets_received
from taskerman_router.router import FAN_OUT_WINDOW

RESULTS = Path(__file__).parent / "results" / "latest.json"
CLUSTER = handoff.CLUSTER
SIZES = {"full": [(200, 10), (1000, 50)], "quick": [(20, 4)]}
QUICK_ONLY = "TASKERMAN_BENCH_SIZES"  # e.g. "1000x50": only these makespan sizes


def batches_makespan(durations: list[float], limit: int) -> float:
    """Ansible `serial`: consecutive batches of `limit`, each as long as its slowest node."""
    return sum(max(durations[i : i + limit]) for i in range(0, len(durations), limit))


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


class Stack:
    """Servers, a router, one runner process for every node, and a client connection."""

    def __init__(self, home: Path, nodes: list[str]) -> None:
        self.home = home
        self.nodes = nodes
        self.witness = home / "witness.jsonl"

    async def __aenter__(self) -> Stack:
        self._dirs = ExitStack()
        self.nats, self.zk = self._dirs.enter_context(handoff.servers(self.home))
        self.settings = Settings(
            **stack_secrets.generate(self.home),  # signed work items, as on `taskerman dev up`
            nats_url=self.nats.url,
            zk_hosts=self.zk.hosts,
            zk_chroot="/bench",
            home=self.home,
        )
        env = {**os.environ, **self.settings.env(), "TASKERMAN_WITNESS_FILE": str(self.witness)}
        self.procs = handoff.Processes(self.home, env)
        self._async = AsyncExitStack()
        self._async.callback(self._dirs.close)
        self._async.callback(self.procs.stop)
        self.nc = await bus.connect(self.settings, "bench")
        self._async.push_async_callback(bus.close, self.nc)
        self.js = self.nc.jetstream()
        await bus.provision(self.js, self.settings)
        self.status = StatusStore(await bus.status_bucket(self.js))
        self.zks = await self._async.enter_async_context(ZkSession.from_settings(self.settings))
        self.procs.spawn("taskerman-router")
        node_args = [a for n in self.nodes for a in ("--node", n)]
        self.procs.spawn("taskerman-runner", "--cluster", CLUSTER, *node_args)
        await handoff.wait_registered(self.zks, self.nodes, within=120)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._async.aclose()

    def runner_rss(self) -> int:
        """Resident set of the runner process, in bytes."""
        pid = self.procs.procs[1].pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


async def publish(js: JetStreamContext, task: Task) -> None:
    await bus.publish(js, subjects.GLOBAL, msgspec.json.encode(task), msg_id=task.task_id)


def sleep_task(task_id: str, nodes: list[str], limit: int, seconds: float) -> Task:
    return handoff.sleep_task(task_id, nodes, limit, seconds)


# ---- makespan -----------------------------------------------------------------------------------


async def makespan(stack: Stack, n: int, m: int, mode: str, seed: int) -> dict[str, Any]:
    nodes = stack.nodes[:n]
    tag = secrets.token_hex(3)
    rng = random.Random(seed)
    if mode == "fixed":
        await clusters.set_budget(stack.zks, CLUSTER, None)
        durations = dict.fromkeys(nodes, 0.5)
        tasks = [sleep_task(f"ms-{tag}", nodes, m, 0.5)]
    else:
        await clusters.set_budget(stack.zks, CLUSTER, m)
        durations = {node: round(rng.uniform(0.5, 1.5), 3) for node in nodes}
        tasks = [sleep_task(f"ms-{tag}-{i}", [node], 1, durations[node]) for i, node in enumerate(nodes)]
    for task in tasks:
        await publish(stack.js, task)
    total = sum(durations.values())
    await wait_witnessed(stack, {t.task_id for t in tasks}, n, within=120 + 3 * total / m)
    await handoff.wait_done(stack.status, [t.task_id for t in tasks], within=60)
    intervals = handoff.read_witness(stack.witness, {t.task_id for t in tasks})
    span = max(i["end"] for i in intervals) - min(i["start"] for i in intervals)
    in_order = [durations[node] for node in nodes]
    # fixed T: ceil(n/m)·T; varied T: instant hand-offs, nodes taken in plan order
    ideal = math.ceil(n / m) * 0.5 if mode == "fixed" else handoff.greedy_makespan(in_order, m)
    batches = batches_makespan(in_order, m)
    idle = handoff.idle_slot_delays(intervals, m)
    return {
        "n": n,
        "m": m,
        "durations": "T=0.5s" if mode == "fixed" else "T~U(0.5,1.5)s, budget m",
        "makespan_s": round(span, 3),
        "ideal_s": round(ideal, 3),
        "makespan_over_ideal": ratio(span, ideal),
        "batches_s": round(batches, 3),
        "makespan_over_batches": ratio(span, batches),
        "slot_idle_median_ms": round(statistics.median(idle) * 1000, 1) if idle else None,
        "slot_idle_p99_ms": round(handoff.percentile(idle, 99) * 1000, 1) if idle else None,
        "peak_acting": max_acting(intervals),
    }


async def wait_witnessed(stack: Stack, task_ids: set[str], count: int, within: float) -> None:
    """Until the actions themselves recorded `count` intervals: cheap to poll, where reading the
    status of a 1,000-node task every few milliseconds would load the servers being measured."""
    deadline = time.monotonic() + within
    while len(handoff.read_witness(stack.witness, task_ids)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} actions did not run within {within:.0f}s")
        await asyncio.sleep(0.2)


def max_acting(intervals: list[dict[str, Any]]) -> int:
    events = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals])
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


# ---- dispatch latency ---------------------------------------------------------------------------


async def dispatch(stack: Stack, count: int) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    latencies: list[float] = []
    await clusters.set_budget(stack.zks, CLUSTER, None)
    for i in range(count):
        node = stack.nodes[i % len(stack.nodes)]
        task = sleep_task(f"d-{tag}-{i}", [node], 1, 0.0)
        sent = time.time()
        await publish(stack.js, task)
        await handoff.wait_done(stack.status, [task.task_id], within=30)
        (interval,) = handoff.read_witness(stack.witness, {task.task_id})
        latencies.append(interval["start"] - sent)
    relay = await raw_relay(stack, count)
    p50, p99 = statistics.median(latencies), handoff.percentile(latencies, 99)
    r50, r99 = statistics.median(relay), handoff.percentile(relay, 99)
    return {
        "tasks": count,
        "p50_ms": round(p50 * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "raw_relay_p50_ms": round(r50 * 1000, 2),
        "raw_relay_p99_ms": round(r99 * 1000, 2),
        "p50_over_relay": ratio(p50, r50),
        "p99_over_relay": ratio(p99, r99),
    }


async def raw_relay(stack: Stack, count: int) -> list[float]:
    """Two JetStream hops, nothing else: publish to A; a consumer on its own connection takes it and
    publishes it to B, then acks; a third connection's consumer receives it."""
    js = stack.js
    for name in ("RELAYA", "RELAYB"):
        config = api.StreamConfig(name=name, subjects=[f"relay.{name.lower()}"], storage=api.StorageType.FILE)
        await js.add_stream(config)
    hop = await bus.connect(stack.settings, "relay-hop")
    end = await bus.connect(stack.settings, "relay-end")
    try:
        hop_js, end_js = hop.jetstream(), end.jetstream()
        a = await hop_js.pull_subscribe("relay.relaya", durable="hop")
        b = await end_js.pull_subscribe("relay.relayb", durable="end")

        async def forward() -> None:
            with contextlib.suppress(Exception):  # ends with the benchmark's connections
                while True:
                    for msg in await bus.fetch(a, 1, wait=5):
                        await hop_js.publish("relay.relayb", msg.data)
                        await msg.ack()

        forwarder = asyncio.create_task(forward())
        out: list[float] = []
        try:
            for i in range(count):
                sent = time.time()
                await js.publish("relay.relaya", f"{i}".encode())
                while not (got := await bus.fetch(b, 1, wait=5)):
                    pass
                out.append(time.time() - sent)
                await got[0].ack()
        finally:
            forwarder.cancel()
            await asyncio.gather(forwarder, return_exceptions=True)
        return out
    finally:
        await bus.close(hop)
        await bus.close(end)


# ---- fan-out ------------------------------------------------------------------------------------


async def fan_out(stack: Stack, nodes: int) -> dict[str, Any]:
    """One task over `nodes` explicit nodes whose runners are away (an away note each, as a runner
    that exited cleanly leaves it): time until every item is in WORK."""
    names = [f"far-{i:05d}" for i in range(nodes)]
    for i in range(0, nodes, 500):  # aiozk pipelines the requests of one batch
        batch = [
            Registration(stack.zks, "bench:fanout", n, "bench", [], away_grace=600)
            for n in names[i : i + 500]
        ]
        await asyncio.gather(*(r.leave() for r in batch))
    before = (await stack.js.stream_info(subjects.WORK_STREAM)).state.messages
    task = Task(
        action="test:sleep",
        cluster_name="bench:fanout",
        task_id=f"fan-{secrets.token_hex(3)}",
        nodes=tuple(names),
        taskerman_params=TaskermanParams(action_args={"seconds": 0}),
    )
    sent = time.monotonic()
    await publish(stack.js, task)
    while (await stack.js.stream_info(subjects.WORK_STREAM)).state.messages < before + nodes:
        if time.monotonic() - sent > 120:
            raise RuntimeError("fan-out did not finish in 120 s")
        await asyncio.sleep(0.01)
    took = time.monotonic() - sent
    view = await stack.status.view(task.task_id)
    await _purge_cluster(stack.js, "bench:fanout")
    raw = await raw_publishes(stack.js, task, names)
    return {
        "nodes": nodes,
        "seconds": round(took, 3),
        "recorded_nodes": len(view.nodes) if view else 0,
        "raw_publish_s": round(raw, 3),
        "over_raw": round(took / raw, 2),
    }


async def raw_publishes(js: JetStreamContext, task: Task, names: list[str]) -> float:
    """Seconds to store one work item per node in WORK with nothing else: the same payloads and
    header sizes, the router's window of publishes in flight, each acked by the server. What a
    fan-out cannot go below on this server and this disk."""
    item_task = msgspec.structs.replace(task, nodes=())
    now = time.time()
    headers = {"Taskerman-Signature": "s" * 86, "Taskerman-Key": "K" * 56}
    window = asyncio.Semaphore(FAN_OUT_WINDOW)

    async def one(position: int, name: str) -> None:
        item = WorkItem(task=item_task, node=name, routed_at=now, position=position)
        payload = msgspec.json.encode(item)
        async with window:
            await js.publish(
                subjects.node_subject("bench:raw", name),
                payload,
                headers={**headers, "Nats-Msg-Id": f"raw-{task.task_id}-{name}"},
                timeout=10,
            )

    sent = time.monotonic()
    await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))
    took = time.monotonic() - sent
    await _purge_cluster(js, "bench:raw")
    return took


async def _purge_cluster(js: JetStreamContext, cluster: str) -> None:
    await js.purge_stream(
        subjects.WORK_STREAM, subject=subjects.node_subject(cluster, "x").rsplit(".", 1)[0] + ".>"
    )


# ---- ZooKeeper cost -----------------------------------------------------------------------------


async def zk_cost(stack: Stack, waiters: int, hand_offs: int = 20, idle_s: float = 5.0) -> dict[str, Any]:
    """ZooKeeper requests per hand-off of a limit-1 semaphore with `waiters` queued, and per waiting
    node per second over `idle_s` seconds of waiting (the sessions' own pings taken out)."""
    hand_offs = min(hand_offs, waiters - 1)  # each hand-off needs one more waiter
    sessions = [ZkSession.from_settings(stack.settings) for _ in range(10)]
    for s in sessions:
        await s.__aenter__()
    try:
        base = packets_received(stack.zk.hosts)
        await asyncio.sleep(idle_s)
        pings = packets_received(stack.zk.hosts) - base  # the sessions' own liveness pings, no waiter
        sems = [FairSemaphore(s, f"/bench/zk-{waiters}", 1) for s in sessions]
        held = await sems[0].acquire("first")
        slots: asyncio.Queue[tuple[FairSemaphore, Slot]] = asyncio.Queue()

        async def waiter(i: int) -> None:
            sem = sems[i % len(sems)]
            await slots.put((sem, await sem.acquire(f"w{i}")))

        tasks = [asyncio.create_task(waiter(i)) for i in range(waiters)]
        while await sems[0].waiting() < waiters:  # noqa: ASYNC110 - polling ZooKeeper, not a local flag
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        base = packets_received(stack.zk.hosts)
        await asyncio.sleep(idle_s)
        idle = packets_received(stack.zk.hosts) - base - pings
        base = packets_received(stack.zk.hosts)
        sem, slot = sems[0], held
        for _ in range(hand_offs):
            await sem.release(slot)
            sem, slot = await slots.get()
        spent = packets_received(stack.zk.hosts) - base
        await sem.release(slot)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not slots.empty():
            sem, slot = slots.get_nowait()
            await sem.release(slot)
        return {
            "waiters": waiters,
            "requests_per_hand_off": round(spent / hand_offs, 2),
            "requests_per_waiter_per_s": round(max(idle, 0) / idle_s / waiters, 4),
            "session_pings_per_s": round(pings / idle_s, 2),
        }
    finally:
        for s in sessions:
            await s.__aexit__(None, None, None)


# ---- the run ------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    sizes = SIZES["quick" if quick else "full"]
    if only := os.environ.get(QUICK_ONLY):
        sizes = [(int(n), int(m)) for n, m in (pair.split("x") for pair in only.split(","))]
    n_max = max(n for n, _ in sizes)
    nodes = [f"node-{i:04d}" for i in range(n_max)]
    out: dict[str, Any] = {"quick": quick, "at": time.time()}
    with tempfile.TemporaryDirectory(prefix="taskerman-scale-") as tmp:
        async with Stack(Path(tmp), nodes) as stack:
            await asyncio.sleep(3)  # let the runners settle before measuring memory
            out["runner_memory"] = {
                "nodes": len(nodes),
                "rss_mb": round(stack.runner_rss() / 2**20, 1),
                "mb_per_node": round(stack.runner_rss() / 2**20 / len(nodes), 3),
            }
            report("runner memory", out["runner_memory"])
            if "zk" not in args.skip:
                idle_s = 1.0 if quick else 5.0
                waiters = (10, 50) if quick else (50, 950)
                out["zookeeper"] = [await zk_cost(stack, w, idle_s=idle_s) for w in waiters]
                for row in out["zookeeper"]:
                    report("zookeeper", row)
            if "dispatch" not in args.skip:
                out["dispatch"] = await dispatch(stack, 20 if quick else 200)
                report("dispatch", out["dispatch"])
            if "fanout" not in args.skip:
                out["fan_out"] = await fan_out(stack, 500 if quick else 10_000)
                report("fan-out", out["fan_out"])
            if "makespan" not in args.skip:
                out["makespan"] = []
                for n, m in sizes:
                    for mode in ("fixed", "uniform"):
                        row = await makespan(stack, n, m, mode, seed=n)
                        out["makespan"].append(row)
                        report("makespan", row)
    return out


def report(what: str, row: dict[str, Any]) -> None:
    print(f"{what:<14} " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


TARGETS = """targets: makespan/ideal <= 1.05 at n=1000 m=50; requests per hand-off flat (±20%) from 50 to 950
waiters; ~0 requests/s per waiting node; dispatch p50 <= 3x the raw relay and p99 <= 50 ms;
fan-out of 10,000 nodes <= 2 s (over_raw: against storing the same items with nothing else, on the
same server and disk); <= 2 MB per simulated node"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark runs")
    p.add_argument("--skip", default="", help="comma-separated: makespan,dispatch,fanout,zk")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    print(TARGETS, flush=True)
    result = asyncio.run(amain(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
