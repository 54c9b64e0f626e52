"""Per-cluster safety state in ZooKeeper: the disruption budget, the circuit breaker and counters.

Paths (under the chroot): `/clusters/<cluster>/config` (budget, windows, freeze),
`/clusters/<cluster>/breaker`, `/clusters/<cluster>/budget` and
`/clusters/<cluster>/exclusion/<group>` (semaphores, see coord/semaphore.py),
`/stats/<cluster>/<action>`. Decisions are pure functions; the I/O is
compare-and-set on JSON znodes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
from aiozk import exc

from taskcore.coord import watches
from taskcore.coord.session import ZkSession, read_json, update_json
from taskcore.core.settings import Settings
from taskcore.core.subjects import encode_token
from taskcore.core.windows import Closed, check_windows, gate

BREAKER_BACKSTOP = 60.0  # a waiter looks at an open breaker again after this, watch or no watch

BreakerStateName = Literal["closed", "open", "half-open"]


def cluster_path(cluster: str, *parts: str) -> str:
    return "/".join([f"/clusters/{encode_token(cluster)}", *parts])


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Operator settings of one cluster; `budget` None means unlimited (only task limits apply).
    `windows` (core/windows.py): work starts only while one is open (none: always); a freeze
    (`freeze_until`, with its reason and who set it) stops anything new starting until then."""

    budget: int | None = None
    windows: tuple[str, ...] = ()
    freeze_until: float | None = None
    freeze_reason: str = ""
    frozen_by: str = ""

    def closed(self, now: float) -> Closed | None:
        """Why work may not start on the cluster now, or None."""
        return gate(self.windows, self.freeze_until, self.freeze_reason, now)


class BreakerPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """`threshold` failures within `window` seconds open the breaker; `cooldown` > 0 lets it half-open."""

    threshold: int = 5
    window: float = 600.0
    cooldown: float = 0.0


class BreakerState(msgspec.Struct, frozen=True, kw_only=True):
    """The breaker of one cluster, as stored."""

    state: Literal["closed", "open"] = "closed"
    failures: tuple[float, ...] = ()
    opened_at: float | None = None
    reason: str = ""
    # half-open admits one probe: who claimed it and when (a probe that neither succeeds nor fails
    # within a cooldown, its runner dead, gives its turn to the next waiter)
    probe: str = ""
    probe_at: float | None = None


def after_failure(
    s: BreakerState | None, now: float, policy: BreakerPolicy, reason: str, trip: bool
) -> BreakerState:
    """A failure is recorded; `trip` (a post_check failure) or reaching the threshold opens it, and
    any failure while half-open opens it again."""
    s = s or BreakerState()
    recent = (*(t for t in s.failures if t > now - policy.window), now)
    if s.state == "open":
        if view_state(s, now, policy) == "half-open":  # the probe failed: open for another cooldown
            return msgspec.structs.replace(s, failures=recent, opened_at=now, probe="", probe_at=None)
        return msgspec.structs.replace(s, failures=recent)
    if trip or len(recent) >= policy.threshold:
        return BreakerState(state="open", failures=recent, opened_at=now, reason=reason)
    return msgspec.structs.replace(s, failures=recent)


def after_success(s: BreakerState | None, now: float, policy: BreakerPolicy) -> BreakerState | None:
    """A success while half-open closes the breaker; otherwise nothing changes (None)."""
    if s is not None and view_state(s, now, policy) == "half-open":
        return BreakerState()
    return None


def may_probe(s: BreakerState, now: float, policy: BreakerPolicy, who: str) -> bool:
    """Half-open lets one waiter through, the probe: `who` may go when no live probe is out (or it
    is the probe already)."""
    if view_state(s, now, policy) != "half-open":
        return False
    stale = s.probe_at is None or now - s.probe_at >= policy.cooldown
    return not s.probe or s.probe == who or stale


