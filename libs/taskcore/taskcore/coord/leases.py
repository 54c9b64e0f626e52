"""The leases a work item holds while its node acts, all of one recipe (coord/semaphore.py), and
the set of them an item takes in the one global order.

Kinds: a task's own m-of-n slot (owner = the node, served in plan order), its topology
lease (owner = the node's zone, so the nodes of one zone share it; plan order), exclusion groups
(owner = task, one task of the group per cluster), global leases (owner = cluster, at most N
clusters at once) and the cluster's disruption budget (owner = the node). Cluster-wide leases
serve in arrival order. A failed node keeps every lease it held with down markers until its retry
ends (`LeaseSet.mark_down`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from taskcore.coord.semaphore import FairSemaphore, HolderNode, read_holders
from taskcore.coord.session import Slot, ZkSession
from taskcore.core.errors import InvalidName, LeaseLost
from taskcore.core.subjects import decode_token, encode_token
from taskcore.obs import tracing

log = logging.getLogger(__name__)


TASK_LEASES_ROOT = "/leases/tasks"
FRESH = 1.0  # seconds after an acquisition during which the session check stands for a verification
TASK_SEP = "/"  # between the task's token and the node in a holder id; never in an encoded token


def lease_path(task_id: str) -> str:
    """The folder of a task's own m-of-n slots."""
    return f"{TASK_LEASES_ROOT}/{encode_token(task_id)}"


def shared_holder(task_id: str, node: str) -> str:
    """The holder name of a lease that several tasks share (the cluster's budget, an exclusion
    group, a global lease): `<task token>/<node>`, so that whoever waits for it can name the task
    holding it. A task's own leases name only the node: the task is in their path."""
    return f"{encode_token(task_id)}{TASK_SEP}{node}"


def holder_parts(holder: str) -> tuple[str | None, str]:
    """(task or None, node) of a holder id `[<task token>/]<node>#<uid>`."""
    name = holder.rsplit("#", 1)[0]
    token, sep, node = name.partition(TASK_SEP)
    if sep:
        try:
            return decode_token(token), node
        except InvalidName:
            pass  # a node name with a `/` in it, held by its node alone
    return None, name


class Lease(Protocol):
    """Something a work item must hold while its node acts."""

    name: str

    @property
    def limit(self) -> int: ...

    async def acquire(
        self, max_wait: float | None, on_blocked: Callable[[], Awaitable[None]] | None = None
    ) -> Slot: ...
    async def verify(self, slot: Slot) -> None: ...
    async def release(self, slot: Slot, down: Sequence[str] = ()) -> None: ...
    async def holders(self) -> list[HolderNode]: ...
    async def mark_down(self, slot: Slot, until: float) -> str | None: ...
    async def clear_down(self, keep: Sequence[str] = ()) -> None: ...
    async def drop_down(self, paths: Sequence[str]) -> None: ...


@dataclass
class QueuedLease:
    """One lease of the fair semaphore, held by `holder` as `owner` (an encoded token: every
    holder of one owner counts once); `position` is the holder's place in the queue (0: arrival
    order)."""

    name: str
    sem: FairSemaphore
    holder: str
    owner: str
    position: int = 0

    @property
    def limit(self) -> int:
        return self.sem.limit

    async def acquire(
        self, max_wait: float | None, on_blocked: Callable[[], Awaitable[None]] | None = None
    ) -> Slot:
        sem, holder = self.sem, self.holder
        return await sem.acquire(
            holder, owner=self.owner, position=self.position, max_wait=max_wait, on_blocked=on_blocked
        )

    async def verify(self, slot: Slot) -> None:
        await self.sem.verify(slot)

    async def release(self, slot: Slot, down: Sequence[str] = ()) -> None:
        await self.sem.release(slot, down)

    async def holders(self) -> list[HolderNode]:
        return await read_holders(self.sem.zk, self.sem.path)

    async def mark_down(self, slot: Slot, until: float) -> str | None:
        return await self.sem.mark_down(slot, until)

    async def clear_down(self, keep: Sequence[str] = ()) -> None:
        await self.sem.clear_down(self.holder, self.owner, keep)

    async def drop_down(self, paths: Sequence[str]) -> None:
        await self.sem.delete_markers(paths)


