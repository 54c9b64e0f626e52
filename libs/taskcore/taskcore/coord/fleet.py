"""The fleet as ZooKeeper records it, read in one place for the operator commands and the fleet
gauges: the clusters that have a znode and their circuit breakers. Reads only; the writers are
`clusters`, `leases` and `runners`."""

from __future__ import annotations

import contextlib
import logging

import msgspec
from aiozk import exc

from taskcore.coord import clusters
from taskcore.coord.clusters import BreakerPolicy, BreakerState, BreakerStateName
from taskcore.coord.session import ZkSession, read_json
from taskcore.core.errors import InvalidName
from taskcore.core.subjects import decode_token

CLUSTERS_ROOT = "/clusters"
log = logging.getLogger(__name__)


class BreakerReading(msgspec.Struct, frozen=True, kw_only=True):
    """A cluster's breaker record and the state it shows now (open turns half-open on cool-down)."""

    cluster: str
    state: BreakerStateName
    record: BreakerState


async def children(zk: ZkSession, path: str) -> list[str]:
    """The children of `path`, sorted; none when it does not exist."""
    try:
        found: list[str] = await zk.client.get_children(path)
    except exc.NoNode:
        return []
    return sorted(found)


async def cluster_names(zk: ZkSession) -> list[str]:
    """Every cluster that has a znode (budgets, breakers, exclusion groups); foreign znodes whose
    names do not decode are skipped."""
    names: list[str] = []
    for token in await children(zk, CLUSTERS_ROOT):
        with contextlib.suppress(InvalidName):
            names.append(decode_token(token))
    return names


async def breaker(zk: ZkSession, cluster: str, policy: BreakerPolicy, now: float) -> BreakerReading:
    """One cluster's breaker (closed when none was ever recorded)."""
    record = await clusters.Breaker(zk, cluster, policy).read()
    return BreakerReading(cluster=cluster, state=clusters.view_state(record, now, policy), record=record)


async def breakers(zk: ZkSession, policy: BreakerPolicy, now: float) -> list[BreakerReading]:
    """Every cluster whose breaker was ever recorded (a reset one reads closed), by cluster name.
    A record that does not decode is logged and left out rather than hiding all the others."""
    out: list[BreakerReading] = []
    for cluster in await cluster_names(zk):
        try:
            record = await read_json(zk, clusters.cluster_path(cluster, "breaker"), BreakerState)
        except msgspec.DecodeError as e:
            log.warning("breaker record unreadable cluster=%s error=%r", cluster, e)
            continue
        if record is not None:
            state = clusters.view_state(record, now, policy)
            out.append(BreakerReading(cluster=cluster, state=state, record=record))
    return out


def znode_name(token: str) -> str:
    """The name a znode token encodes (the raw token for a foreign znode)."""
    try:
        return decode_token(token)
    except InvalidName:
        return token
