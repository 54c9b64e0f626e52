"""ZooKeeper coordination: a session that knows when it can no longer be trusted, and the small
helpers every recipe shares (held slots, JSON znodes, folder clean-up). The one lease recipe is
coord/semaphore.py (aiozk's own `Lease` lets limit+1 holders in; see
docs/architecture.md#aiozk-lease-is-unsafe)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
from aiozk import ACL, ZKClient, exc, protocol
from aiozk.states import States

from taskcore.coord import acl, watches
from taskcore.core.errors import LeaseLost
from taskcore.core.settings import Settings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SAFETY_MARGIN = 0.25  # fraction of the session timeout we refuse to act in, before it could expire


class ZkSession:
    """An aiozk session plus a monotonic-clock guard.

    aiozk only logs a lost session and keeps reporting locks held, so we track it ourselves: the
    session is trusted only while connected and until `last successful round trip + session
    timeout - margin`. A process paused past that point is untrusted the moment it resumes."""

    def __init__(
        self,
        hosts: str,
        chroot: str,
        session_timeout: float,
        *,
        auth: tuple[str, str] | None = None,
        acl: list[ACL] | None = None,
    ) -> None:
        """`auth` (user, password) is sent on every connection before anything else; `acl` is
        the ACL of every znode this session creates (coord/acl.py). Neither: world-accessible."""
        self.client = ZKClient(hosts, chroot=chroot, session_timeout=session_timeout, default_acl=acl)
        self.timeout = session_timeout
        self.auth = auth
        self._last_ok = 0.0
        self._monitor: asyncio.Task[None] | None = None
        if auth is not None:
            _authenticate_each_connection(self.client, auth)

    @classmethod
    def from_settings(cls, settings: Settings) -> ZkSession:
        auth = acl.read_auth(settings.zk_auth) if settings.zk_auth else None
        rules = acl.parse(settings.zk_acl) if settings.zk_acl else None
        if auth and not rules:  # it would create what it guards open to anyone
            raise acl.ZkAuthError(f"{acl.AUTH_ENV} is set but {acl.ACL_ENV} is not: set both, or neither")
        return cls(settings.zk_hosts, settings.zk_chroot, settings.zk_session_timeout, auth=auth, acl=rules)

    async def __aenter__(self) -> Self:
        started = time.monotonic()
        watches.install(self.client)
        await self.client.start()
        if self.auth is not None:
            await self._check_access()
        self._last_ok = started
        self.timeout = float(self.client.session.timeout or self.timeout)
        self._monitor = asyncio.create_task(self._watch_liveness(), name="zk-liveness")
        return self

    async def _check_access(self) -> None:
        """A wrong password is not refused by ZooKeeper at the door (digest authentication only
        names an identity): read the chroot once, so that it shows here, said plainly."""
        try:
            await self.client.get_data("/")
        except exc.NoAuth:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await self.client.close()
            assert self.auth is not None
            raise acl.ZkAuthError(
                f"ZooKeeper refuses {self.auth[0]!r} access to {self.client.chroot or '/'}: check the "
                f"password in {acl.AUTH_ENV} and that the chroot's ACL ({acl.ACL_ENV}) names that user"
            ) from None

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the liveness monitor, then close. Python 3.11's `asyncio.wait_for` returns the
        result instead of raising when it is cancelled just as its awaitable completes: the
        cancellation is lost. A monitor cancelled just as a ping answered then lived on and this
        waited for it for ever (a CI teardown hang). So the recipes here time out with
        `asyncio.timeout`, which cannot lose a cancellation, and the wait here is bounded anyway."""
        if self._monitor:
            self._monitor.cancel()
            await asyncio.wait({self._monitor}, timeout=self.timeout)  # bounded, whatever it does
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await self.client.close()

    async def _watch_liveness(self) -> None:
        """Ping, and when a ping succeeds again after failing, on another session or on another
        connection, wake every waiter: watches may have fired while we were away, been forgotten
        with the session, or not been set again on the new connection (aiozk re-sends data, exist
        and child watches, not the ones it keys as deletions)."""
        known_session, known_conn = self.session_id, self.client.session.conn
        failed = False
        while True:
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout / 3):  # not wait_for: see `__aexit__`
                    await self.client.exists("/")
                self._last_ok = sent
                conn = self.client.session.conn
                if failed or self.session_id != known_session or conn is not known_conn:
                    woken = watches.wake_all(self.client)
                    log.info("zk reachable again session=%s, woke %d waiter(s)", self.session_id, woken)
                known_session, known_conn, failed = self.session_id, conn, False
            except (TimeoutError, exc.ZKError) as e:
                failed = True
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


def _not_no_auth(record: logging.LogRecord) -> bool:
    """aiozk logs a traceback for every NoAuth answer; the caller hears of it (ZkAuthError at
    start, exc.NoAuth from the request), said plainly: keep the log free of the traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], exc.NoAuth))


logging.getLogger("aiozk.session").addFilter(_not_no_auth)


def _authenticate_each_connection(client: ZKClient, auth: tuple[str, str]) -> None:
    """Send the digest `auth` on each new connection, right after the session is established
    and before anything else is sent on it (aiozk keeps no credentials: without this, a session
    that moved to another server would lose its identity). ZooKeeper answers in order, so every
    later request on the connection is made as that identity."""
    session = client.session
    establish = session.establish_session
    request = protocol.AuthRequest(type=0, scheme="digest", auth=f"{auth[0]}:{auth[1]}".encode())

    async def establish_then_authenticate() -> None:
        await establish()
        answer = session.conn.send(request)
        answer.add_done_callback(_log_refusal)

    session.establish_session = establish_then_authenticate


def _log_refusal(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled() and (e := answer.exception()) is not None:
        log.error("zookeeper refused our credentials error=%r", e)


class Slot(msgspec.Struct, frozen=True):
    """One held slot: its znode, our holder id, the session that owns it and the fencing token."""

    path: str
    holder: str
    session_id: int
    token: int


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
    """Atomic read-modify-write of a JSON znode (compare-and-set on its version; retried on races).
    An update that changes nothing writes nothing: a write would wake every watcher of the znode
    (a breaker's waiters, when a probe was claimed by someone else in the meantime)."""
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
        old = msgspec.json.decode(data, type=kind) if data else None
        new = update(old)
        if new == old:
            return new
        try:
            await client.set(path, msgspec.json.encode(new), stat.version)
        except exc.BadVersion:
            continue
        return new
