"""Stops and pauses reach waiting nodes as they happen, without polling.

A stop record is a KV put on `stop.<task>`, a pause a put on `pause.<task>` and a resume its
delete; JetStream publishes each on `$KV.<bucket>.<key>`. One plain subscription per kind and
process hears them all and wakes the nodes waiting on that task, so a thousand nodes waiting for
their turn cost the server two subscriptions, and no request a second. A waiter registers first
and reads the records after (a change in between is then heard, not missed); a wake-up is only a
hint: the waiter reads the records to see what happened.

A plain subscription hears the stream's *input*: the message can arrive before the stream has
stored it (measured: 44 of 600 reads made at once saw the record from before the change, with
the stream busy), and a waiter that read too early would wait on, woken by nothing, for ever (a
resumed task whose nodes stay paused). So a change is first read back here, once per process,
until the stream holds what the message says; only then are the waiters woken. A write the stream
refused (a second pause, a lost compare-and-set) is heard too and never stored: after
STORED_PAUSES the waiters are woken anyway, and find nothing new."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from taskcore.core import subjects
from taskcore.core.subjects import encode_token

log = logging.getLogger(__name__)

KINDS = ("stop", "pause")  # the key kinds a waiter hears: `<kind>.<task token>`
STORED_PAUSES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)  # reads back a change (1.6 s), then wakes anyway


class StopSignals:
    """Wakes the waiters of a task when its stop or pause record changes."""

    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self.nc = nc
        self.kv = kv  # the status bucket, read as every reader of it does
        self._waiters: dict[str, set[asyncio.Event]] = {}  # by task token
        self._subs: list[Subscription] = []
        self._prefix = f"$KV.{subjects.STATUS_BUCKET}."
        # by task token: each waiter's event with the node tokens whose records it waits on
        self._node_waiters: dict[str, dict[asyncio.Event, frozenset[str]]] = {}
        self._node_subs: dict[str, Subscription] = {}
        self._node_lock = asyncio.Lock()
        self._waking: set[asyncio.Task[None]] = set()

    async def _ensure(self) -> None:
        if not self._subs:
            for kind in KINDS:
                self._subs.append(await self.nc.subscribe(f"{self._prefix}{kind}.>", cb=self._on_change))

    async def _on_change(self, msg: Msg) -> None:
        """Read back even when nobody waits on the task yet: a waiter that registers now and reads
        before the stream stored the change is woken when it has."""
        _kind, _, token = msg.subject.removeprefix(self._prefix).partition(".")
        self._wake_when_stored(msg, lambda: self._waiters.get(token, ()))

    def _wake_when_stored(self, msg: Msg, waiters: Callable[[], Iterable[asyncio.Event]]) -> None:
        """Wake `waiters()` once the stream holds what `msg` says (off the subscription's own
        task: a refused write must not hold back the messages behind it)."""

        async def wake() -> None:
            await self._stored(msg)
            for event in waiters():
                event.set()

        task = asyncio.create_task(wake())
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    async def _stored(self, msg: Msg) -> None:
        """Until the bucket holds `msg`'s change (its value, or no value for a delete), at most
        STORED_PAUSES; a read that fails ends the wait (the wake-up is a hint)."""
        key = msg.subject.removeprefix(self._prefix)
        removal = (msg.headers or {}).get(KV_OP) in (KV_DEL, KV_PURGE)
        for pause in STORED_PAUSES:
            await asyncio.sleep(pause)
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:  # never written, deleted or purged
                if removal:
                    return
                continue
            except Exception as e:
                log.debug("change not read back key=%s error=%r", key, e)
                return
            if not removal and entry.value == msg.data:
                return

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
    async def watching_nodes(self, task_id: str, nodes: Iterable[str]) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the record of one of `nodes` (of the task) changes, while the block
        runs: for the nodes that wait for the task's canary. One subscription per task while anyone
        waits (a canary's nodes are few, the waiters for them many), gone with the last waiter. The
        subscription hears every node record of the task (the waiters' own notes too); a change of
        a record nobody here waits on is dropped at once, without a read-back or a wake-up: a
        thousand waiters writing what they wait for would otherwise wake each other a million times."""
        token = encode_token(task_id)
        event = asyncio.Event()
        waiters = self._node_waiters.setdefault(token, {})
        waiters[event] = frozenset(encode_token(n) for n in nodes)
        try:
            async with self._node_lock:  # one subscription per task, whoever comes first
                if token not in self._node_subs:

                    async def wake(msg: Msg) -> None:
                        node = msg.subject.rsplit(".", 1)[1]
                        if self._node_waiters_of(token, node):
                            self._wake_when_stored(msg, lambda: self._node_waiters_of(token, node))

                    subject = f"{self._prefix}node.{token}.>"
                    self._node_subs[token] = await self.nc.subscribe(subject, cb=wake)
            yield event
        finally:
            waiters.pop(event, None)
            async with self._node_lock:
                if not waiters and self._node_waiters.get(token) is waiters:
                    del self._node_waiters[token]
                    if sub := self._node_subs.pop(token, None):
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()

    def _node_waiters_of(self, task_token: str, node_token: str) -> list[asyncio.Event]:
        return [e for e, watched in self._node_waiters.get(task_token, {}).items() if node_token in watched]

    def waiting(self) -> int:
        """How many waits are registered (tests watch this return to zero)."""
        return sum(len(w) for w in (*self._waiters.values(), *self._node_waiters.values()))

    async def close(self) -> None:
        for task in list(self._waking):
            task.cancel()
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
