"""The nemesis: one fault at a time, in turn through every kind, each healed before the next.

Kinds: a runner killed -9 (and started again), a runner paused shorter and longer than the
ZooKeeper session timeout (its leases expire while it is frozen), a router or the scheduler killed
-9, a nats-server killed -9 (the one with most clients: it usually leads streams), the JetStream
meta leader killed -9, the ZooKeeper leader killed -9, and one runner partitioned from ZooKeeper
(shorter or longer than the session timeout) or from NATS, by cutting the proxies it connects
through (proxy.py). Servers come back on their ports and data."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from taskerman_dev.chaos.checker import SessionEnded
from taskerman_dev.chaos.fleet import Service
from taskerman_dev.chaos.proxy import ProxiedHosts
from taskerman_dev.launchers import NatsCluster, ZooKeeperEnsemble

log = logging.getLogger(__name__)
KINDS = (
    "runner-kill",
    "runner-pause",
    "runner-pause-long",
    "router-kill",
    "scheduler-kill",
    "nats-kill",
    "zk-leader-kill",
    "partition-runner-zk",
    "nats-meta-leader-kill",
    "partition-runner-nats",
)


class Nemesis:
    def __init__(
        self,
        rng: random.Random,
        *,
        runners: list[Service],
        routers: list[Service],
        scheduler: Service,
        nats: NatsCluster,
        zk: ZooKeeperEnsemble,
        session_timeout: float,
        partitioned: Service,
        partitioned_zk: ProxiedHosts,
        partitioned_nats: ProxiedHosts,
    ) -> None:
        """`partitioned` is the runner that reaches ZooKeeper and NATS through the proxies."""
        self.rng = rng
        self.runners = runners
        self.routers = routers
        self.scheduler = scheduler
        self.nats = nats
        self.zk = zk
        self.session_timeout = session_timeout
        self.injected: Counter[str] = Counter()
        # what ended a runner process' ZooKeeper session (for the checker: such a runner's leases
        # are gone, whatever it was doing); a session is given up at 75 % of its timeout
        self.sessions_ended: list[SessionEnded] = []
        self._gives_up = 0.75 * session_timeout
        self._partitioned = partitioned
        self._zk_cut = partitioned_zk
        self._faults: dict[str, Callable[[], Awaitable[None]]] = {
            "runner-kill": lambda: self._kill(self.rng.choice(self.runners)),
            "runner-pause": lambda: self._pause(self.rng.choice(self.runners), self.rng.uniform(0.5, 2.5)),
            "runner-pause-long": lambda: self._pause(
                self.rng.choice(self.runners), self.session_timeout + self.rng.uniform(1.0, 3.0)
            ),
            "router-kill": lambda: self._kill(self.rng.choice(self.routers)),
            "scheduler-kill": lambda: self._kill(self.scheduler),
            "nats-kill": self._nats_kill,
            "zk-leader-kill": self._zk_leader_kill,
            "partition-runner-zk": lambda: self._cut_zk(self.rng.uniform(1.0, session_timeout + 3.0)),
            "nats-meta-leader-kill": self._nats_meta_leader_kill,
            "partition-runner-nats": lambda: partitioned_nats.cut(self.rng.uniform(1.0, 8.0)),
        }

    async def run(self, stop: asyncio.Event, every: float) -> None:
        """Inject faults, KINDS in turn, `every` seconds apart, until `stop`; a round of every kind
        is always completed, so every kind is injected as often as every other."""
        turn = 0
        while turn % len(KINDS) or not stop.is_set():
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            log.info("fault %s", kind)
            await self._faults[kind]()
            self.injected[kind] += 1
            if turn % len(KINDS) == 0:  # the end of a round: stop if it is time
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
            else:
                await asyncio.sleep(every)

    def _ended(self, kind: str, service: Service, start: float, seconds: float) -> None:
        if service.proc is not None and seconds >= self._gives_up:
            self.sessions_ended.append(
                SessionEnded(kind=kind, pid=service.proc.pid, start=start, end=start + seconds)
            )

    async def _cut_zk(self, seconds: float) -> None:
        self._ended("partition-runner-zk", self._partitioned, time.time(), seconds)
        await self._zk_cut.cut(seconds)

    async def _kill(self, service: Service) -> None:
        if service in self.runners:
            self._ended("runner-kill", service, time.time(), float("inf"))
        await asyncio.to_thread(service.kill)
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        await asyncio.to_thread(service.start)

    async def _pause(self, service: Service, seconds: float) -> None:
        self._ended("runner-pause", service, time.time(), seconds)
        service.pause()
        await asyncio.sleep(seconds)
        service.resume()

    async def _nats_kill(self) -> None:
        def score(member: Any) -> int:
            connz: dict[str, Any] = member.monitor("/connz") or {}
            return int(connz.get("num_connections", 0))

        await self._nats_restart(max((m for m in self.nats.servers if m.running), key=score))

    async def _nats_meta_leader_kill(self) -> None:
        running = [m for m in self.nats.servers if m.running]
        leader = next((name for m in running if (name := m.meta_leader())), None)
        await self._nats_restart(self.nats.member(leader) if leader else self.rng.choice(running))

    async def _nats_restart(self, victim: Any) -> None:
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        await asyncio.to_thread(victim.restart, 60)
        await asyncio.to_thread(self.nats.wait_ready, 60)

    async def _zk_leader_kill(self) -> None:
        victim = self.zk.leader()
        if victim is None:
            return
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        await asyncio.to_thread(victim.restart, 60)
        await asyncio.to_thread(self.zk.wait_ready, 60)