def claim_probe(s: BreakerState | None, now: float, policy: BreakerPolicy, who: str) -> BreakerState:
    """The state with `who` as the probe, if it may be; else unchanged."""
    s = s or BreakerState()
    if may_probe(s, now, policy, who):
        return msgspec.structs.replace(s, probe=who, probe_at=now)
    return s


def view_state(s: BreakerState, now: float, policy: BreakerPolicy) -> BreakerStateName:
    """closed, open, or half-open (open, but its cool-down has passed: work may try again)."""
    cooled = policy.cooldown > 0 and s.opened_at is not None and now - s.opened_at >= policy.cooldown
    if s.state == "open" and cooled:
        return "half-open"
    return s.state


class Breaker:
    """The circuit breaker of one cluster."""

    def __init__(self, zk: ZkSession, cluster: str, policy: BreakerPolicy) -> None:
        self.zk = zk
        self.cluster = cluster
        self.policy = policy
        self.path = cluster_path(cluster, "breaker")

    async def read(self) -> BreakerState:
        return await read_json(self.zk, self.path, BreakerState) or BreakerState()

    async def state(self) -> BreakerStateName:
        return view_state(await self.read(), time.time(), self.policy)

    async def record_failure(self, reason: str, trip: bool = False) -> tuple[BreakerState, bool]:
        """The state after the failure, and whether this failure opened the breaker (it was
        closed, or half-open with its probe failing)."""
        decided_on: list[BreakerState] = []  # the state the committed write was decided on

        def change(s: BreakerState | None) -> BreakerState:
            decided_on[:] = [s or BreakerState()]
            return after_failure(s, time.time(), self.policy, reason, trip)

        after = await update_json(self.zk, self.path, BreakerState, change)
        opened = after.state == "open" and view_state(decided_on[0], time.time(), self.policy) != "open"
        return after, opened

    async def record_success(self) -> None:
        """Close a half-open breaker (the probe succeeded); compare-and-set, so that a failure
        recorded meanwhile is never overwritten. Nothing is written in the common case."""
        if after_success(await self.read(), time.time(), self.policy) is None:
            return
        await update_json(
            self.zk,
            self.path,
            BreakerState,
            lambda s: after_success(s, time.time(), self.policy) or s or BreakerState(),
        )

    async def reset(self) -> BreakerState:
        return await update_json(self.zk, self.path, BreakerState, lambda _s: BreakerState())

    async def wait_closed(
        self,
        max_wait: float | None = None,
        who: str = "",
        on_open: Callable[[BreakerState, BreakerStateName], Awaitable[None]] | None = None,
    ) -> None:
        """Return once work may start on the cluster: closed, or half-open with `who` admitted as
        its one probe (claimed by compare-and-set; with no `who`, any half-open admits);
        TimeoutError past `max_wait` (None: as long as it takes). Waits on a data watch, so a reset
        or the probe's outcome is seen at once; it looks again only when a cooldown ends, or after a
        slow backstop. `on_open` is awaited with the state read (and how it is seen) each time the
        breaker holds us back, before we sleep: whoever waits can say why."""
        deadline = None if max_wait is None else time.monotonic() + max_wait
        client = self.zk.client
        while True:
            with watches.Watch(client, [watches.DATA, watches.CREATED, watches.DELETED], self.path) as w:
                with contextlib.suppress(exc.NoNode):
                    await client.exists(self.path, watch=True)
                s = await self.read()
                now = time.time()
                seen = view_state(s, now, self.policy)
                if seen == "closed" or (seen == "half-open" and not who):
                    return
                if may_probe(s, now, self.policy, who) and await self._claim(who):
                    return
                wait = BREAKER_BACKSTOP
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"breaker of {self.cluster!r} is open: {s.reason}")
                    wait = min(wait, left)
                if self.policy.cooldown > 0:
                    ends = s.probe_at if seen == "half-open" else s.opened_at  # a cooldown, or a probe's turn
                    if ends is not None:
                        wait = min(wait, max(ends + self.policy.cooldown - time.time(), 0.05))
                if on_open is not None:
                    await on_open(s, seen)
                await w.wait(wait)

    async def _claim(self, who: str) -> bool:
        now = time.time()
        s = await update_json(
            self.zk, self.path, BreakerState, lambda s: claim_probe(s, now, self.policy, who)
        )
        return s.probe == who


