"""ZooKeeper coordination: a session that knows when it can no longer be trusted, and our own
m-of-n semaphore with fencing tokens (aiozk's `Lease` lets limit+1 holders in; see
docs/architecture.md#aiozk-lease-is-unsafe)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

import msgspec
from aiozk import ZKClient, exc
from aiozk.protocol import WatchEvent
from aiozk.states import States

from taskcore.coord import watches
from taskcore.core.errors import LeaseLost
from taskcore.core.settings import Settings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SAFETY_MARGIN = 0.25  # fraction of the session timeout we refuse to act in, before it could expire
REPOLL_SECONDS = 5.0  # a watch is the wake-up; this is only a backstop against a lost notification


class ZkSession:
    """An aiozk session plus a monotonic-clock guard.

    aiozk only logs a lost session and keeps reporting locks held, so we track it ourselves: the
    session is trusted only while connected and until `last successful round trip + session
    timeout - margin`. A process paused past that point is untrusted the moment it resumes."""

    def __init__(self, hosts: str, chroot: str, session_timeout: float) -> None:
        self.client = ZKClient(hosts, chroot=chroot, session_timeout=session_timeout)
        self.timeout = session_timeout
        self._last_ok = 0.0
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ZkSession:
        return cls(settings.zk_hosts, settings.zk_chroot, settings.zk_session_timeout)

    async def __aenter__(self) -> Self:
        started = time.monotonic()
        watches.install(self.client)
        await self.client.start()
        self._last_ok = started
        self.timeout = float(self.client.session.timeout or self.timeout)
        self._monitor = asyncio.create_task(self._watch_liveness(), name="zk-liveness")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), self.timeout)

    async def _watch_liveness(self) -> None:
        while True:
            sent = time.monotonic()
            try:
                await asyncio.wait_for(self.client.exists("/"), self.timeout / 3)
                self._last_ok = sent
            except (TimeoutError, exc.ZKError) as e:
                log.warning("zk liveness check failed error=%r", e)
            await asyncio.sleep(self.timeout / 6)

    @property
    def session_id(self) -> int | None:
        sid: int | None = self.client.session.session_id
        return sid

    def safe_until(self) -> float:
        """Monotonic time after which the session may have expired without our knowing."""
        return self._last_ok + self.timeout * (1 - SAFETY_MARGIN)

    def is_safe(self) -> bool:
        """Connected, and not possibly expired."""
        return self.client.session.state == States.CONNECTED and time.monotonic() < self.safe_until()

    def check(self) -> None:
        """Raise LeaseLost unless the session can be trusted right now."""
        if not self.is_safe():
            raise LeaseLost(
                f"zookeeper session untrusted (state={self.client.session.state.current_state}, "
                f"{time.monotonic() - self._last_ok:.1f}s since last round trip)"
            )


class Slot(msgspec.Struct, frozen=True):
    """One held slot: its znode, our holder id, the session that owns it and the fencing token."""

    path: str
    holder: str
    session_id: int
    token: int


class SlotSemaphore:
    """At most `limit` holders under `path`, as slot znodes `slot-0` … `slot-<limit-1>`.

    A create is atomic, so no count-then-create race; each slot is ephemeral so a crashed holder's
    slot frees when its session expires; the slot's czxid is the fencing token (strictly
    increasing across successive holders). A create retried after connection loss finds its own
    node again by the unique holder id in the node's data, instead of holding two."""

    def __init__(self, zk: ZkSession, path: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.zk = zk
        self.path = path.rstrip("/")
        self.limit = limit

    async def acquire(self, holder_name: str, max_wait: float | None = None) -> Slot:
        """Wait (on a children watch) until a slot is ours; TimeoutError after `max_wait` seconds."""
        holder = f"{holder_name}#{uuid.uuid4().hex}"
        deadline = None if max_wait is None else time.monotonic() + max_wait
        client = self.zk.client
        while True:
            changed = client.wait_for_events([WatchEvent.CHILDREN_CHANGED], self.path)
            try:
                await client.ensure_path(self.path)
                slot = await self._try_slots(holder)
                if slot:
                    return slot
                try:
                    children = await client.get_children(self.path, watch=True)
                except exc.NoNode:
                    continue  # the parent (a container) was reaped: ensure_path and try again
                if {f"slot-{i}" for i in range(self.limit)} - set(children):
                    continue  # a slot freed after _try_slots passed it, before the watch was set
                wait = REPOLL_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"no free slot of {self.limit} under {self.path} in {max_wait}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(changed), wait)
            except exc.ZKError as e:
                # a request cut off with its connection (aiozk raises its own TimeoutError); a create
                # that did land is found again by our holder id on the next pass
                log.warning("slot acquire retried path=%s error=%r", self.path, e)
                if deadline is not None and time.monotonic() >= deadline:
                    await self._abandon(holder)
                    raise TimeoutError(f"zookeeper unavailable while waiting for {self.path}") from e
                await asyncio.sleep(0.2)
            finally:
                if not changed.done():
                    changed.cancel()

    async def _abandon(self, holder: str) -> None:
        """Delete any slot a cut-off create of ours may have left."""
        with contextlib.suppress(exc.ZKError):
            for i in range(self.limit):
                slot = await self._own(f"{self.path}/slot-{i}", holder)
                if slot:
                    await self.release(slot)

    async def _try_slots(self, holder: str) -> Slot | None:
        client = self.zk.client
        for i in range(self.limit):
            path = f"{self.path}/slot-{i}"
            try:
                await client.create(path, data=holder.encode(), ephemeral=True)
            except exc.NodeExists:
                pass
            except exc.NoNode:  # the parent (a container) was reaped; ensure_path again
                return None
            slot = await self._own(path, holder)
            if slot:
                return slot
        return None

    async def _own(self, path: str, holder: str) -> Slot | None:
        """The slot at `path` if its data names us (also after a create retried by aiozk)."""
        try:
            data, stat = await self.zk.client.get(path)
        except exc.NoNode:
            return None
        if data != holder.encode():
            return None
        return Slot(path=path, holder=holder, session_id=stat.ephemeral_owner, token=stat.created_zxid)

    async def verify(self, slot: Slot) -> None:
        """Raise LeaseLost unless the session is trusted and the slot znode is still ours."""
        await self.verify_node(self.zk, slot)

    @staticmethod
    async def verify_node(zk: ZkSession, slot: Slot) -> None:
        """Raise LeaseLost unless `zk` is trusted and `slot`'s znode is still the one we created."""
        zk.check()
        try:
            data, stat = await asyncio.wait_for(zk.client.get(slot.path), zk.timeout / 3)
        except (TimeoutError, exc.ZKError) as e:  # aiozk's own TimeoutError is a ZKError
            raise LeaseLost(f"slot {slot.path} is gone or unreachable ({e!r})") from e
        if data != slot.holder.encode() or stat.created_zxid != slot.token:
            raise LeaseLost(f"slot {slot.path} now belongs to someone else")
        zk.check()

    async def release(self, slot: Slot) -> None:
        """Delete the slot if it is still ours (a slot already gone is fine); the last holder out
        also deletes the emptied folder, so finished tasks leave no znodes behind."""

        async def delete() -> None:
            data, stat = await self.zk.client.get(slot.path)
            if data == slot.holder.encode() and stat.created_zxid == slot.token:
                await self.zk.client.delete(slot.path, force=True)

        await retry_while_session(self.zk, slot, delete)
        await delete_if_empty(self.zk, self.path)

    async def holders(self) -> list[str]:
        """Holder ids of the slots held now (for tests and `taskerman leases`)."""
        out = []
        try:
            children = await self.zk.client.get_children(self.path)
        except exc.NoNode:
            return []
        for child in sorted(children):
            with contextlib.suppress(exc.NoNode):
                out.append((await self.zk.client.get_data(f"{self.path}/{child}")).decode())
        return out


async def delete_if_empty(zk: ZkSession, path: str) -> bool:
    """Delete a folder znode unless it has children. (aiozk's "container" nodes are created as plain
    ones, so ZooKeeper never reaps them: we clean up ourselves.) Someone about to create a child in
    it gets NoNode and creates the folder again; the recipes here all handle that."""
    try:
        await zk.client.delete(path, force=True)
    except (exc.NotEmpty, exc.NoNode):
        return False
    except exc.ZKError as e:
        log.info("folder not cleaned up path=%s error=%r", path, e)
        return False
    return True


async def retry_while_session(zk: ZkSession, slot: Slot, op: Callable[[], Awaitable[None]]) -> None:
    """Run a release `op` until it succeeds or there is nothing left to release. A request cut off
    with its connection fails with aiozk's own error even when the session then resumes, and a
    resumed session keeps its ephemeral nodes: so retry while the slot's session lives."""
    while True:
        try:
            await op()
            return
        except exc.NoNode:
            return
        except exc.ZKError as e:
            if zk.session_id != slot.session_id:
                return  # that session is gone, and its ephemeral node with it
            log.warning("release retried path=%s error=%r", slot.path, e)
            await asyncio.sleep(0.2)


async def read_json(zk: ZkSession, path: str, kind: type[_T]) -> _T | None:
    """The JSON document at `path`, or None when there is none."""
    try:
        data = await zk.client.get_data(path)
    except exc.NoNode:
        return None
    return msgspec.json.decode(data, type=kind) if data else None


async def update_json(zk: ZkSession, path: str, kind: type[_T], update: Callable[[_T | None], _T]) -> _T:
    """Atomic read-modify-write of a JSON znode (compare-and-set on its version; retried on races)."""
    client = zk.client
    while True:
        try:
            data, stat = await client.get(path)
        except exc.NoNode:
            new = update(None)
            await client.ensure_path(path.rsplit("/", 1)[0] or "/")
            try:
                await client.create(path, data=msgspec.json.encode(new))
            except exc.NodeExists:
                continue
            return new
        new = update(msgspec.json.decode(data, type=kind) if data else None)
        try:
            await client.set(path, msgspec.json.encode(new), stat.version)
        except exc.BadVersion:
            continue
        return new
