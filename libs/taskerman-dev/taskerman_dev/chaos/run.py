"""A chaos run: the fleet on a 3-member NATS cluster and a 3-member ZooKeeper ensemble, the
workload submitted through the scheduler's API while the nemesis breaks things, then everything
healed, the tasks left to settle, and the checker's report (`python -m taskerman_dev.chaos`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter, submission
from taskcore.bus import jetstream as bus
from taskcore.bus.queues import read_queues
from taskcore.bus.tracking import StatusStore
from taskcore.cli.leases import read_leases
from taskcore.cli.tasks import submit_via_api
from taskcore.coord import clusters, runners
from taskcore.coord.session import ZkSession
from taskcore.core.model import TASK_FINISHED, NodeStateName, Task, decode_task
from taskcore.core.settings import Settings
from taskerman_dev import secrets
from taskerman_dev.actions import PASSED_ENV, WITNESS_ENV
from taskerman_dev.chaos import checker
from taskerman_dev.chaos.checker import Final, Interval, Passed, Report, Submitted
from taskerman_dev.chaos.fleet import Service, stop_all
from taskerman_dev.chaos.nemesis import Nemesis
from taskerman_dev.chaos.proxy import ProxiedHosts
from taskerman_dev.chaos.workload import CLUSTERS, Workload, nodes_of
from taskerman_dev.launchers import NatsCluster, ZooKeeperEnsemble

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_S = TypeVar("_S", bound=msgspec.Struct)
SESSION_TIMEOUT = 6.0
SUBMIT_EVERY = 1.0
SETTLE_IDLE = 120.0  # once the faults stop, wait for the tasks to end while one ends this often
SETTLE_MAX = 900.0
UNENDED: frozenset[NodeStateName] = frozenset({"pending", "running", "retrying"})
IN_FLIGHT = 16  # tasks not yet ended: the submitter waits below this (the fleet's pace, not ours)
# a request during a failover: try again
TRANSIENT: tuple[type[Exception], ...] = (TimeoutError, nats.errors.Error, *bus.UNAVAILABLE)


async def retrying(what: str, call: Callable[[], Awaitable[_T]], attempts: int = 30) -> _T:
    """`await call()` until it does not raise a transient bus error."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except TRANSIENT as e:
            log.info("%s: %r, again", what, e)
            await asyncio.sleep(1.0)
    return await call()


