"""The runner registry: each runner's ephemeral znode under `/registry/<cluster>/<node>`, with a
heartbeat; discovery `registry` and `taskerman nodes` read it and tell live runners from stale.

A process that serves many nodes beats once for all of them: its nodes name the process, whose own
ephemeral znode under `/registry-processes/` carries the heartbeat, so a thousand simulated nodes
cost one write per period, not a thousand. A node's heartbeat is then its process's.

The router publishes work only for served nodes (`unserved`): a node with a registered runner, or
one whose runner left an away note (`/registry-away/<cluster>/<node>`, persistent) on a clean exit
that is still valid. A runner writes the note only when its node config allows it (`away_grace`,
for a cron-mode runner or a node that reboots itself); a runner that died leaves none."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

import msgspec
from aiozk import exc

from taskcore.coord.fleet import children
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core.subjects import encode_token

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0
STALE_AFTER = 3 * HEARTBEAT_SECONDS
PROCESS_ROOT = "/registry-processes"
AWAY_ROOT = "/registry-away"
NODE_LOCKS_ROOT = "/registry-locks"
AWAY_READS = 256  # away notes read at once by `unserved` (aiozk pipelines them on one connection)
LOOKUPS_UP_TO = 16  # `unserved` looks these up one by one rather than list a cluster's registry


class RunnerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a runner says about itself."""

    cluster: str
    node: str
    pid: int
    version: str
    actions: tuple[str, ...]
    since: float
    heartbeat: float
    process: str = ""  # the process that beats for this node, if not the node itself

    def stale(self, now: float, after: float = STALE_AFTER) -> bool:
        return now - self.heartbeat > after


def node_path(cluster: str, node: str) -> str:
    return f"/registry/{encode_token(cluster)}/{encode_token(node)}"


def away_path(cluster: str, node: str) -> str:
    return f"{AWAY_ROOT}/{encode_token(cluster)}/{encode_token(node)}"


def node_lock(zk: ZkSession, cluster: str, node: str) -> FairSemaphore:
    """The lock a cron-mode run holds on its node while it drains, so that two runs for one node
    (an overlapping cron run on another host, a second run started by hand) never act at once."""
    return FairSemaphore(zk, f"{NODE_LOCKS_ROOT}/{encode_token(cluster)}/{encode_token(node)}", 1)


class AwayNote(msgspec.Struct, frozen=True):
    """A runner that left on purpose: items for its node may wait for it until `until`."""

    until: float


class ProcessBeat(msgspec.Struct, frozen=True):
    heartbeat: float


