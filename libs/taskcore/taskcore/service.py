"""What every service process shares: logging, uvloop, and staged shutdown on signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

log = logging.getLogger(__name__)


def configure_logging(name: str) -> None:
    """One greppable line per event, to stderr."""
    logging.basicConfig(
        level=os.environ.get("TASKERMAN_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiozk").setLevel(logging.WARNING)


def run(name: str, main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `main(stop)` on uvloop. The first SIGTERM/SIGINT sets `stop` (stop taking work, finish
    what is in hand); a second one exits at once."""
    configure_logging(name)

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

    return uvloop.run(wrapper())
