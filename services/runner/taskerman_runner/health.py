"""A node that is down counts against its cluster's disruption budget, as a PodDisruptionBudget
counts an unhealthy pod: the runner probes its node (`[health]` in the node config: a tcp, http or
command probe, `every` seconds) while it has no item in hand, and after `failures` failed probes
in a row it occupies a budget slot for the node (`FairSemaphore.occupy`, owner the node, holder
`(down)/<node>`), until a probe passes again. The slot is an ephemeral node of the runner's
session: a runner that dies takes it along (its node is then unserved, which the router sees).

Its own repair is not held back: the budget counts nodes, so an item for the down node joins the
slot it occupies. While an item is in hand the node is not probed (an action restarting it makes
it fail on purpose, and it holds its budget slot then anyway)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Annotated

import msgspec

from taskcore.bus.audit import Audit
from taskcore.coord import clusters
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import Slot, ZkSession
from taskcore.core import subjects
from taskcore.packs.common import Probe, ProbeFailed, Seconds, probe_once

log = logging.getLogger(__name__)


class HealthCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[health]` of a node config: how to tell the node is up, how often, after how many failures
    in a row it counts as down."""

    probe: Probe
    every: Seconds = 10.0
    failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2


class HealthWatch:
    """Probes one node and keeps its budget slot while it is down."""

    def __init__(
        self,
        zk: ZkSession,
        audit: Audit,
        *,
        cluster: str,
        node: str,
        check: HealthCheck,
        busy: Callable[[], bool],
    ) -> None:
        self.zk = zk
        self.audit = audit
        self.cluster = cluster
        self.node = node
        self.check = check
        self.busy = busy  # an item is in hand: do not probe
        self.sem = FairSemaphore(zk, clusters.cluster_path(cluster, "budget"), 1)  # the limit is not used
        self.slot: Slot | None = None
        self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.look()
                except Exception as e:  # ZooKeeper away: look again next time
                    log.warning("health look failed node=%s error=%r", self.node, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.check.every)
        finally:
            await asyncio.shield(self._up("runner stopping"))

    async def look(self) -> None:
        """One probe and what follows from it."""
        if self.busy():
            return
        try:
            await probe_once(self.check.probe)
        except ProbeFailed as e:
            self.failed += 1
            if self.failed >= self.check.failures:
                await self._down(str(e))
            return
        self.failed = 0
        await self._up("probe passed")

    async def _down(self, why: str) -> None:
        if self.slot is not None and self.slot.session_id == self.zk.session_id:
            return  # held already (by this session: a new one lost it)
        owner = subjects.encode_token(self.node)
        self.slot = await self.sem.occupy(clusters.down_holder(self.node), owner)
        log.warning("node down: it takes a budget slot node=%s why=%s", self.node, why)
        await self.audit.record("node-down", cluster=self.cluster, node=self.node, detail=why)

    async def _up(self, why: str) -> None:
        slot, self.slot = self.slot, None
        if slot is None:
            return
        await self.sem.release(slot)
        log.info("node up: its budget slot is free node=%s", self.node)
        await self.audit.record("node-up", cluster=self.cluster, node=self.node, detail=why)