class ProcessHeartbeat:
    """One heartbeat for every node this process registers (see the module docstring)."""

    def __init__(self, zk: ZkSession) -> None:
        self.zk = zk
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}".replace("/", "_")
        self.path = f"{PROCESS_ROOT}/{encode_token(self.id)}"
        self.registrations: list[Registration] = []

    async def start(self) -> None:
        await self.zk.client.ensure_path(PROCESS_ROOT)
        with contextlib.suppress(exc.NodeExists):
            await self.zk.client.create(self.path, data=self._beat(), ephemeral=True)

    @staticmethod
    def _beat() -> bytes:
        return msgspec.json.encode(ProcessBeat(heartbeat=time.time()))

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until `stop`; when our session was lost (our znode is gone, and with it every node's),
        register everything again."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_SECONDS)
            try:
                await self.zk.client.set_data(self.path, self._beat(), force=True)
            except exc.NoNode:
                await self.start()
                for r in self.registrations:
                    await r.register()
            except Exception as e:
                log.warning("process heartbeat failed process=%s error=%r", self.id, e)


class Registration:
    """Registers one node's runner and keeps its heartbeat fresh while it runs (or lets `process`
    beat for it)."""

    def __init__(
        self,
        zk: ZkSession,
        cluster: str,
        node: str,
        version: str,
        actions: list[str],
        *,
        process: ProcessHeartbeat | None = None,
        away_grace: float = 0.0,
    ) -> None:
        self.zk = zk
        self.process = process
        self.away_grace = away_grace
        self.info = RunnerInfo(
            cluster=cluster,
            node=node,
            pid=os.getpid(),
            version=version,
            actions=tuple(actions),
            since=time.time(),
            heartbeat=time.time(),
            process=process.id if process else "",
        )
        self.path = node_path(cluster, node)
        self.away = away_path(cluster, node)
        if process is not None:
            process.registrations.append(self)

    async def register(self) -> None:
        """Create our ephemeral node (replacing a dead predecessor's, if its session still lingers)."""
        await self.zk.client.ensure_path(self.path.rsplit("/", 1)[0])
        with contextlib.suppress(exc.NoNode):
            await self.zk.client.delete(self.path, force=True)
        await self.zk.client.create(self.path, data=msgspec.json.encode(self.info), ephemeral=True)
        with contextlib.suppress(exc.NoNode):
            await self.zk.client.delete(self.away, force=True)

    async def leave(self) -> None:
        """A clean exit: with an `away_grace`, leave a note that items may wait that long for us."""
        if self.away_grace <= 0:
            return
        note = msgspec.json.encode(AwayNote(until=time.time() + self.away_grace))
        try:
            await self.zk.client.ensure_path(self.away.rsplit("/", 1)[0])
            try:
                await self.zk.client.create(self.away, data=note)
            except exc.NodeExists:
                await self.zk.client.set_data(self.away, note, force=True)
        except Exception as e:
            log.warning("away note not written node=%s error=%r", self.info.node, e)

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Refresh the heartbeat until `stop`; re-register if the node vanished (session expired).
        With a process heartbeat, that one beats for us: this only waits for `stop`."""
        if self.process is not None:
            await stop.wait()
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_SECONDS)
            self.info = msgspec.structs.replace(self.info, heartbeat=time.time())
            try:
                await self.zk.client.set_data(self.path, msgspec.json.encode(self.info), force=True)
            except exc.NoNode:
                await self.register()
            except Exception as e:
                log.warning("registry heartbeat failed node=%s error=%r", self.info.node, e)


async def registered(zk: ZkSession, cluster: str | None = None) -> list[RunnerInfo]:
    """Registered runners, of one cluster or all."""
    client = zk.client
    try:
        clusters = [encode_token(cluster)] if cluster else await client.get_children("/registry")
    except exc.NoNode:
        return []
    out: list[RunnerInfo] = []
    beats: dict[str, float | None] = {}
    for ctok in sorted(clusters):
        try:
            nodes = await client.get_children(f"/registry/{ctok}")
        except exc.NoNode:
            continue
        for ntok in sorted(nodes):
            with contextlib.suppress(exc.NoNode, msgspec.DecodeError):
                data = await client.get_data(f"/registry/{ctok}/{ntok}")
                info = msgspec.json.decode(data, type=RunnerInfo)
                if info.process:
                    if info.process not in beats:
                        beats[info.process] = await _process_beat(zk, info.process)
                    beat = beats[info.process]
                    info = msgspec.structs.replace(info, heartbeat=beat if beat is not None else 0.0)
                out.append(info)
    return out


async def _process_beat(zk: ZkSession, process: str) -> float | None:
    try:
        data = await zk.client.get_data(f"{PROCESS_ROOT}/{encode_token(process)}")
        return msgspec.json.decode(data, type=ProcessBeat).heartbeat
    except (exc.NoNode, msgspec.DecodeError):
        return None


async def unserved(zk: ZkSession, cluster: str, names: list[str], now: float) -> list[str]:
    """The names, in order, that have neither a registered runner nor a valid away note. Two
    listings and one read per away note, AWAY_READS of them in flight at once (one at a time,
    10,000 away nodes cost a round trip each: seconds of a fan-out). Up to LOOKUPS_UP_TO names are
    looked up one by one, at once, instead of listing the cluster's registry: a one-node task on
    a fleet of thousands reads one small answer, not a thousand names."""
    ctok = encode_token(cluster)
    if len(names) <= LOOKUPS_UP_TO:
        found = await asyncio.gather(
            *(zk.client.exists(f"/registry/{ctok}/{encode_token(n)}") for n in names)
        )
        missing = [n for n, there in zip(names, found, strict=True) if not there]
    else:
        registered = set(await children(zk, f"/registry/{ctok}"))
        missing = [n for n in names if encode_token(n) not in registered]
    if not missing:
        return []
    notes = set(await children(zk, f"{AWAY_ROOT}/{ctok}"))
    window = asyncio.Semaphore(AWAY_READS)

    async def away(name: str) -> bool:
        if encode_token(name) not in notes:
            return False
        async with window:
            with contextlib.suppress(exc.NoNode, msgspec.DecodeError):
                data = await zk.client.get_data(away_path(cluster, name))
                return msgspec.json.decode(data, type=AwayNote).until > now
        return False

    notes_found = await asyncio.gather(*(away(n) for n in missing))
    return [n for n, is_away in zip(missing, notes_found, strict=True) if not is_away]


async def live_nodes(zk: ZkSession, cluster: str) -> list[str]:
    """Nodes of a cluster whose runner is registered and not stale."""
    now = time.time()
    return [r.node for r in await registered(zk, cluster) if not r.stale(now)]