class ChaosRun:
    def __init__(self, home: Path, duration: float, seed: int, every: float) -> None:
        self.home = home
        self.duration = duration
        self.seed = seed
        self.every = every
        self.witness = home / "witness.jsonl"
        self.passed = home / "passed.jsonl"
        self.nats = NatsCluster(home / "nats", size=3, users=secrets.nats_users(home))
        self.zk = ZooKeeperEnsemble(home / "zk", size=3)
        self.services: list[Service] = []
        self.began = time.monotonic()

    async def run(self) -> Report:
        self.began = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as servers:
            servers.callback(self.nats.stop)
            servers.callback(self.zk.stop)
            self.nats.start()
            self.zk.start()
            await asyncio.to_thread(self.nats.wait_ready, 60)
            await asyncio.to_thread(self.zk.wait_ready, 60)
            log.info("servers ready after %.1fs", time.monotonic() - self.began)
            os.environ[bus.REPLICAS_ENV] = "3"
            settings = Settings(
                nats_url=self.nats.urls,
                zk_hosts=self.zk.hosts,
                zk_chroot="/chaos",
                zk_session_timeout=SESSION_TIMEOUT,
                home=self.home,
                ack_wait=SESSION_TIMEOUT,
                breaker_threshold=1_000_000,  # failures are the workload's; the breaker is tested elsewhere
                **secrets.generate(self.home),  # signed work items, as every stack runs
            )
            try:
                return await self._run(settings)
            finally:
                await asyncio.to_thread(stop_all, self.services)

    async def _run(self, settings: Settings) -> Report:
        nc = await bus.connect(settings, "chaos")
        js = nc.jetstream()
        await bus.provision(js, settings)
        status = StatusStore(await bus.status_bucket(js))
        zk_via, nats_via = ProxiedHosts(settings.zk_hosts), ProxiedHosts(settings.nats_url)
        partitioned = {
            "TASKERMAN_ZK_HOSTS": await zk_via.start(),
            "TASKERMAN_NATS_URL": await nats_via.start(),
        }
        async with ZkSession.from_settings(settings) as zk:
            for cluster, budget in CLUSTERS.items():
                await clusters.set_budget(zk, cluster, budget)
            nemesis = self._start_fleet(settings, partitioned, zk_via, nats_via)
            await self._until_served(zk)
            log.info("fleet serving after %.1fs", time.monotonic() - self.began)
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(self.duration, stop.set)
            faults = asyncio.create_task(nemesis.run(stop, self.every))
            acked = await self._submit(nc, js, status, faults)
            await faults
            log.info("faults over after %.1fs, %d task(s) acked", time.monotonic() - self.began, len(acked))
            self._heal()
            finals = await self._settle(js, status, acked)
            log.info("settled after %.1fs", time.monotonic() - self.began)
            if stuck := {task_id for (task_id, _), f in finals.items() if f.state in UNENDED}:
                await self._diagnose(js, status, zk, stuck)
        await bus.close(nc)
        await asyncio.to_thread(stop_all, self.services)  # before the proxies go
        await zk_via.stop()
        await nats_via.stop()
        report = checker.check(
            acked,
            self._read(self.witness, Interval),
            self._read(self.passed, Passed),
            finals,
            CLUSTERS,
            sessions_ended=nemesis.sessions_ended,
        )
        report.faults = dict(nemesis.injected)
        return report

    def _start_fleet(
        self, settings: Settings, partitioned: dict[str, str], zk_via: ProxiedHosts, nats_via: ProxiedHosts
    ) -> Nemesis:
        """Two routers, two runners per cluster (one of them, the first, reaching ZooKeeper and
        NATS through proxies the nemesis can cut), a scheduler."""
        env = {
            **os.environ,
            **settings.env(),
            WITNESS_ENV: str(self.witness),
            PASSED_ENV: str(self.passed),
            "TASKERMAN_LOG_FORMAT": "text",
        }
        inventory = self.home / "inventory.toml"
        inventory.write_text(
            "".join(f'[clusters."{c}"]\nnodes = {json.dumps(nodes_of(c))}\n' for c in CLUSTERS)
        )

        def service(name: str, *argv: str, extra: dict[str, str] | None = None) -> Service:
            s = Service(
                name,
                list(argv),
                secrets.command_env({**env, **(extra or {})}, argv),
                self.home / f"{name}.log",
            )
            self.services.append(s)
            return s

        routers = [service(f"router-{i}", "taskerman-router", "--inventory", str(inventory)) for i in (1, 2)]
        runner_procs: list[Service] = []
        for cluster in CLUSTERS:
            conf = self.home / f"runner-{cluster}.toml"
            conf.write_text(f'cluster = "{cluster}"\naway_grace = 60\n')
            nodes = nodes_of(cluster)
            for i, half in enumerate((nodes[0::2], nodes[1::2])):
                args = [a for n in half for a in ("--node", n)]
                extra = partitioned if not runner_procs else None
                runner_procs.append(
                    service(
                        f"runner-{cluster}-{i}", "taskerman-runner", "--config", str(conf), *args, extra=extra
                    )
                )
        scheduler = service("scheduler", "taskerman-scheduler")
        for s in self.services:
            s.start()
        return Nemesis(
            random.Random(self.seed),
            runners=runner_procs,
            routers=routers,
            scheduler=scheduler,
            nats=self.nats,
            zk=self.zk,
            session_timeout=SESSION_TIMEOUT,
            partitioned=runner_procs[0],
            partitioned_zk=zk_via,
            partitioned_nats=nats_via,
        )

    async def _until_served(self, zk: ZkSession) -> None:
        deadline = time.monotonic() + 60
        for cluster in CLUSTERS:
            while await runners.unserved(zk, cluster, nodes_of(cluster), time.time()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the runners of {cluster} did not register in 60 s")
                await asyncio.sleep(0.2)

    async def _submit(
        self, nc: NATS, js: JetStreamContext, status: StatusStore, faults: asyncio.Task[None]
    ) -> list[Submitted]:
        """Submit the workload as long as the faults go on (the duration, then the end of the
        nemesis' round), through the scheduler's API (straight to the stream when no scheduler
        answers, as the CLI does); only what was acked counts."""
        workload = Workload(self.seed)
        acked = []
        in_flight: set[str] = set()
        while not faults.done():
            while len(in_flight) >= IN_FLIGHT and not faults.done():
                await asyncio.sleep(0.5)
                with contextlib.suppress(*TRANSIENT):
                    in_flight -= await self._ended(status, in_flight)
            payload, sub = workload.next()
            task = decode_task(payload)

            async def once(task: Task = task) -> submission.SubmitReply:
                reply = await submit_via_api(nc, task) or await submission.submit(
                    js, status, task, by="chaos"
                )
                if reply.retryable:
                    raise TimeoutError(reply.error)
                return reply

            with contextlib.suppress(*TRANSIENT):
                reply: submission.SubmitReply = await retrying(f"submit {sub.task_id}", once, attempts=5)
                if reply.error:
                    raise RuntimeError(f"the workload made an invalid task: {reply.error}")
                acked.append(sub)
                in_flight.add(sub.task_id)
            await asyncio.sleep(SUBMIT_EVERY)
        return acked

    def _heal(self) -> None:
        for s in self.services:
            s.resume()
            if not s.running:
                s.start()

    async def _settle(
        self, js: JetStreamContext, status: StatusStore, acked: list[Submitted]
    ) -> dict[tuple[str, str], Final]:
        """Wait for every acked task to end (while one ends every SETTLE_IDLE seconds, up to
        SETTLE_MAX), then read each node's final record and the dead letters' reasons."""
        started = progress = time.monotonic()
        pending = {t.task_id for t in acked}
        while (
            pending and time.monotonic() - progress < SETTLE_IDLE and time.monotonic() - started < SETTLE_MAX
        ):
            ended = await retrying("status", functools.partial(self._ended, status, pending))
            if ended:
                pending -= ended
                progress = time.monotonic()
            await asyncio.sleep(1.0)
        if pending:
            log.warning("%d task(s) had not ended when the wait gave up: %s", len(pending), sorted(pending))
        letters = await retrying("dead letters", lambda: deadletter.entries(js))
        reasons = {(d.task_id, d.node): d.reason for _, d in letters}
        finals: dict[tuple[str, str], Final] = {}
        for t in acked:
            view = await retrying(f"status {t.task_id}", functools.partial(status.view, t.task_id))
            for node, rec in (view.nodes if view else {}).items():
                reason = rec.error or reasons.get((t.task_id, node), "")
                finals[(t.task_id, node)] = Final(state=rec.state, reason=reason)
        return finals

    async def _diagnose(
        self, js: JetStreamContext, status: StatusStore, zk: ZkSession, stuck: set[str]
    ) -> None:
        """What the tasks that did not end were doing when the wait gave up, while the fleet still
        runs: each unended node's record, its consumer's queue, and who holds which lease
        (`stuck.json` next to the logs, for telling a slow backlog from a stuck node)."""
        views = {t: await retrying(f"status {t}", functools.partial(status.view, t)) for t in sorted(stuck)}
        nodes = {
            t: {n: msgspec.to_builtins(r) for n, r in v.nodes.items() if r.state in UNENDED}
            for t, v in views.items()
            if v is not None
        }
        names = {(v.cluster_name, n) for t, v in views.items() if v is not None for n in nodes[t]}
        queues = await retrying("queues", functools.partial(read_queues, js))
        report = {
            "nodes": nodes,
            "queues": [msgspec.to_builtins(q) for q in queues.runners if (q.cluster, q.node) in names],
            "leases": msgspec.to_builtins(await read_leases(zk, None)),
        }
        path = self.home / "stuck.json"
        path.write_text(json.dumps(report, indent=1, sort_keys=True))
        log.warning("%d unended task(s): their nodes, queues and leases in %s", len(stuck), path)

    @staticmethod
    async def _ended(status: StatusStore, task_ids: set[str]) -> set[str]:
        """Those of `task_ids` whose task has ended."""
        views = [(t, await status.view(t)) for t in sorted(task_ids)]
        return {t for t, view in views if view is not None and view.state in TASK_FINISHED}

    @staticmethod
    def _read(path: Path, kind: type[_S]) -> list[_S]:
        if not path.exists():
            return []
        return [
            msgspec.json.decode(line, type=kind) for line in path.read_bytes().splitlines() if line.strip()
        ]