DOWN = "(down)"  # the task part of the budget holder a down node occupies: `(down)/<node>`


def down_holder(node: str) -> str:
    """The holder id of the budget slot a down node occupies (the runner's health watch)."""
    return f"{DOWN}/{node}"


def down_node(holder: str) -> str | None:
    """The node of a down node's budget holder (`(down)/<node>#<uid>`), else None."""
    task, _, rest = holder.partition("/")
    return rest.rsplit("#", 1)[0] if task == DOWN and rest else None


async def read_config(zk: ZkSession, cluster: str) -> ClusterConfig:
    return await read_json(zk, cluster_path(cluster, "config"), ClusterConfig) or ClusterConfig()


async def set_windows(zk: ZkSession, cluster: str, spec: list[str]) -> ClusterConfig:
    """Set a cluster's maintenance windows (none: always open); WindowError for a bad one."""
    checked = check_windows(spec)
    return await _update_config(zk, cluster, lambda c: msgspec.structs.replace(c, windows=checked))


async def freeze(zk: ZkSession, cluster: str, until: float, reason: str, by: str) -> ClusterConfig:
    """Nothing new starts on the cluster until `until`; `until` in the past lifts a freeze."""
    return await _update_config(
        zk,
        cluster,
        lambda c: msgspec.structs.replace(c, freeze_until=until, freeze_reason=reason, frozen_by=by),
    )


async def _update_config(
    zk: ZkSession, cluster: str, change: Callable[[ClusterConfig], ClusterConfig]
) -> ClusterConfig:
    return await update_json(
        zk, cluster_path(cluster, "config"), ClusterConfig, lambda c: change(c or ClusterConfig())
    )


async def wait_config_change(zk: ZkSession, cluster: str, at_most: float) -> None:
    """Return when the cluster's config changes (a window set, a freeze lifted) or after
    `at_most` seconds."""
    path = cluster_path(cluster, "config")
    with watches.Watch(zk.client, [watches.DATA, watches.CREATED, watches.DELETED], path) as w:
        with contextlib.suppress(exc.NoNode):
            await zk.client.exists(path, watch=True)
        await w.wait(max(at_most, 0.05))


async def set_budget(zk: ZkSession, cluster: str, budget: int | None) -> ClusterConfig:
    """Set (or with None, remove) a cluster's disruption budget."""
    if budget is not None and budget < 1:
        raise ValueError(f"a budget must be >= 1, got {budget}")
    return await update_json(
        zk,
        cluster_path(cluster, "config"),
        ClusterConfig,
        lambda c: msgspec.structs.replace(c or ClusterConfig(), budget=budget),
    )


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters per cluster and action."""

    executions: int = 0
    failures: int = 0
    lease_wait_s: float = 0.0


def stats_path(cluster: str, action: str) -> str:
    return f"/stats/{encode_token(cluster)}/{encode_token(action)}"


def added(s: Stats | None, *, failed: bool, lease_wait_s: float) -> Stats:
    """`s` with one more execution (maybe failed) and its lease wait."""
    return plus(s, Stats(executions=1, failures=int(failed), lease_wait_s=lease_wait_s))


def plus(s: Stats | None, more: Stats) -> Stats:
    s = s or Stats()
    return Stats(
        executions=s.executions + more.executions,
        failures=s.failures + more.failures,
        lease_wait_s=s.lease_wait_s + more.lease_wait_s,
    )


async def count(zk: ZkSession, cluster: str, action: str, more: Stats) -> Stats:
    """Add executions, failures and lease waits (`added`) to the cluster's counters."""
    return await update_json(zk, stats_path(cluster, action), Stats, lambda s: plus(s, more))


def breaker_policy(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        threshold=settings.breaker_threshold,
        window=settings.breaker_window,
        cooldown=settings.breaker_cooldown,
    )
