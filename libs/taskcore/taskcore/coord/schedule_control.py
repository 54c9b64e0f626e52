"""What the `taskerman` CLI shares with the scheduler: the schedules API, pause flags and the canary.

- `taskerman.api.schedules` (queue group `schedulers`) is served by the leading scheduler only, so
  its answers are about the schedules that actually run: list (with state), next slots, trigger.
- `/scheduler/paused/<encoded name>` exists while a schedule is paused (JSON: by, at, reason); the
  CLI writes it directly, the leader reads it every tick.
- `/scheduler/canary` is the heartbeat canary's record (JSON), written by the leader and read by
  `taskerman health`.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from aiozk import exc

from taskcore.coord.session import ZkSession, read_json
from taskcore.core import subjects
from taskcore.core.errors import InvalidName, TaskermanError
from taskcore.core.subjects import decode_token, encode_token

API_SUBJECT = subjects.SCHEDULES_SUBJECT
API_QUEUE = "schedulers"
PAUSED_ROOT = "/scheduler/paused"
CANARY_PATH = "/scheduler/canary"
CANARY_EVERY = 30.0  # default seconds between canary pings
MAX_NEXT = 1000


class ApiRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A request to the leading scheduler. `name` narrows list/next to one schedule (trigger needs
    it); `count` is how many next slots to compute per schedule."""

    op: Literal["list", "next", "trigger"]
    name: str = ""
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEXT)] = 1
    by: str = ""  # who asks (for the audit trail of a trigger)


class NextSlot(msgspec.Struct, frozen=True, kw_only=True):
    """A future slot: its cron time, when it will go out (after its jitter), and its task id (a
    list or pattern schedule appends `~<cluster>` per cluster)."""

    slot: datetime
    emit_at: datetime
    task_id: str


class PauseFlag(msgspec.Struct, frozen=True, kw_only=True):
    """Why and since when a schedule is paused."""

    by: str = ""
    at: float = 0.0
    reason: str = ""


class ScheduleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One schedule as the leader runs it, with its state from ZooKeeper."""

    name: str
    cron: str
    timezone: str
    overlap: str
    catchup_s: float
    jitter_s: float
    target: str
    action: str
    cluster_name: str = ""
    clusters: list[str] = []
    cluster_pattern: str = ""
    paused: PauseFlag | None = None
    last_slot: datetime | None = None
    last_task_id: str = ""
    last_run: list[str] = []
    queued_slot: datetime | None = None
    skipped: int = 0
    last_skip: str = ""
    next: list[NextSlot] = []


class ApiReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The leader's answer: its holder id and the schedules, or the triggered task ids, or an error."""

    leader: str = ""
    schedules: list[ScheduleInfo] = []
    task_ids: list[str] = []
    error: str = ""


class CanaryState(msgspec.Struct, frozen=True, kw_only=True):
    """The heartbeat canary's record: what was sent last, what completed last and how long it took
    end to end (the ping's last node finished - the task created). Epoch seconds."""

    cluster: str
    every: float
    last_slot: float = 0.0
    last_task_id: str = ""
    last_emitted_at: float | None = None
    outstanding: tuple[str, ...] = ()  # pings sent and not yet finished, oldest first (bounded)
    last_completed_task_id: str = ""
    last_completed_at: float | None = None
    latency: float | None = None
    last_failed_task_id: str = ""
    last_failed_at: float | None = None
    last_failure: str = ""
    late_since: float | None = None  # no ping completed for LATE_PERIODS periods: since when


def paused_path(name: str) -> str:
    return f"{PAUSED_ROOT}/{encode_token(name)}"


async def read_pause(zk: ZkSession, name: str) -> PauseFlag | None:
    """The schedule's pause flag, or None when it runs (a flag without readable data still pauses)."""
    try:
        data = await zk.client.get_data(paused_path(name))
    except exc.NoNode:
        return None
    try:
        return msgspec.json.decode(data, type=PauseFlag) if data else PauseFlag()
    except msgspec.DecodeError:
        return PauseFlag(reason="(unreadable pause flag)")


async def paused_names(zk: ZkSession) -> dict[str, PauseFlag]:
    """Every paused schedule name (paused ahead of being deployed, too) and its flag."""
    try:
        tokens = await zk.client.get_children(PAUSED_ROOT)
    except exc.NoNode:
        return {}
    out: dict[str, PauseFlag] = {}
    for token in sorted(tokens):
        with contextlib.suppress(InvalidName):
            name = decode_token(token)
            flag = await read_pause(zk, name)
            if flag is not None:
                out[name] = flag
    return out


async def pause(zk: ZkSession, name: str, flag: PauseFlag) -> PauseFlag | None:
    """Pause a schedule; returns the earlier flag when it was paused already (left unchanged)."""
    path = paused_path(name)
    for _ in range(3):  # should the parent ever be a container znode, it may go between the calls
        await zk.client.ensure_path(PAUSED_ROOT)
        try:
            await zk.client.create(path, data=msgspec.json.encode(flag))
        except exc.NodeExists:
            return await read_pause(zk, name) or flag
        except exc.NoNode:
            continue
        return None
    raise TaskermanError(f"could not create {path}: its parent keeps vanishing")


async def resume(zk: ZkSession, name: str) -> PauseFlag | None:
    """Resume a schedule; returns the flag removed, None when it was not paused."""
    flag = await read_pause(zk, name)
    if flag is None:
        return None
    with contextlib.suppress(exc.NoNode):
        await zk.client.delete(paused_path(name))
    return flag


async def read_canary(zk: ZkSession) -> CanaryState | None:
    """The canary's record, or None when no scheduler ever ran one."""
    try:
        return await read_json(zk, CANARY_PATH, CanaryState)
    except msgspec.DecodeError:
        return None
