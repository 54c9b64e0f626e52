"""Servers started together (a NATS cluster, a ZooKeeper ensemble): ready when their running
members form a quorum."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Generic, TypeVar

from taskcore.core.errors import ServerNotReady
from taskerman_dev.launchers.ports import free_ports
from taskerman_dev.launchers.process import Managed, ServerProcess

Member = TypeVar("Member", bound=ServerProcess)


def group_ports(count: int, host: str, given: Sequence[int] | None, size: int) -> tuple[list[int], list[int]]:
    """The members' client ports (`given`, or free ones) and `count` more distinct free ports."""
    if given is not None and len(given) != size:
        raise ValueError(f"{size} ports needed, got {len(given)}")
    taken = set(given or ())
    spare = [p for p in free_ports(count + size + len(taken), host) if p not in taken]
    clients = list(given) if given is not None else spare[count : count + size]
    return clients, spare[:count]


class ServerGroup(Managed, Generic[Member]):
    """Servers started together; each member can be killed, paused and restarted on its own (same
    ports, same data), and the group is ready when its running members have formed a quorum."""

    what = "servers"

    def __init__(self, servers: list[Member]) -> None:
        if not servers:
            raise ValueError(f"a group of {self.what} needs at least one member")
        self.servers = servers

    def _not_ready(self) -> str | None:
        """None when the running members form a working group, else what is still missing."""
        raise NotImplementedError

    def _running(self) -> list[Member] | str:
        """The running members, or why there are too few for a quorum."""
        running = [s for s in self.servers if s.running]
        if len(running) <= len(self.servers) // 2:
            return f"only {len(running)} of {len(self.servers)} {self.what} running"
        return running

    @property
    def pids(self) -> list[int]:
        """Process ids of the running members."""
        return [s.pid for s in self.servers if s.running]

    def start(self) -> None:
        """Spawn every member that is not running; returns without waiting."""
        for server in self.servers:
            server.start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until the running members (a majority at least) form a working group; a member that
        exits meanwhile fails the wait at once."""
        deadline = time.monotonic() + timeout
        expected = [s for s in self.servers if s.running]
        while (missing := self._not_ready()) is not None:
            if exited := [s for s in expected if not s.running]:
                missing = f"{exited[0].home.name} exited"
                deadline = 0.0
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s.log_path}\n{s.log_tail(15)}" for s in self.servers)
                raise ServerNotReady(f"{self.what} not ready after {timeout}s: {missing}\n{tails}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every member."""
        for server in self.servers:
            server.stop(timeout)
