"""What every service process shares: logging, uvloop, and staged shutdown on signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import uvloop
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.coord.session import ZkSession
from taskcore.core.errors import CredentialsError
from taskcore.core.settings import Settings
from taskcore.obs import logs, metrics, tracing

log = logging.getLogger(__name__)


class Connections(msgspec.Struct, frozen=True):
    """What a service holds open while it runs."""

    nc: NATS
    js: JetStreamContext
    zk: ZkSession
    status: StatusStore


@contextlib.asynccontextmanager
async def connected(settings: Settings, name: str) -> AsyncIterator[Connections]:
    """NATS (streams provisioned), ZooKeeper and the status bucket, closed in reverse on exit."""
    tracing.setup(name, settings.home)
    metrics.setup(name, settings.metrics_port, settings.metrics_addr)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(tracing.shutdown)
        nc = await bus.connect(settings, name)
        stack.push_async_callback(bus.close, nc)
        js = nc.jetstream()
        await bus.provision(js, settings)
        zk = await stack.enter_async_context(ZkSession.from_settings(settings))
        yield Connections(nc=nc, js=js, zk=zk, status=StatusStore(await bus.status_bucket(js)))


def run(name: str, main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `main(stop)` on uvloop. The first SIGTERM/SIGINT sets `stop` (stop taking work, finish
    what is in hand); a second one exits at once. Credentials NATS or ZooKeeper refuse end the
    process at start with the reason in one line and exit code 2 (retrying cannot help)."""
    logs.configure(name)

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second signal %d: exiting now", signum)
                os._exit(128 + signum)
            log.info("signal %d: stopping", signum)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        return await main(stop)

    try:
        return uvloop.run(wrapper())
    except CredentialsError as e:
        log.error("%s", e)
        return 2
