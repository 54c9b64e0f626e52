"""Leases shared by an owner: at most `limit` distinct owners at once, each owner's holders sharing
one slot. Exclusion groups use it with owner = task (limit 1 per cluster and group); global leases
with owner = cluster (at most N clusters at once). Plus the ordered set of leases a work item needs.

Layout under `path`: `slot-<i>` (persistent, data = owner) with one ephemeral member per holder.
- A slot's owner never changes: a slot is created with its owner and deleted when empty.
- A slot is created together with its first member in one transaction, so it is never empty
  while someone joins it.
- Joining a slot is create-then-check: create our member, then read the slot's owner; a slot that
  was deleted and recreated for another owner in between is detected and left.
- Any empty slot is abandoned (a crashed holder's member vanished with its session) and anyone may
  delete it; ZooKeeper refuses to delete a slot that has members, so this is always safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiozk import exc
from aiozk.protocol import WatchEvent

from taskcore.coord.session import (
    REPOLL_SECONDS,
    Slot,
    SlotSemaphore,
    ZkSession,
    delete_if_empty,
    retry_while_session,
)
from taskcore.core.errors import LeaseLost
from taskcore.core.subjects import encode_token
from taskcore.obs import tracing

log = logging.getLogger(__name__)


TASK_LEASES_ROOT = "/leases/tasks"


def lease_path(task_id: str) -> str:
    """The folder of a task's own m-of-n slots."""
    return f"{TASK_LEASES_ROOT}/{encode_token(task_id)}"


class SharedSlots:
    """At most `limit` owners under `path`; see the module docstring for the protocol."""

    def __init__(self, zk: ZkSession, path: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.zk = zk
        self.path = path.rstrip("/")
        self.limit = limit

    async def acquire(self, owner: str, holder_name: str, max_wait: float | None = None) -> Slot:
        """Join a slot of `owner`, or open one if fewer than `limit` are taken; wait on watches."""
        holder = f"{holder_name}#{uuid.uuid4().hex}"
        deadline = None if max_wait is None else time.monotonic() + max_wait
        client = self.zk.client
        while True:
            futures = [client.wait_for_events([WatchEvent.CHILDREN_CHANGED], self.path)]
            retry_now = False
            try:
                await client.ensure_path(self.path)
                slots = await client.get_children(self.path, watch=True)
                taken: set[str] = set()
                for name in sorted(slots):
                    slot_path = f"{self.path}/{name}"
                    try:
                        data, stat = await client.get(slot_path)
                    except exc.NoNode:
                        continue
                    if data.decode() == owner:
                        mine = await self._join(slot_path, owner, holder)
                        if mine:
                            return mine
                        continue
                    if stat.num_children == 0 and await self._delete_if_empty(slot_path):
                        continue
                    taken.add(name)
                    futures.append(client.wait_for_events([WatchEvent.CHILDREN_CHANGED], slot_path))
                    try:
                        if not await client.get_children(slot_path, watch=True):
                            retry_now = True  # emptied after we looked, before the watch was set
                    except exc.NoNode:
                        retry_now = True
                for i in range(self.limit):
                    name = f"slot-{i}"
                    if name in taken:
                        continue
                    mine = await self._open(f"{self.path}/{name}", owner, holder)
                    if mine:
                        return mine
                if retry_now:
                    continue
                wait = REPOLL_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(
                            f"{self.limit} owner(s) already hold {self.path} (waited {max_wait}s)"
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED), wait)
            except exc.ZKError as e:  # cut off with its connection: look again (our member is found by id)
                log.warning("shared slot acquire retried path=%s error=%r", self.path, e)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"zookeeper unavailable while waiting for {self.path}") from e
                await asyncio.sleep(0.2)
            finally:
                for f in futures:
                    if not f.done():
                        f.cancel()

    async def _open(self, slot_path: str, owner: str, holder: str) -> Slot | None:
        """Create a slot together with its first member, in one transaction: a slot is never seen
        empty while its creator joins it, so nobody deletes it from under them. If it exists
        already (someone else's, or ours from a retried transaction) `_join` decides."""
        txn = self.zk.client.begin_transaction()
        txn.create(slot_path, data=owner.encode())
        txn.create(self._member_path(slot_path, holder), data=holder.encode(), ephemeral=True)
        await txn.commit()  # a failed transaction changes nothing; _join then looks at what is there
        return await self._join(slot_path, owner, holder)

    @staticmethod
    def _member_path(slot_path: str, holder: str) -> str:
        return f"{slot_path}/m-{holder.rsplit('#', 1)[1]}"

    async def _join(self, slot_path: str, owner: str, holder: str) -> Slot | None:
        client = self.zk.client
        member = self._member_path(slot_path, holder)
        try:
            await client.create(member, data=holder.encode(), ephemeral=True)
        except exc.NoNode:
            return None  # the slot went away; look again
        except exc.NodeExists:
            pass  # a create retried by aiozk: the node is ours (checked below)
        try:
            data, stat = await client.get(member)
            slot_owner = await client.get_data(slot_path)
        except exc.NoNode:
            return None
        if data != holder.encode():
            return None
        if slot_owner.decode() != owner:  # the slot was recreated for another owner meanwhile
            with contextlib.suppress(exc.NoNode):
                await client.delete(member, force=True)
            await self._delete_if_empty(slot_path)
            return None
        return Slot(path=member, holder=holder, session_id=stat.ephemeral_owner, token=stat.created_zxid)

    async def _delete_if_empty(self, slot_path: str) -> bool:
        try:
            await self.zk.client.delete(slot_path, force=True)
        except (exc.NotEmpty, exc.NoNode):
            return False
        return True

    async def verify(self, slot: Slot) -> None:
        """Raise LeaseLost unless the session is trusted and our member still exists."""
        await SlotSemaphore.verify_node(self.zk, slot)

    async def release(self, slot: Slot) -> None:
        """Leave; the last member out deletes the slot."""

        async def leave() -> None:
            with contextlib.suppress(exc.NoNode):
                data = await self.zk.client.get_data(slot.path)
                if data == slot.holder.encode():
                    await self.zk.client.delete(slot.path, force=True)
            await self._delete_if_empty(slot.path.rsplit("/", 1)[0])

        await retry_while_session(self.zk, slot, leave)
        await delete_if_empty(self.zk, self.path)

    async def owners(self) -> dict[str, list[str]]:
        """Owner of each slot now held, with its members' holder ids."""
        out: dict[str, list[str]] = {}
        client = self.zk.client
        with contextlib.suppress(exc.NoNode):
            for name in sorted(await client.get_children(self.path)):
                with contextlib.suppress(exc.NoNode):
                    owner = (await client.get_data(f"{self.path}/{name}")).decode()
                    members = await client.get_children(f"{self.path}/{name}")
                    if members:
                        out.setdefault(owner, []).extend(members)
        return out


