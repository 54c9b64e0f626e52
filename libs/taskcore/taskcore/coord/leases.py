"""The leases a work item holds while its node acts, all of one recipe (coord/semaphore.py), and
the set of them an item takes in the one global order.

Kinds: a task's own m-of-n slot (every holder its own owner, served in plan order), its topology
lease (owner = the node's zone, so the nodes of one zone share it; plan order), exclusion groups
(owner = task, one task of the group per cluster), global leases (owner = cluster, at most N
clusters at once) and the cluster's disruption budget (every holder its own owner). Cluster-wide
leases serve in arrival order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import Slot
from taskcore.core.errors import LeaseLost
from taskcore.core.subjects import encode_token
from taskcore.obs import tracing

log = logging.getLogger(__name__)


TASK_LEASES_ROOT = "/leases/tasks"


def lease_path(task_id: str) -> str:
    """The folder of a task's own m-of-n slots."""
    return f"{TASK_LEASES_ROOT}/{encode_token(task_id)}"


class Lease(Protocol):
    """Something a work item must hold while its node acts."""

    name: str

    async def acquire(self, max_wait: float | None) -> Slot: ...
    async def verify(self, slot: Slot) -> None: ...
    async def release(self, slot: Slot) -> None: ...


@dataclass
class QueuedLease:
    """One lease of the fair semaphore: `owner` None makes the holder its own owner (m-of-n);
    `position` is the holder's place in the queue (0: arrival order)."""

    name: str
    sem: FairSemaphore
    holder: str
    owner: str | None = None
    position: int = 0

    async def acquire(self, max_wait: float | None) -> Slot:
        sem, holder = self.sem, self.holder
        return await sem.acquire(holder, owner=self.owner, position=self.position, max_wait=max_wait)

    async def verify(self, slot: Slot) -> None:
        await self.sem.verify(slot)

    async def release(self, slot: Slot) -> None:
        await self.sem.release(slot)


@dataclass
class LeaseSet:
    """The leases one work item needs, always taken in the same global order (so two items can
    never wait on each other), verified before each step, released in reverse."""

    leases: Sequence[Lease]
    held: list[tuple[Lease, Slot]] = field(default_factory=list)
    waited: dict[str, float] = field(default_factory=dict)

    async def acquire(self, deadline: float | None = None) -> None:
        """Take every lease, waiting as long as it takes (or TimeoutError past the monotonic
        `deadline`); whatever was taken is released when the wait ends otherwise."""
        try:
            for lease in self.leases:
                started = time.monotonic()
                left = None if deadline is None else max(deadline - started, 0.001)
                with tracing.tracer(__name__).start_as_current_span(f"lease {lease.name}"):
                    slot = await lease.acquire(left)
                self.waited[lease.name] = time.monotonic() - started
                self.held.append((lease, slot))
        except BaseException:
            await asyncio.shield(self.release())
            raise

    async def verify(self) -> None:
        """Raise LeaseLost unless every lease is still ours."""
        if len(self.held) != len(self.leases):
            raise LeaseLost("not all leases are held")
        for lease, slot in self.held:
            await lease.verify(slot)

    def tokens(self) -> dict[str, int]:
        return {lease.name: slot.token for lease, slot in self.held}

    async def release(self) -> None:
        while self.held:
            lease, slot = self.held.pop()
            try:
                await lease.release(slot)
            except Exception as e:  # releases retry while our session lives; this is past that
                log.warning("lease release failed lease=%s error=%r", lease.name, e)
