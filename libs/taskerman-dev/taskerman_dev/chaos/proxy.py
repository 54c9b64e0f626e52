"""A TCP proxy the nemesis can cut: a network partition between one process and a server, without
root or namespaces. While cut, nothing is forwarded either way and new connections get no
answer; what was sent meanwhile is delivered when the cut heals, as TCP does after a partition
that did not outlast the connection (the client may well have given up on it by then)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)
CHUNK = 65536


class Proxy:
    """Listens on 127.0.0.1:`port` (0: any free port) and forwards to `target`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.healed = asyncio.Event()
        self.healed.set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def cut(self, seconds: float) -> None:
        """A partition of `seconds`, then healed."""
        self.healed.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.healed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.healed.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(CHUNK):
                await self.healed.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()


class ProxiedHosts:
    """A proxy in front of each server of a comma-separated host list (`host:port`, or
    `nats://host:port`), and the list a client should be given instead."""

    def __init__(self, hosts: str) -> None:
        self.scheme = "nats://" if hosts.startswith("nats://") else ""
        self.proxies = []
        for h in hosts.split(","):
            host, port = h.removeprefix("nats://").rsplit(":", 1)
            self.proxies.append(Proxy(host, int(port)))

    async def start(self) -> str:
        for p in self.proxies:
            await p.start()
        return ",".join(f"{self.scheme}{p.address}" for p in self.proxies)

    async def stop(self) -> None:
        for p in self.proxies:
            await p.stop()

    async def cut(self, seconds: float) -> None:
        await asyncio.gather(*(p.cut(seconds) for p in self.proxies))
