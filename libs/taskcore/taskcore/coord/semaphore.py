"""The one lease recipe: a fair, herd-free semaphore over owners, with fencing tokens.

At most `limit` distinct *owners* hold at once; a holder whose owner already holds joins it. A
plain m-of-n lease (a task's limit, a cluster's budget) makes every holder its own owner; an
exclusion group uses owner = task, a global lease owner = cluster, a topology lease owner = zone.

The shape is Curator's InterProcessSemaphoreV2: a fair queue decides who may try next, and only
the head of the queue looks at the holders. Layout under `path`:

- `q/<position>-<uid>-<sequence>`: the waiters, ephemeral sequential nodes, served in order of
  (position, sequence). Position 0 everywhere gives arrival order (cluster-wide leases, so no task
  starves); a task's own slot uses the node's place in the router's plan, so the plan's order is
  the order in which nodes act. Each waiter watches only the waiter just ahead of it (a deleted
  event), so a release wakes one waiter, not all of them, and a waiter asks nothing while it waits.
- `h/<owner>~<uid>`: the holders, ephemeral nodes. The head reads them with a children watch.
  A holder is created in one transaction with a write of `h`'s data at the version the head read
  alongside the listing (`h`'s data version is the gate), and every release bumps it too: so the
  listing a create was decided on is the listing at the moment it commits, even if two waiters
  think they are at the head (a position inserted ahead of a waiting head), even if the listing
  came from a lagging follower. Holders never exceed the limit (but for `occupy`, which counts a
  node that is down at once and admits nobody until enough leave), and the holder node's czxid is a
  fencing token that strictly increases across successive holders.

A node that acts, or whose action failed, is presumed down until it succeeds or its next attempt,
and keeps its place with `down` markers: `h/<owner>~<uid>@<until>`, persistent holders of the same
owner beside its ephemeral ones (`mark_down`, through the gate as a take, only while the owners
allow), counted as holders until `until` (epoch seconds) even after the session that made them is
gone, so a runner that freezes while its node acts, or dies in a failed node's backoff, leaves the
slot held for the node. A release may take markers along in its transaction. A waiter whose
owner holds (a marker, or a holder of another of its items) joins at once, from anywhere in the
queue: it adds no owner, so it takes nobody's turn, and the failed node's retry never waits behind
the waiters its marker holds back. The retry's end clears them
(`clear_down`); an expired one counts for nothing and is deleted by whoever sees it.

Both kinds of node carry a unique id in their name, so a create retried by aiozk after a
connection loss is found again instead of leaving a ghost. A session that dies takes its nodes with
it (ephemeral). The last one out deletes the emptied folders."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from aiozk import exc, protocol

from taskcore.coord import watches
from taskcore.coord.session import Slot, ZkSession, delete_if_empty, retry_while_session
from taskcore.core.errors import LeaseLost

log = logging.getLogger(__name__)

BACKSTOP_SECONDS = 60.0  # a watch is the wake-up; this only guards against a lost notification
RETRY_PAUSE = 0.2
OWNER_SEP = "~"  # never in an encoded token (subjects.encode_token) nor in a hex uid
DOWN_SEP = "@"  # before a down marker's expiry; never in an encoded token nor in a hex uid
EXPIRY_SLACK = 0.05  # a waiter held back by a marker looks again this long after it expires


def queue_key(name: str) -> tuple[int, int]:
    """Serving order of a waiter node `<position>-<uid>-<sequence>`."""
    position, _uid, sequence = name.split("-")
    return int(position), int(sequence)


def holder_owner(name: str) -> str:
    """The owner part of a holder node `<owner>~<uid>`."""
    return name.split(OWNER_SEP, 1)[0]


def down_until(name: str) -> float | None:
    """The expiry (epoch seconds) of a down marker `<owner>~<uid>@<until>`; None for a holder."""
    _, sep, until = name.rpartition(DOWN_SEP)
    return float(until) if sep else None


def expired(name: str, now: float) -> bool:
    """A down marker past its expiry: it counts for nothing."""
    until = down_until(name)
    return until is not None and until <= now


def live_owners(names: Iterable[str], now: float) -> set[str]:
    """The owners holding, among holder names: down markers count until they expire."""
    return {holder_owner(n) for n in names if not expired(n, now)}


def next_expiry(names: Iterable[str], now: float) -> float | None:
    """When the first down marker still counting expires (None: no such marker)."""
    return min((u for n in names if (u := down_until(n)) is not None and u > now), default=None)


def may_hold(owners: set[str], owner: str, limit: int) -> bool:
    """Whether `owner` may hold now, given the owners holding."""
    return owner in owners or len(owners) < limit


class FairSemaphore:
    """At most `limit` owners hold under `path`; see the module docstring for the protocol."""

    def __init__(self, zk: ZkSession, path: str, limit: int, backstop: float = BACKSTOP_SECONDS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.zk = zk
        self.path = path.rstrip("/")
        self.queue = f"{self.path}/q"
        self.holders_path = f"{self.path}/h"
        self.limit = limit
        self.backstop = backstop

    # --- acquire ------------------------------------------------------------------------------

    async def acquire(
        self,
        holder_name: str,
        *,
        owner: str | None = None,
        position: int = 0,
        max_wait: float | None = None,
        on_blocked: Callable[[], Awaitable[None]] | None = None,
    ) -> Slot:
        """Wait in the queue until we hold; TimeoutError after `max_wait` seconds. Cancelling the
        wait leaves nothing behind (queue node deleted, watch callbacks removed). `on_blocked` is
        awaited once when the lease is not granted at once, before we queue, so that whoever waits
        can say why (it may read the holders) without adding a request to the wait itself."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        uid = uuid.uuid4().hex
        holder = f"{holder_name}#{uid}"
        owner_token = owner if owner is not None else uid
        if OWNER_SEP in owner_token or "/" in owner_token:
            raise ValueError(f"owner {owner_token!r} must be an encoded token")
        deadline = None if max_wait is None else time.monotonic() + max_wait
        queued: str | None = None
        try:
            if slot := await self._uncontended(owner_token, uid, holder):
                return slot
            if on_blocked is not None:
                await on_blocked()
            while True:
                try:
                    if queued is None:
                        queued = await self._enqueue(position, uid)
                    slot = await self._turn(queued, owner_token, uid, holder, deadline)
                    if slot is not None:
                        queued = None  # the take deleted it, in the same transaction
                        return slot
                except _Requeue:
                    queued = None
                except exc.ZKError as e:  # a request cut off with its connection: look again
                    log.warning("lease acquire retried path=%s error=%r", self.path, e)
                    self._check_deadline(deadline, max_wait)
                    await asyncio.sleep(RETRY_PAUSE)
        except BaseException:
            await asyncio.shield(self._abandon(uid, queued is None))
            raise
        finally:
            if queued is not None:
                await asyncio.shield(self._dequeue(queued))

    async def _uncontended(self, owner: str, uid: str, holder: str) -> Slot | None:
        """Nobody waits and the owners allow, or our owner holds already: take the lease without
        queueing (one write, not three). Safe for the same reason as at the head of the queue (the
        gate); fair, because there is nobody to be fair to, or because joining our owner adds no
        owner. The queue's stat (not its listing: a thousand waiters cost nothing to count) and
        the holders are read at once: the take waits two round trips, not three."""
        client = self.zk.client
        queue_stat = protocol.ExistsRequest(path=client.normalize_path(self.queue), watch=False)
        holders = protocol.GetChildren2Request(path=client.normalize_path(self.holders_path), watch=False)
        queue: Any  # the responses, or the errors they met
        listing: Any
        queue, listing = await asyncio.gather(
            client.send(queue_stat), client.send(holders), return_exceptions=True
        )
        try:
            if isinstance(queue, exc.NoNode):  # the first one here: no folders yet
                await self._create_folders()
                listing = await client.send(holders)
            elif isinstance(queue, BaseException):
                raise queue
            if isinstance(listing, BaseException):
                raise listing
        except exc.ZKError:  # a request cut off: the queue path handles it
            return None
        waiters = 0 if isinstance(queue, exc.NoNode) else queue.stat.num_children
        owners = await self._owners(listing.children)
        if owner not in owners and (waiters or len(owners) >= self.limit):
            return None
        with contextlib.suppress(exc.ZKError):
            return await self._take(listing.stat.version, owner, uid, holder)
        return None

    async def _owners(self, names: list[str]) -> set[str]:
        """The owners holding; expired down markers seen on the way are deleted."""
        now = time.time()
        if stale := [n for n in names if expired(n, now)]:
            await self.drop_expired(stale)
        return live_owners(names, now)

    def _check_deadline(self, deadline: float | None, max_wait: float | None) -> float:
        """Seconds to wait at most before looking again (the backstop, or less before the deadline)."""
        if deadline is None:
            return self.backstop
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no lease of {self.limit} under {self.path} in {max_wait}s")
        return min(self.backstop, left)

    async def _enqueue(self, position: int, uid: str) -> str:
        """Our waiter node's name (found again by uid when aiozk retried the create)."""
        client = self.zk.client
        prefix = f"{position:010d}-{uid}-"
        for _ in range(2):
            try:
                created: str = await client.create(f"{self.queue}/{prefix}", ephemeral=True, sequential=True)
                return created.rsplit("/", 1)[1]
            except exc.NoNode:
                await self._create_folders()
            except exc.ZKError:
                found = await self._find(self.queue, uid)
                if found:
                    return found
                raise
        raise exc.NoNode

    async def _create_folders(self) -> None:
        """The semaphore's folder with its queue and holders, in one transaction (one write, where
        creating them one segment at a time costs a request per segment); where a part is there
        already, or the parent is missing, one segment at a time."""
        client = self.zk.client
        txn = client.begin_transaction()
        for path in (self.path, self.queue, self.holders_path):
            txn.create(path)
        if await _failures(txn) is not None:
            await client.ensure_path(self.queue)
            await client.ensure_path(self.holders_path)

    async def _find(self, folder: str, uid: str) -> str | None:
        with contextlib.suppress(exc.NoNode):
            for name in await self.zk.client.get_children(folder):
                if uid in name:
                    return str(name)
        return None

    async def _turn(
        self, queued: str, owner: str, uid: str, holder: str, deadline: float | None
    ) -> Slot | None:
        """One look: behind someone, sleep until the one just ahead leaves; at the head, take a
        lease when the owners allow, else sleep until a holder leaves and read the holders again
        (not the queue: a waiter of the head's own wait costs one listing of the queue, however
        many holders come and go before its turn). None: look again.

        The queue and the holders are read at once: the waiter that wakes is nearly always the
        head, which needs both, so a hand-off waits one round trip less. (A waiter that turns out
        not to be the head leaves one children watch on the holders, which fires once, to nobody.)"""
        client = self.zk.client
        max_wait = None if deadline is None else deadline - time.monotonic()
        held = watches.Watch(client, [watches.CHILDREN], self.holders_path)
        waiting: list[str] | BaseException
        listing: Any  # a GetChildren2 response, or the error it met
        try:
            waiting, listing = await asyncio.gather(
                client.get_children(self.queue), self._holders(), return_exceptions=True
            )
            if isinstance(waiting, exc.NoNode):
                raise _Requeue from None
            if isinstance(waiting, BaseException):
                raise waiting
            if queued not in waiting:  # our session was lost and its node with it
                raise _Requeue
            if isinstance(listing, BaseException) or owner not in await self._owners(listing.children):
                mine = queue_key(queued)
                ahead = [n for n in waiting if queue_key(n) < mine]
            else:
                ahead = []  # our owner holds: join it now, from wherever we stand
            if ahead:
                held.close()
                before = max(ahead, key=queue_key)
                with watches.Watch(client, [watches.DELETED], f"{self.queue}/{before}") as w:
                    if await client.exists(f"{self.queue}/{before}", watch=True):
                        await w.wait(self._check_deadline(deadline, max_wait))
                return None
            while True:  # at the head: only the holders change what we wait for
                if isinstance(listing, exc.NoNode):
                    await client.ensure_path(self.holders_path)
                    return None
                if isinstance(listing, BaseException):
                    raise listing
                owners = await self._owners(listing.children)
                if may_hold(owners, owner, self.limit):
                    return await self._take(listing.stat.version, owner, uid, holder, queued)
                wait = self._check_deadline(deadline, max_wait)
                if (until := next_expiry(listing.children, time.time())) is not None:
                    wait = min(wait, max(until - time.time(), 0.0) + EXPIRY_SLACK)  # a marker expires
                if not await held.wait(wait):
                    return None  # the backstop (or a marker's expiry): the whole look again
                held.close()
                held = watches.Watch(client, [watches.CHILDREN], self.holders_path)
                try:
                    listing = await self._holders()
                except exc.ZKError as e:
                    listing = e
        finally:
            held.close()

    async def _holders(self) -> Any:
        """The holders' listing with its stat (the gate's version), setting a children watch."""
        client = self.zk.client
        return await client.send(
            protocol.GetChildren2Request(path=client.normalize_path(self.holders_path), watch=True)
        )

    async def _take(
        self, version: int, owner: str, uid: str, holder: str, queued: str | None = None
    ) -> Slot | None:
        """Create our holder node, provided the holders did not change since `version`, and leave
        the queue (`queued`) in the same transaction: the waiter behind us wakes as we hold, one
        round trip sooner, and a slot taken always means our queue node is gone. The created node's
        stat comes back with the answer (fencing token, owning session); only an answer cut off
        with its connection or refused costs a read of what landed."""
        client = self.zk.client
        path = f"{self.holders_path}/{owner}{OWNER_SEP}{uid}"
        txn = client.begin_transaction()
        txn.set_data(self.holders_path, b"", version=version)
        txn.create(path, data=holder.encode(), ephemeral=True)
        if queued is not None:
            txn.delete(f"{self.queue}/{queued}")
        try:
            response = await client.send(txn.request)
        except exc.ZKError as e:  # cut off: what landed decides
            log.debug("lease take unanswered path=%s error=%r", path, e)
            return await self._own(path, holder)
        if any(isinstance(r, Exception) for r in response.responses):
            # the gate moved, our queue node is gone, or this was aiozk's resend of a take that
            # landed before its connection dropped (the resend fails): what landed decides
            return await self._own(path, holder)
        created = next((r for r in response.responses if isinstance(r, protocol.Create2Response)), None)
        if created is None:  # a server before 3.5 answers a create without its stat
            return await self._own(path, holder)
        stat = created.stat
        return Slot(path=path, holder=holder, session_id=stat.ephemeral_owner, token=stat.created_zxid)

    async def _own(self, path: str, holder: str) -> Slot | None:
        try:
            data, stat = await self.zk.client.get(path)
        except exc.NoNode:
            return None
        if data != holder.encode():
            return None
        return Slot(path=path, holder=holder, session_id=stat.ephemeral_owner, token=stat.created_zxid)

    async def _dequeue(self, queued: str) -> None:
        with contextlib.suppress(Exception):
            sid = self.zk.session_id or 0
            marker = Slot(path=f"{self.queue}/{queued}", holder="", session_id=sid, token=0)
            await retry_while_session(self.zk, marker, lambda: self.zk.client.delete(marker.path, force=True))

    async def _abandon(self, uid: str, queueing: bool) -> None:
        """A wait that ends without a lease: delete a holder node a cut-off take may have left and,
        when it ended `queueing` (cancelled after the create was sent, before its name came back),
        the queue node that create may have made: left, it would head the queue for as long as
        our session lives and keep everyone behind it waiting."""
        with contextlib.suppress(Exception):
            name = await self._find(self.holders_path, uid)
            if name:
                await self._delete_holder(f"{self.holders_path}/{name}")
            if queueing and (name := await self._find(self.queue, uid)):
                await self._dequeue(name)

    async def occupy(self, holder_name: str, owner: str) -> Slot:
        """Hold as `owner` at once, whatever the limit: a node that is down already counts
        against a disruption budget, as a PodDisruptionBudget counts an unhealthy pod. The holders
        may then exceed the limit: nobody else is admitted until enough leave; a holder of the
        same owner joins it (the down node's own repair). Released as any slot (`release`)."""
        if OWNER_SEP in owner or "/" in owner:
            raise ValueError(f"owner {owner!r} must be an encoded token")
        uid = uuid.uuid4().hex
        holder = f"{holder_name}#{uid}"
        path = f"{self.holders_path}/{owner}{OWNER_SEP}{uid}"
        for _ in range(2):
            txn = self.zk.client.begin_transaction()
            txn.set_data(self.holders_path, b"")  # bump the gate: a take decided before this retries
            txn.create(path, data=holder.encode(), ephemeral=True)
            failed = await _failures(txn)
            if failed and exc.NoNode in failed:
                await self._create_folders()
                continue
            break
        if (slot := await self._own(path, holder)) is None:
            raise LeaseLost(f"could not occupy {self.path} as {owner}")
        return slot

    # --- down markers (the module docstring) --------------------------------------------------

    async def mark_down(self, slot: Slot, until: float) -> str | None:
        """Hold on as `slot`'s owner until `until` (epoch seconds) even if its session goes: a
        persistent marker of the same owner. Made while the owners allow it (our owner holds: the
        slot, or a marker before; or there is room), in one transaction with a write of the gate
        at the version of the listing that decided it, as a take is: so a node whose session went
        while it acted takes its place back only if nobody took it meanwhile. Returns the marker's
        path; None when the place was taken."""
        owner = holder_owner(slot.path.rsplit("/", 1)[1])
        uid = uuid.uuid4().hex
        path = f"{self.holders_path}/{owner}{OWNER_SEP}{uid}{DOWN_SEP}{until:.0f}"
        client = self.zk.client
        request = protocol.GetChildren2Request(path=client.normalize_path(self.holders_path), watch=False)
        while True:
            try:
                listing = await client.send(request)
            except exc.NoNode:  # the last one out deleted the folders: nobody holds
                await self._create_folders()
                continue
            if any(uid in n for n in listing.children):  # a create cut off with its answer landed
                return path
            if not may_hold(await self._owners(listing.children), owner, self.limit):
                return None
            txn = client.begin_transaction()
            txn.set_data(self.holders_path, b"", version=listing.stat.version)
            txn.create(path, data=slot.holder.encode())
            if await _failures(txn) is None:
                return path  # else the gate moved or the answer was cut off: the listing decides

    async def clear_down(self, holder_name: str, owner: str, keep: Iterable[str] = ()) -> None:
        """Delete the down markers `holder_name` left as `owner` (a process before us may have),
        but those in `keep`."""
        client = self.zk.client
        keep = set(keep)
        try:
            names = await client.get_children(self.holders_path)
        except exc.NoNode:
            return
        mine = [
            path
            for n in names
            if down_until(n) is not None
            and holder_owner(n) == owner
            and (path := f"{self.holders_path}/{n}") not in keep
        ]
        for path in mine:
            with contextlib.suppress(exc.NoNode):
                if (await client.get_data(path)).decode(errors="replace").rsplit("#", 1)[0] == holder_name:
                    await client.delete(path)
        if mine and not keep:
            await self.clean_up()

    async def drop_expired(self, names: Iterable[str]) -> None:
        """Delete the expired down markers among the holder `names` (a racing deleter is fine)."""
        now = time.time()
        for name in names:
            if expired(name, now):
                with contextlib.suppress(exc.NoNode):
                    await self.zk.client.delete(f"{self.holders_path}/{name}")

    # --- hold ---------------------------------------------------------------------------------

    async def verify(self, slot: Slot) -> None:
        """Raise LeaseLost unless the session is trusted and the holder node is still ours, read
        after a `sync` (so a follower cut off from the leader cannot vouch for it). The read is
        sent right behind the sync, without waiting for it: ZooKeeper serves a session's requests in
        order, a read queued behind a sync after the sync completes (one round trip, not two). That
        holds on one connection; answers that came over a new one (aiozk resends what a dropped
        connection cut off, in any order) are asked again.

        Nothing acts while we verify, so a failover (a dropped connection, a leader election) is
        ridden out: we ask again as long as the session that took the slot may still be alive
        (`safe_until`); a holder that the session may have lost is never vouched for."""
        zk = self.zk
        client = zk.client
        while True:
            if zk.session_id != slot.session_id:
                raise LeaseLost(f"lease {slot.path}: its session {slot.session_id} is gone")
            if time.monotonic() >= zk.safe_until():
                zk.check()  # raises: the session may have expired without our knowing
            if not zk.is_safe():  # reconnecting, still within the session's lifetime
                await asyncio.sleep(RETRY_PAUSE)
                continue
            try:
                sync = protocol.SyncRequest(path=client.normalize_path(slot.path))
                synced: Any  # the answers, or the errors they met
                read: Any
                connection = client.session.conn
                async with asyncio.timeout(zk.timeout / 3):  # both sent at once (see the docstring)
                    synced, read = await asyncio.gather(
                        client.send(sync), client.get(slot.path), return_exceptions=True
                    )
                for answer in (synced, read):  # the sync's error first: a read without it proves nothing
                    if isinstance(answer, BaseException):
                        raise answer
                if client.session.conn is not connection:  # resent after a reconnect, maybe out of order
                    continue
                data, stat = read
                break
            except exc.NoNode as e:
                raise LeaseLost(f"lease {slot.path} is gone") from e
            except (TimeoutError, exc.ZKError) as e:  # aiozk's own TimeoutError is a ZKError
                log.info("lease verification retried path=%s error=%r", slot.path, e)
                await asyncio.sleep(RETRY_PAUSE)
        if data != slot.holder.encode() or stat.created_zxid != slot.token:
            raise LeaseLost(f"lease {slot.path} now belongs to someone else")
        zk.check()

    async def release(self, slot: Slot, down: Iterable[str] = ()) -> None:
        """Give the lease back (a lease already gone is fine), and with it the `down` markers (by
        path) in the same transaction, so the next holder wakes once; the last one out removes the
        folders."""
        down = list(down)
        released = False

        async def delete() -> None:
            nonlocal released
            data, stat = await self.zk.client.get(slot.path)
            if data == slot.holder.encode() and stat.created_zxid == slot.token:
                await self._delete_holder(slot.path, down)
                released = True

        await retry_while_session(self.zk, slot, delete)
        if down and not released:  # the holder was gone (its session with it): the markers alone
            await self.delete_markers(down)
        await self.clean_up()

    async def _delete_holder(self, path: str, down: list[str] | None = None) -> None:
        txn = self.zk.client.begin_transaction()
        txn.delete(path)
        for marker in down or ():
            txn.delete(marker)
        txn.set_data(self.holders_path, b"")  # bump the gate: a take decided before this retries
        if (failed := await _failures(txn)) and down and exc.NoNode in failed:
            await self.delete_markers(down)  # one is gone (expired, deleted): the rest, then ours
            await self._delete_holder(path)
        elif failed:
            raise next(iter(failed))()  # e.g. NoNode: gone already (the release accepts that)

    async def delete_markers(self, paths: Iterable[str]) -> None:
        """Delete down markers by path (one gone already is fine)."""
        for path in paths:
            with contextlib.suppress(exc.NoNode):
                await self.zk.client.delete(path)

    async def clean_up(self) -> None:
        """Delete the folders when nobody waits or holds (a racing newcomer recreates them). The
        queue goes first: while anyone waits, one request tells, and the holders stay."""
        txn = self.zk.client.begin_transaction()
        for folder in (self.queue, self.holders_path, self.path):
            txn.delete(folder)
        failed = await _failures(txn)  # all or nothing
        if failed is None or exc.NotEmpty in failed:  # done, or someone waits or holds
            return
        for folder in (self.queue, self.holders_path, self.path):  # a part is gone: the rest, one by one
            if not await _empty_or_gone(self.zk, folder):
                return

    # --- read ---------------------------------------------------------------------------------

    async def holders(self) -> dict[str, list[str]]:
        """Owner → holder ids, of the leases held now (for `taskerman leases` and tests)."""
        client = self.zk.client
        out: dict[str, list[str]] = {}
        with contextlib.suppress(exc.NoNode):
            now = time.time()
            for name in sorted(await client.get_children(self.holders_path)):
                if expired(name, now):
                    continue
                with contextlib.suppress(exc.NoNode):
                    data = await client.get_data(f"{self.holders_path}/{name}")
                    out.setdefault(holder_owner(name), []).append(data.decode())
        return out

    async def holder_ids(self) -> list[str]:
        """Every holder id, whatever its owner."""
        return [h for ids in (await self.holders()).values() for h in ids]

    async def waiting(self) -> int:
        """How many wait in the queue now."""
        try:
            return len(await self.zk.client.get_children(self.queue))
        except exc.NoNode:
            return 0