class Lease(Protocol):
    """Something a work item must hold while its node acts."""

    name: str

    async def acquire(self, max_wait: float | None) -> Slot: ...
    async def verify(self, slot: Slot) -> None: ...
    async def release(self, slot: Slot) -> None: ...


@dataclass
class SemaphoreLease:
    """A plain m-of-n lease (a task's limit, a cluster's disruption budget)."""

    name: str
    sem: SlotSemaphore
    holder: str

    async def acquire(self, max_wait: float | None) -> Slot:
        return await self.sem.acquire(self.holder, max_wait=max_wait)

    async def verify(self, slot: Slot) -> None:
        await self.sem.verify(slot)

    async def release(self, slot: Slot) -> None:
        await self.sem.release(slot)


@dataclass
class SharedLease:
    """A lease held on behalf of an owner (a task's exclusion group, a cluster's global lease)."""

    name: str
    slots: SharedSlots
    owner: str
    holder: str

    async def acquire(self, max_wait: float | None) -> Slot:
        return await self.slots.acquire(self.owner, self.holder, max_wait=max_wait)

    async def verify(self, slot: Slot) -> None:
        await self.slots.verify(slot)

    async def release(self, slot: Slot) -> None:
        await self.slots.release(slot)


@dataclass
class LeaseSet:
    """The leases one work item needs, always taken in the same global order (so two items can
    never wait on each other), verified before each step, released in reverse."""

    leases: Sequence[Lease]
    held: list[tuple[Lease, Slot]] = field(default_factory=list)
    waited: dict[str, float] = field(default_factory=dict)

    async def acquire(self, deadline: float) -> None:
        """Take every lease; TimeoutError (after releasing what was taken) past `deadline`."""
        try:
            for lease in self.leases:
                started = time.monotonic()
                with tracing.tracer(__name__).start_as_current_span(f"lease {lease.name}"):
                    slot = await lease.acquire(max(deadline - started, 0.001))
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