@dataclass
class LeaseSet:
    """The leases one work item needs, always taken in the same global order (so two items can
    never wait on each other), verified before each step, released in reverse."""

    leases: Sequence[Lease]
    held: list[tuple[Lease, Slot]] = field(default_factory=list)
    waited: dict[str, float] = field(default_factory=dict)
    taken_at: float | None = None  # monotonic, when the last lease was granted; None once verified
    down: dict[str, str] = field(default_factory=dict)  # lease name → its marker made last (`mark_down`)

    async def acquire(
        self,
        deadline: float | None = None,
        on_blocked: Callable[[Lease], Awaitable[None]] | None = None,
    ) -> None:
        """Take every lease, waiting as long as it takes (or TimeoutError past the monotonic
        `deadline`); whatever was taken is released when the wait ends otherwise. `on_blocked` is
        awaited with a lease that is not granted at once, before its wait begins: the attempt
        says there which lease its node waits for."""
        try:
            for lease in self.leases:
                started = time.monotonic()
                left = None if deadline is None else max(deadline - started, 0.001)
                blocked = None if on_blocked is None else functools.partial(on_blocked, lease)
                with tracing.tracer(__name__).start_as_current_span(f"lease {lease.name}"):
                    slot = await lease.acquire(left, blocked)
                self.waited[lease.name] = time.monotonic() - started
                self.held.append((lease, slot))
            self.taken_at = time.monotonic()
        except BaseException:
            await asyncio.shield(self.release())
            raise

    async def verify(self, zk: ZkSession | None = None) -> None:
        """Raise LeaseLost unless every lease is still ours (a sync and a read per lease, every lease
        at once). With `zk`, the first verification within FRESH seconds of the acquisition is the
        `checkpoint` instead (the session that took the slots is still the trusted one): the step
        right after the wait does not ask ZooKeeper again what it has just answered."""
        fresh = self.taken_at is not None and time.monotonic() - self.taken_at < FRESH
        self.taken_at = None
        if zk is not None and fresh:
            self.checkpoint(zk)
            return
        if len(self.held) != len(self.leases):
            raise LeaseLost("not all leases are held")
        checks = [lease.verify(slot) for lease, slot in self.held]
        for outcome in await asyncio.gather(*checks, return_exceptions=True):  # one wait, not one per lease
            if isinstance(outcome, BaseException):
                raise outcome

    def tokens(self) -> dict[str, int]:
        return {lease.name: slot.token for lease, slot in self.held}

    def checkpoint(self, zk: ZkSession) -> None:
        """Raise LeaseLost unless the session can be trusted right now and it is the session that
        took every slot (aiozk may silently open a new one: the old one's slots are gone with it).
        No round trip: cheap enough before every side effect."""
        zk.check()
        if len(self.held) != len(self.leases):
            raise LeaseLost("not all leases are held")
        for lease, slot in self.held:
            if slot.session_id != zk.session_id:
                raise LeaseLost(
                    f"lease {lease.name} was taken by session {slot.session_id}, now {zk.session_id}"
                )

    async def mark_down(self, until: float) -> list[str]:
        """The node may be half-done until `until` (epoch seconds): it is about to act, its action
        failed and its retry is due, or its session went while it acted. Every held lease gets a
        down marker, which holds the node's place even if our session goes (a runner dead in the
        backoff, or frozen while it acts); the markers this set made before are deleted after the
        new ones exist, so the place is never left open. `release` leaves them unless the item
        ended well; else they go when the item ends (`clear_down`) or expire. Returns the names of
        the leases whose place somebody else took meanwhile (no marker there)."""
        made = await asyncio.gather(*(lease.mark_down(slot, until) for lease, slot in self.held))
        lost, stale = [], []
        for (lease, _), marker in zip(self.held, made, strict=True):
            if marker is None:
                lost.append(lease.name)  # a marker made before, if any, no longer counts
                continue
            if (old := self.down.get(lease.name)) is not None:
                stale.append((lease, old))
            self.down[lease.name] = marker
        await asyncio.gather(*(lease.drop_down([old]) for lease, old in stale))
        return lost

    async def clear_down(self, keep: Sequence[str] = ()) -> None:
        """Delete this item's down markers on every lease (a runner before us may have made them),
        but those in `keep`."""
        await asyncio.gather(*(lease.clear_down(keep) for lease in self.leases))

    async def release(self, ended: bool = False) -> None:
        """Give every lease back, in reverse order. The down markers stay (the node may be down;
        they go when the item ends, `clear_down`), unless the item `ended` well: then the markers
        made last go with each lease, in the same transaction."""
        down, self.down = (self.down, {}) if ended else ({}, self.down)
        while self.held:
            lease, slot = self.held.pop()
            try:
                await lease.release(slot, [down[lease.name]] if lease.name in down else [])
            except Exception as e:  # releases retry while our session lives; this is past that
                log.warning("lease release failed lease=%s error=%r", lease.name, e)
