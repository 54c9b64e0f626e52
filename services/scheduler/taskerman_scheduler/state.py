"""What the leader keeps in ZooKeeper: per-schedule state and the canary's record.

Every write is a compare-and-set on the version read, so a deposed leader that still writes fails
(LeaseLost) instead of moving a schedule backwards."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Generic, TypeVar

import msgspec
from aiozk import exc

from taskcore.coord.schedule_control import CANARY_PATH, CanaryState
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.errors import LeaseLost

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_ROOT = "/scheduler/last"


class ScheduleState(msgspec.Struct, frozen=True, kw_only=True):
    """Per schedule: the newest slot handled (emitted, queued or skipped), the task ids of the newest
    run (the run that `skip` and `queue` wait for: one task per cluster), a slot waiting for that run
    to finish (`queue`), and how many slots were skipped (overlap, pause, no matching cluster)."""

    last_slot: datetime
    last_task_id: str = ""
    last_run: tuple[str, ...] = ()
    queued_slot: datetime | None = None
    skipped: int = 0
    last_skip: str = ""

    @property
    def run_ids(self) -> tuple[str, ...]:
        """The newest run's task ids (a state written before runs had several: its one id)."""
        return self.last_run or ((self.last_task_id,) if self.last_task_id else ())


class VersionedJson(Generic[T]):
    """One JSON znode read with its version and written only if that version is still current."""

    def __init__(self, zk: ZkSession, kind: type[T]) -> None:
        self.zk = zk
        self.kind = kind

    async def load(self, path: str) -> tuple[T | None, int]:
        """The document and its znode version (-1: no znode yet)."""
        try:
            data, stat = await self.zk.client.get(path)
        except exc.NoNode:
            return None, -1
        version: int = stat.version
        try:
            return msgspec.json.decode(data or b"", type=self.kind), version
        except msgspec.DecodeError as e:
            log.error("unreadable state, starting afresh path=%s error=%s", path, e)
            return None, version

    async def save(self, path: str, doc: T, version: int) -> int:
        """Write if the znode is still at `version`; the new version, or LeaseLost."""
        data = msgspec.json.encode(doc)
        parent = path.rsplit("/", 1)[0]
        try:
            if version >= 0:
                stat = await self.zk.client.set(path, data, version)
                new_version: int = stat.version
                return new_version
            for _ in range(3):  # the parent may be a container znode, reaped between the calls
                await self.zk.client.ensure_path(parent)
                with contextlib.suppress(exc.NoNode):
                    await self.zk.client.create(path, data=data)
                    return 0
        except (exc.BadVersion, exc.NodeExists) as e:
            raise LeaseLost(f"{path} was changed by someone else") from e
        raise LeaseLost(f"could not create {path}")


class StateStore:
    """Per-schedule state znodes under `/scheduler/last/<encoded name>`."""

    def __init__(self, zk: ZkSession, root: str = STATE_ROOT) -> None:
        self.root = root.rstrip("/")
        self._json = VersionedJson(zk, ScheduleState)

    def path(self, name: str) -> str:
        return f"{self.root}/{subjects.encode_token(name)}"

    async def load(self, name: str) -> tuple[ScheduleState | None, int]:
        return await self._json.load(self.path(name))

    async def save(self, name: str, state: ScheduleState, version: int) -> int:
        return await self._json.save(self.path(name), state, version)


class CanaryStore:
    """The canary's record at `/scheduler/canary`."""

    def __init__(self, zk: ZkSession, path: str = CANARY_PATH) -> None:
        self.path = path
        self._json = VersionedJson(zk, CanaryState)

    async def load(self) -> tuple[CanaryState | None, int]:
        return await self._json.load(self.path)

    async def save(self, state: CanaryState, version: int) -> int:
        return await self._json.save(self.path, state, version)