class HolderNode(msgspec.Struct, frozen=True, kw_only=True):
    """A holder as `read_holders` finds it: its owner (an encoded token), holder id, znode name,
    fencing token and creation time (epoch seconds); a down marker's expiry (epoch seconds)."""

    owner: str
    holder: str
    znode: str
    token: int
    since: float
    down_until: float | None = None


async def read_holders(zk: ZkSession, path: str) -> list[HolderNode]:
    """The holders of the semaphore at `path` (none when there is no such semaphore)."""
    client = zk.client
    folder = f"{path.rstrip('/')}/h"
    out: list[HolderNode] = []
    try:
        names = sorted(await client.get_children(folder))
    except exc.NoNode:
        return out
    now = time.time()
    for name in names:
        if expired(name, now):
            continue
        with contextlib.suppress(exc.NoNode):
            data, stat = await client.get(f"{folder}/{name}")
            out.append(
                HolderNode(
                    owner=holder_owner(name),
                    holder=data.decode(errors="replace"),
                    znode=name,
                    token=stat.created_zxid,
                    since=stat.created / 1000,  # ctime is in milliseconds
                    down_until=down_until(name),
                )
            )
    return out


async def _failures(txn: Any) -> set[type[Exception]] | None:
    """Commit a transaction: None when it was applied, else the kinds of error its operations met
    (aiozk's `commit` reports a failed transaction only as an empty result)."""
    try:
        response = await txn.client.send(txn.request)
    except exc.ZKError as e:
        return {type(e)}
    errors = {type(r) for r in response.responses if isinstance(r, Exception)}
    return errors or None


async def _empty_or_gone(zk: ZkSession, path: str) -> bool:
    """Delete `path` if it has no children; True when it is gone now."""
    return await delete_if_empty(zk, path) or not await zk.client.exists(path)


class _Requeue(Exception):
    """Our waiter node is gone (session lost, folder cleaned up): queue again."""
