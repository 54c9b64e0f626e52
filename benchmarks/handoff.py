"""Sliding-window hand-off of a rolling `test:sleep`: how long a freed slot stays idle before the
next node starts acting, and the makespan against the ideal ceil(n/m)·T.

Starts its own nats-server and ZooKeeper in a temp dir, a router and runner processes (the installed
console scripts), then submits the rolling operation `--runs` times and reads the witness file that
`test:sleep` writes (one interval per attempt, from its start to its last successful checkpoint).

    .venv/bin/python benchmarks/handoff.py [--nodes 12] [--limit 3] [--runs 3] [--runners 1]
        [--mode task|budget] [--seconds 0.5] [--min 0.2] [--max 1.0]

Modes:
  task    one task over all nodes, `limit` = m, every node sleeping `--seconds` (test:sleep takes
          one `seconds` for all nodes of a task, so durations cannot vary within one task).
  budget  durations drawn uniformly from [--min, --max] per node: one single-node task per node,
          and the cluster's disruption budget set to m, so the window is the budget semaphore
          (the same fair semaphore recipe, plus one uncontended task slot per node).

Hand-off delay: for every interval start after the first m, start - the latest end <= start after
which fewer than m intervals were open. It covers everything between one action's last checkpoint
and the next action's start: post_check, the slot's release, the children watch firing, the waiter's
create, the status update and the lease verification before each step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters, runners
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.model import Task, TaskermanParams
from taskcore.core.settings import Settings
from taskcore.runtime import procs
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.launchers import NatsServer, ZooKeeperServer

BIN = Path(sys.executable).parent
CLUSTER = "bench:handoff"
FINAL = ("succeeded", "failed", "dead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--nodes", type=int, default=12, help="nodes in the cluster (n)")
    p.add_argument("--limit", type=int, default=3, help="nodes acting at once (m)")
    p.add_argument("--runs", type=int, default=3, help="rolling operations, one after the other")
    p.add_argument("--runners", type=int, default=1, help="runner processes sharing the nodes")
    p.add_argument("--mode", choices=("task", "budget"), default="task")
    p.add_argument("--seconds", type=float, default=0.5, help="sleep per node (task mode)")
    p.add_argument("--min", type=float, default=0.2, help="shortest sleep (budget mode)")
    p.add_argument("--max", type=float, default=1.0, help="longest sleep (budget mode)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep servers' data, logs and the witness here")
    args = p.parse_args(argv)
    if not 1 <= args.limit <= args.nodes or args.runs < 1 or not 1 <= args.runners <= args.nodes:
        p.error("need 1 <= --limit <= --nodes, --runs >= 1 and 1 <= --runners <= --nodes")
    return args


# ---- figures from the witness (pure) ----


def handoff_delays(intervals: list[dict[str, Any]], limit: int) -> list[float]:
    """Seconds from the end that freed a slot to the start that took it, for every start but the
    first `limit` (an end at t is counted before a start at t)."""
    events = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals])
    delays: list[float] = []
    open_now = starts = 0
    freed_at: float | None = None
    for t, delta in events:
        open_now += delta
        if delta < 0:
            if open_now < limit:
                freed_at = t
            continue
        starts += 1
        if starts > limit and freed_at is not None:
            delays.append(t - freed_at)
    return delays


def idle_slot_delays(intervals: list[dict[str, Any]], limit: int) -> list[float]:
    """Seconds each freed slot stayed idle before a start filled it (the earliest freed slot is
    filled first), for every start but the first `limit`. Unlike `handoff_delays` this also sees a
    slot left idle while another one was handed off promptly."""
    events = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals])
    free: deque[float] = deque()
    delays: list[float] = []
    starts = 0
    for t, delta in events:
        if delta < 0:
            free.append(t)
            continue
        starts += 1
        if starts > limit and free:
            delays.append(t - free.popleft())
    return delays


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def greedy_makespan(durations: list[float], limit: int) -> float:
    """Makespan with instant hand-offs, nodes taken in the given order."""
    slots = [0.0] * limit
    for d in durations:
        slots.sort()
        slots[0] += d
    return max(slots)


def summary(delays: list[float]) -> str:
    if not delays:
        return "no hand-offs"
    ms = [d * 1000 for d in delays]
    return (
        f"count={len(ms)} median={statistics.median(ms):.1f}ms p90={percentile(ms, 90):.1f}ms "
        f"p99={percentile(ms, 99):.1f}ms max={max(ms):.1f}ms"
    )


# ---- the stack ----


class Processes:
    """Router and runner processes, logging under `home`; SIGTERM, then SIGKILL, on the way out."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> None:
        log = (self.home / f"{name}-{len(self.procs)}.log").open("ab")
        env = stack_secrets.command_env(self.env, [name])  # each service as its NATS role
        self.procs.append(subprocess.Popen([str(BIN / name), *args], env=env, stdout=log, stderr=log))

    def stop(self) -> None:
        procs.terminate(self.procs, timeout=10)


