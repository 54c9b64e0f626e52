"""The runner registry: each runner's ephemeral znode under `/registry/<cluster>/<node>`, with a
heartbeat; discovery `registry` and `taskerman nodes` read it and tell live runners from stale."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import msgspec
from aiozk import exc

from taskcore.coord.session import ZkSession
from taskcore.core.subjects import encode_token

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0
STALE_AFTER = 3 * HEARTBEAT_SECONDS


class RunnerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a runner says about itself."""

    cluster: str
    node: str
    pid: int
    version: str
    actions: tuple[str, ...]
    since: float
    heartbeat: float

    def stale(self, now: float, after: float = STALE_AFTER) -> bool:
        return now - self.heartbeat > after


def node_path(cluster: str, node: str) -> str:
    return f"/registry/{encode_token(cluster)}/{encode_token(node)}"


class Registration:
    """Registers one node's runner and keeps its heartbeat fresh while it runs."""

    def __init__(self, zk: ZkSession, cluster: str, node: str, version: str, actions: list[str]) -> None:
        self.zk = zk
        self.info = RunnerInfo(
            cluster=cluster,
            node=node,
            pid=os.getpid(),
            version=version,
            actions=tuple(actions),
            since=time.time(),
            heartbeat=time.time(),
        )
        self.path = node_path(cluster, node)

    async def register(self) -> None:
        """Create our ephemeral node (replacing a dead predecessor's, if its session still lingers)."""
        await self.zk.client.ensure_path(self.path.rsplit("/", 1)[0])
        with contextlib.suppress(exc.NoNode):
            await self.zk.client.delete(self.path, force=True)
        await self.zk.client.create(self.path, data=msgspec.json.encode(self.info), ephemeral=True)

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Refresh the heartbeat until `stop`; re-register if the node vanished (session expired)."""
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
    for ctok in sorted(clusters):
        try:
            nodes = await client.get_children(f"/registry/{ctok}")
        except exc.NoNode:
            continue
        for ntok in sorted(nodes):
            with contextlib.suppress(exc.NoNode, msgspec.DecodeError):
                data = await client.get_data(f"/registry/{ctok}/{ntok}")
                out.append(msgspec.json.decode(data, type=RunnerInfo))
    return out


async def live_nodes(zk: ZkSession, cluster: str) -> list[str]:
    """Nodes of a cluster whose runner is registered and not stale."""
    now = time.time()
    return [r.node for r in await registered(zk, cluster) if not r.stale(now)]
