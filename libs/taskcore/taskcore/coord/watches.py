"""Waiting on one ZooKeeper watch without leaking it.

aiozk's `wait_for_events` registers a callback that is removed only when its event fires, so a
cancelled or timed-out wait leaves it behind; and its dispatcher indexes a `defaultdict`, so every
event on a path nobody waits for adds an empty entry that is never removed (and is sent again with
every reconnect's SetWatches); and it caches the stat of every path it ever read. `Watch` removes
its callback however the wait ends, and `install` makes the dispatcher look up instead of insert
and bounds the stat cache. Together a waiter that comes and goes leaves nothing behind, however
long the process runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from aiozk import ZKClient
from aiozk.protocol import WatchEvent

CHILDREN = WatchEvent.CHILDREN_CHANGED
DELETED = WatchEvent.DELETED
DATA = WatchEvent.DATA_CHANGED
CREATED = WatchEvent.CREATED


STAT_CACHE_SIZE = 4096


class BoundedStatCache(OrderedDict[str, Any]):
    """aiozk keeps the stat of every path it ever read, forever (and `delete` without `force` uses
    it as the expected version): bounded, oldest first out. Our recipes never rely on it."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > STAT_CACHE_SIZE:
            self.popitem(last=False)


def install(client: ZKClient) -> None:
    """Make the session's event dispatch read its callback table without growing it, and bound
    the client's stat cache."""
    client.stat_cache = BoundedStatCache()
    session = client.session
    original = session.event_dispatch

    def dispatch(event: Any) -> None:
        if event.type:
            callbacks = session.watch_callbacks.get((event.type, event.path))
            if callbacks:
                loop = asyncio.get_running_loop()
                for callback in list(callbacks):
                    loop.call_soon(callback, event.path)
            return
        original(event)

    session.event_dispatch = dispatch


def wake_all(client: ZKClient) -> int:
    """Wake every waiter of this client, as if its event had come: after the connection came back
    (an event may have fired while it was away) or the session was replaced (the server forgot
    every watch, and the waiters' ephemeral nodes with it). Each waiter looks again and sets its
    watches anew. Returns how many were woken."""
    loop = asyncio.get_running_loop()
    woken = 0
    for (_type, path), callbacks in list(client.session.watch_callbacks.items()):
        for callback in list(callbacks):
            loop.call_soon(callback, path)
            woken += 1
    return woken


def callback_count(client: ZKClient) -> int:
    """How many watch callbacks the session holds (the soak tests watch this stay flat)."""
    return sum(len(c) for c in client.session.watch_callbacks.values())


class Watch:
    """A registered interest in `types` of events on `path`: create it BEFORE the read that sets
    the server-side watch (so an event between the two is not missed), then `wait`, and always
    `close` (or use it as a context manager)."""

    def __init__(self, client: ZKClient, types: Iterable[int], path: str) -> None:
        self._session = client.session
        self._path = client.normalize_path(path)
        self._types = tuple(types)
        self._fired = asyncio.Event()
        for t in self._types:
            self._session.add_watch_callback(t, self._path, self._fire)

    def _fire(self, _path: str) -> None:
        self._fired.set()

    async def wait(self, backstop: float | None) -> bool:
        """True when the event came; False after `backstop` seconds (a backstop, not the wake-up)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backstop):  # not wait_for: it may swallow a cancellation
                await self._fired.wait()
        return self._fired.is_set()

    def close(self) -> None:
        for t in self._types:
            key = (t, self._path)
            callbacks = self._session.watch_callbacks.get(key)
            if callbacks is not None:
                callbacks.discard(self._fire)
                if not callbacks:
                    self._session.watch_callbacks.pop(key, None)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