@contextmanager
def servers(home: Path) -> Iterator[tuple[NatsServer, ZooKeeperServer]]:
    with ExitStack() as stack:
        nats = stack.enter_context(NatsServer(home / "nats", users=stack_secrets.nats_users(home)))
        zk = stack.enter_context(ZooKeeperServer(home / "zk"))
        yield nats, zk


async def wait_registered(zk: ZkSession, nodes: list[str], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        live = set(await runners.live_nodes(zk, CLUSTER))
        if live >= set(nodes):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"runners not registered within {within}s")


async def wait_done(status: StatusStore, task_ids: list[str], within: float) -> None:
    deadline = time.monotonic() + within
    pending = set(task_ids)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"tasks not finished within {within}s: {sorted(pending)}")
        for task_id in sorted(pending):
            view = await status.view(task_id)
            if view is not None and view.state in FINAL:
                if view.state != "succeeded":
                    raise RuntimeError(f"task {task_id} ended {view.state}: {view}")
                pending.discard(task_id)
        await asyncio.sleep(0.05)


def sleep_task(task_id: str, nodes: list[str], limit: int, seconds: float) -> Task:
    return Task(
        action="test:sleep",
        cluster_name=CLUSTER,
        limit=limit,
        task_id=task_id,
        nodes=tuple(nodes),
        taskerman_params=TaskermanParams(action_args={"seconds": seconds}),
    )


def read_witness(path: Path, task_ids: set[str]) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["task_id"] in task_ids]


@dataclass
class Bench:
    """What every run uses."""

    js: JetStreamContext
    status: StatusStore
    nodes: list[str]
    witness: Path


