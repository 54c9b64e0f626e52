"""Stops and pauses reach waiting nodes as they happen, without polling.

A stop record is a KV put on `stop.<task>`, a pause a put on `pause.<task>` and a resume its
delete; JetStream publishes each on `$KV.<bucket>.<key>`. One plain subscription per kind and
process hears them all and wakes the nodes waiting on that task, so a thousand nodes waiting for
their turn cost the server two subscriptions, and no request a second. A waiter registers first
and reads the records after (a change in between is then heard, not missed); a wake-up is only a
hint: the waiter reads the records to see what happened."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from taskcore.core import subjects
from taskcore.core.subjects import encode_token

KINDS = ("stop", "pause")  # the key kinds a waiter hears: `<kind>.<task token>`


class StopSignals:
    """Wakes the waiters of a task when its stop or pause record changes."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._waiters: dict[str, set[asyncio.Event]] = {}  # by task token
        self._subs: list[Subscription] = []
        self._prefix = f"$KV.{subjects.STATUS_BUCKET}."
        self._node_waiters: dict[str, set[asyncio.Event]] = {}  # by task token
        self._node_subs: dict[str, Subscription] = {}
        self._node_lock = asyncio.Lock()

    async def _ensure(self) -> None:
        if not self._subs:
            for kind in KINDS:
                self._subs.append(await self.nc.subscribe(f"{self._prefix}{kind}.>", cb=self._on_change))

    async def _on_change(self, msg: Msg) -> None:
        _kind, _, token = msg.subject.removeprefix(self._prefix).partition(".")
        for event in self._waiters.get(token, ()):
            event.set()

    @contextlib.asynccontextmanager
    async def watching(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the task's stop or pause record changes, while the block runs."""
        await self._ensure()
        token = encode_token(task_id)
        event = asyncio.Event()
        self._waiters.setdefault(token, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(token)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[token]

    @contextlib.asynccontextmanager
    async def watching_nodes(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever a node record of the task changes, while the block runs: for the
        nodes that wait for the task's canary. One subscription per task while anyone waits (a
        canary's nodes are few, the waiters for them many), gone with the last waiter."""
        token = encode_token(task_id)
        event = asyncio.Event()
        waiters = self._node_waiters.setdefault(token, set())
        waiters.add(event)
        try:
            async with self._node_lock:  # one subscription per task, whoever comes first
                if token not in self._node_subs:

                    async def wake(_msg: Msg) -> None:
                        for e in self._node_waiters.get(token, ()):
                            e.set()

                    subject = f"{self._prefix}node.{token}.>"
                    self._node_subs[token] = await self.nc.subscribe(subject, cb=wake)
            yield event
        finally:
            waiters.discard(event)
            async with self._node_lock:
                if not waiters and self._node_waiters.get(token) is waiters:
                    del self._node_waiters[token]
                    if sub := self._node_subs.pop(token, None):
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()

    def waiting(self) -> int:
        """How many waits are registered (tests watch this return to zero)."""
        return sum(len(w) for w in (*self._waiters.values(), *self._node_waiters.values()))

    async def close(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
