"""Stops reach waiting nodes as they happen, without polling.

A stop record is a KV put on `stop.<task>`, which JetStream publishes on `$KV.<bucket>.stop.<task>`.
One plain subscription per process hears every stop and wakes the nodes waiting on that task, so
a thousand nodes waiting for their turn cost the server one subscription, and no request a second.
A waiter registers first and reads the record after (a stop in between is then heard, not missed);
a wake-up is only a hint: the waiter reads the record to see what happened."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from taskcore.bus.tracking import stop_key
from taskcore.core import subjects


class StopSignals:
    """Wakes the waiters of a task when its stop record is written."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._sub: Subscription | None = None
        self._prefix = f"$KV.{subjects.STATUS_BUCKET}."

    async def _ensure(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(f"{self._prefix}stop.>", cb=self._on_stop)

    async def _on_stop(self, msg: Msg) -> None:
        for event in self._waiters.get(msg.subject.removeprefix(self._prefix), ()):
            event.set()

    @contextlib.asynccontextmanager
    async def watching(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the task's stop record changes, while the block runs."""
        await self._ensure()
        key = stop_key(task_id)
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]

    def waiting(self) -> int:
        """How many waits are registered (tests watch this return to zero)."""
        return sum(len(w) for w in self._waiters.values())

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