async def one_run(args: argparse.Namespace, bench: Bench, run: int) -> tuple[list[float], list[float], float]:
    """Submit one rolling operation, wait for it and print its figures."""
    js, status, nodes, witness = bench.js, bench.status, bench.nodes, bench.witness
    rng = random.Random(args.seed + run)
    tag = secrets.token_hex(3)
    if args.mode == "task":
        durations = dict.fromkeys(nodes, args.seconds)
        tasks = [sleep_task(f"handoff-{tag}", nodes, args.limit, args.seconds)]
    else:
        durations = {n: round(rng.uniform(args.min, args.max), 3) for n in nodes}
        tasks = [sleep_task(f"handoff-{tag}-{i}", [n], 1, durations[n]) for i, n in enumerate(nodes)]
    submitted = time.time()
    for task in tasks:
        await bus.publish(js, subjects.GLOBAL, msgspec.json.encode(task), msg_id=task.task_id)
    total = sum(durations.values())
    await wait_done(status, [t.task_id for t in tasks], within=60 + 4 * total)
    intervals = read_witness(witness, {t.task_id for t in tasks})
    if len(intervals) != len(nodes):
        print(f"  note: {len(intervals)} intervals for {len(nodes)} nodes (retries happened)")
    delays = handoff_delays(intervals, args.limit)
    idle = idle_slot_delays(intervals, args.limit)
    first = min(i["start"] for i in intervals)
    last = max(i["end"] for i in intervals)
    makespan = last - first
    if args.mode == "task":
        ideal = math.ceil(len(nodes) / args.limit) * args.seconds
        ideal_text = f"ideal ceil(n/m)·T={ideal:.3f}s"
    else:
        order = [i["node"] for i in sorted(intervals, key=lambda i: i["start"])]
        ideal = greedy_makespan([durations[n] for n in order], args.limit)
        bound = max(total / args.limit, *durations.values())
        mean_ideal = math.ceil(len(nodes) / args.limit) * statistics.mean(durations.values())
        ideal_text = (
            f"ideal (instant hand-offs, same order)={ideal:.3f}s lower bound={bound:.3f}s "
            f"ceil(n/m)·mean T={mean_ideal:.3f}s"
        )
    print(
        f"run {run}: makespan {makespan:.3f}s ({makespan / ideal:.3f}× {ideal_text}); "
        f"submit→first start {(first - submitted) * 1000:.0f}ms\n"
        f"  hand-off (start - latest freeing end): {summary(delays)}\n"
        f"  slot idle (freed slot - start filling it): {summary(idle)}"
    )
    return delays, idle, makespan / ideal


async def amain(args: argparse.Namespace) -> int:
    nodes = [f"node-{i:02d}" for i in range(1, args.nodes + 1)]
    with ExitStack() as dirs:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            home = args.workdir.resolve()
        else:
            home = Path(dirs.enter_context(tempfile.TemporaryDirectory(prefix="taskerman-bench-")))
        nats, zk = dirs.enter_context(servers(home))
        settings = Settings(
            **stack_secrets.generate(home),  # signed work items, as on `taskerman dev up`
            nats_url=nats.url,
            zk_hosts=zk.hosts,
            zk_chroot="/bench",
            home=home,
        )
        witness = home / "witness.jsonl"
        env = {**os.environ, **settings.env(), "TASKERMAN_WITNESS_FILE": str(witness)}
        procs = Processes(home, env)
        async with AsyncExitStack() as stack:
            stack.callback(procs.stop)
            nc = await bus.connect(settings, "bench")
            stack.push_async_callback(bus.close, nc)
            js = nc.jetstream()
            await bus.provision(js, settings)
            status = StatusStore(await bus.status_bucket(js))
            zks = await stack.enter_async_context(ZkSession.from_settings(settings))
            await clusters.set_budget(zks, CLUSTER, args.limit if args.mode == "budget" else None)
            procs.spawn("taskerman-router")
            for k in range(args.runners):
                served = nodes[k :: args.runners]
                node_args = [a for n in served for a in ("--node", n)]
                procs.spawn("taskerman-runner", "--cluster", CLUSTER, *node_args)
            await wait_registered(zks, nodes)
            what = f"T={args.seconds}s" if args.mode == "task" else f"T~U[{args.min},{args.max}]s"
            print(
                f"hand-off benchmark: n={args.nodes} m={args.limit} {what} mode={args.mode} "
                f"runners={args.runners} runs={args.runs}"
            )
            bench = Bench(js=js, status=status, nodes=nodes, witness=witness)
            handoffs: list[float] = []
            idles: list[float] = []
            ratios: list[float] = []
            for run in range(1, args.runs + 1):
                delays, idle, ratio = await one_run(args, bench, run)
                handoffs += delays
                idles += idle
                ratios.append(ratio)
            print(
                f"all {args.runs} runs: makespan/ideal median={statistics.median(ratios):.3f} "
                f"max={max(ratios):.3f}\n"
                f"  hand-off (start - latest freeing end): {summary(handoffs)}\n"
                f"  slot idle (freed slot - start filling it): {summary(idles)}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
