"""Stop and pause signals on a real nats-server: a waiter is woken once the change can be read,
not when the stream's input is heard (a resume read too early left a task paused for ever)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from taskcore.bus import jetstream as bus
from taskcore.bus.stops import StopSignals
from taskcore.bus.tracking import PauseRecord, StatusStore
from taskcore.core.model import NodeRecord
from taskerman_dev.launchers import NatsServer

CYCLES = 60  # pause and resume, each read at once; without the read-back ~7 % of reads are stale
WAKE_WAIT = 5.0  # for a wake-up after which the read shows the change (the read-back waits < 2 s)


@pytest.fixture
async def connections(nats_server: NatsServer, nats_auth: dict[str, str]) -> AsyncIterator[list[NATS]]:
    """The writer's, the waiter's and a busy neighbour's connections."""
    ncs = [await nats.connect(nats_server.url, **nats_auth) for _ in range(3)]
    try:
        yield ncs
    finally:
        for nc in ncs:
            await nc.close()


async def _store(nc: NATS) -> StatusStore:
    return StatusStore(await bus.status_bucket(nc.jetstream()))


@contextlib.asynccontextmanager
async def _busy_stream(nc: NATS, prefix: str) -> AsyncIterator[None]:
    """Node records written as fast as the server takes them: the stream stores behind its input."""
    status = await _store(nc)
    record = NodeRecord(state="running", attempts=1)

    async def write() -> None:
        while True:
            await asyncio.gather(
                *(status.put_node(f"{prefix}-busy", f"n{i}", record) for i in range(100)),
                return_exceptions=True,
            )

    writers = [asyncio.create_task(write()) for _ in range(3)]
    await asyncio.sleep(0.3)
    try:
        yield
    finally:
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)


async def _woken_to(
    heard: asyncio.Event, reader: StatusStore, task_id: str, paused: bool
) -> asyncio.Task[None]:
    """The runner's lease wait, in small: on each wake-up read the pause, until it is as
    expected. A read made too early finds it unchanged, and no wake-up comes again."""
    heard.clear()

    async def wait() -> None:
        while True:
            await heard.wait()
            heard.clear()
            if (await reader.paused(task_id) is not None) == paused:
                return

    waiting = asyncio.create_task(wait())
    await asyncio.sleep(0)  # waiting before the write is sent
    return waiting


async def _done(woken: asyncio.Task[None]) -> bool:
    """Whether the waiter saw the change within WAKE_WAIT seconds (it is cancelled if not)."""
    await asyncio.wait({woken}, timeout=WAKE_WAIT)
    woken.cancel()
    return woken.done() and not woken.cancelled()


async def test_a_waiter_woken_by_a_pause_or_a_resume_reads_the_change(
    connections: list[NATS], prefix: str
) -> None:
    writer_nc, waiter_nc, busy_nc = connections
    writer, reader = await _store(writer_nc), await _store(waiter_nc)
    signals = StopSignals(waiter_nc, reader.kv)
    task_id = f"{prefix}-px"
    missed = None
    async with _busy_stream(busy_nc, prefix), signals.watching(task_id) as heard:
        await waiter_nc.flush()  # the subscriptions are in place before the first change
        for i in range(CYCLES):
            woken = await _woken_to(heard, reader, task_id, paused=True)
            await writer.pause(task_id, PauseRecord(by="alice", at=time.time(), reason=str(i)))
            if not await _done(woken):
                missed = f"pause {i}"
                break
            woken = await _woken_to(heard, reader, task_id, paused=False)
            await writer.resume(task_id)
            if not await _done(woken):
                missed = f"resume {i}"
                break
    await signals.close()
    assert missed is None, f"the waiter read the record from before the change at {missed}"
    assert signals.waiting() == 0


async def test_a_refused_write_still_wakes_the_waiters(connections: list[NATS], prefix: str) -> None:
    """A second pause is refused by the stream but heard: the waiters are woken after the
    read-back's patience and find the first pause unchanged."""
    writer_nc, waiter_nc, _ = connections
    writer, reader = await _store(writer_nc), await _store(waiter_nc)
    signals = StopSignals(waiter_nc, reader.kv)
    task_id = f"{prefix}-px"
    first = PauseRecord(by="alice", at=time.time(), reason="first")
    assert await writer.pause(task_id, first)
    async with signals.watching(task_id) as heard:
        await waiter_nc.flush()
        assert not await writer.pause(task_id, PauseRecord(by="bob", at=time.time(), reason="second"))
        await asyncio.wait_for(heard.wait(), 30)
    assert await reader.paused(task_id) == first
    await signals.close()


async def test_a_canary_waiter_is_woken_by_its_canary_nodes_records_only(
    connections: list[NATS], prefix: str
) -> None:
    """The waiters behind a canary hear the records of the canary nodes, not each other's notes:
    with a thousand of them in one process, each note would otherwise wake all of them."""
    writer_nc, waiter_nc, _ = connections
    writer, reader = await _store(writer_nc), await _store(waiter_nc)
    signals = StopSignals(waiter_nc, reader.kv)
    task_id = f"{prefix}-canary"
    async with signals.watching_nodes(task_id, ["c-1"]) as heard:
        await waiter_nc.flush()
        for i in range(5):  # the other waiters write what they wait for
            await writer.put_node(task_id, f"n-{i}", NodeRecord(state="pending"))
        await writer_nc.flush()
        await asyncio.sleep(0.5)  # every note has arrived, and would have been read back by now
        assert not heard.is_set()
        await writer.put_node(task_id, "c-1", NodeRecord(state="succeeded"))
        await asyncio.wait_for(heard.wait(), 30)
        assert (await reader.get_node(task_id, "c-1")) == NodeRecord(state="succeeded")
    assert signals.waiting() == 0
    await signals.close()
