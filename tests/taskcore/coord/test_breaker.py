"""The circuit breaker: its pure transitions, and on real ZooKeeper one half-open probe at a time
and a success that never overwrites a failure recorded meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskcore.coord import clusters
from taskcore.coord.clusters import Breaker, BreakerPolicy, BreakerState
from taskcore.coord.session import ZkSession
from taskerman_dev.launchers import ZooKeeperServer

POLICY = BreakerPolicy(threshold=1, window=600, cooldown=0.5)


def opened(at: float) -> BreakerState:
    return BreakerState(state="open", failures=(at,), opened_at=at, reason="boom")


def test_half_open_admits_one_probe_until_it_goes_stale() -> None:
    s = opened(0.0)
    assert not clusters.may_probe(s, 0.1, POLICY, "a")  # still cooling down
    claimed = clusters.claim_probe(s, 1.0, POLICY, "a")
    assert (claimed.probe, claimed.probe_at) == ("a", 1.0)
    assert clusters.may_probe(claimed, 1.1, POLICY, "a")  # the probe itself, again
    assert not clusters.may_probe(claimed, 1.1, POLICY, "b")
    assert clusters.claim_probe(claimed, 1.1, POLICY, "b") == claimed
    assert clusters.may_probe(claimed, 1.6, POLICY, "b")  # a probe silent for a cooldown: next one


def test_a_failed_probe_opens_for_another_cooldown_and_a_success_closes() -> None:
    claimed = clusters.claim_probe(opened(0.0), 1.0, POLICY, "a")
    again = clusters.after_failure(claimed, 1.2, POLICY, "still broken", trip=False)
    assert (again.state, again.opened_at, again.probe) == ("open", 1.2, "")
    assert clusters.view_state(again, 1.3, POLICY) == "open"
    assert clusters.after_success(claimed, 1.2, POLICY) == BreakerState()
    assert clusters.after_success(BreakerState(), 1.2, POLICY) is None  # closed: nothing to write


@pytest.fixture
async def breaker(
    zk_credentials: dict[str, Any], zk_server: ZooKeeperServer, prefix: str
) -> AsyncIterator[Breaker]:
    async with ZkSession(zk_server.hosts, f"/{prefix}", 6.0, **zk_credentials) as zk:
        yield Breaker(zk, "pg:probe", POLICY)


async def test_one_waiter_probes_a_half_open_breaker_the_rest_wait_for_its_outcome(breaker: Breaker) -> None:
    await breaker.record_failure("boom")
    assert await breaker.state() == "open"
    waiters = {who: asyncio.create_task(breaker.wait_closed(None, who=who)) for who in ("a", "b", "c")}
    done, pending = await asyncio.wait(waiters.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.2)  # the others had every chance to pass too
    assert len(done) == 1, "half-open let more than one probe through"
    [probe] = [who for who, t in waiters.items() if t.done()]
    assert (await breaker.read()).probe == probe
    await breaker.record_success()  # the probe succeeded: closed, everyone goes
    await asyncio.wait_for(asyncio.gather(*pending), timeout=5)
    assert await breaker.state() == "closed"


async def test_a_success_does_not_overwrite_a_failure_recorded_meanwhile(
    breaker: Breaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await breaker.record_failure("boom")
    await asyncio.wait_for(breaker.wait_closed(None, who="a"), timeout=5)  # half-open, "a" probes
    seen = await breaker.read()  # the success reads the breaker half-open ...
    await breaker.record_failure("the probe failed")  # ... a failure reopens it just then ...

    async def stale() -> BreakerState:
        return seen

    monkeypatch.setattr(breaker, "read", stale)
    await breaker.record_success()  # ... and the success lands after it
    monkeypatch.undo()
    s = await breaker.read()
    assert s.state == "open", s
    assert clusters.view_state(s, time.time(), POLICY) == "open"  # a fresh cooldown
