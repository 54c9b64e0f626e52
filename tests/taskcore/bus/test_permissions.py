"""The permission matrix on a real nats-server secured as every stack is: each cell that matters
(README, Security), asked of the server itself; anonymous and unknown clients refused."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from taskcore.bus import jetstream as bus
from taskcore.bus import permissions
from taskcore.core import signing
from taskcore.core.errors import CredentialsError
from taskcore.core.settings import Settings
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.launchers import NatsServer

KV = "$KV.TASK_STATUS"
API = "$JS.API"
PUB, SUB = "publish", "subscribe"

# (role, publish or subscribe, subject, allowed)
MATRIX = [
    ("router", PUB, "tasks.cluster.c.n1", True),
    ("router", PUB, f"{KV}.task.t1", True),
    ("router", PUB, "tasks.dead.c.n1", True),
    ("router", PUB, f"{API}.CONSUMER.MSG.NEXT.TASKS.router", True),
    ("router", PUB, "tasks.global", False),
    ("router", PUB, f"{API}.STREAM.UPDATE.EVENTS", False),
    ("router", SUB, "taskerman.api.plan", True),
    ("router", SUB, "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.WORK.x", True),
    ("runner", PUB, f"{KV}.node.t1.n1", True),
    ("runner", PUB, f"{KV}.stop.t1", True),
    ("runner", PUB, "tasks.dead.c.n1", True),
    ("runner", PUB, "events.node.t1", True),
    ("runner", PUB, f"{API}.CONSUMER.MSG.NEXT.WORK.c_n1", True),
    ("runner", PUB, "$JS.ACK.WORK.c_n1.1.1.1.1.0", True),
    ("runner", PUB, "tasks.cluster.c.n1", False),  # a runner cannot make a node act
    ("runner", PUB, "tasks.global", False),
    ("runner", PUB, f"{KV}.task.t1", False),
    ("runner", PUB, f"{API}.STREAM.PURGE.DEAD", False),
    ("runner", PUB, f"{API}.STREAM.DELETE.WORK", False),
    ("runner", SUB, f"{KV}.stop.>", True),
    ("runner", SUB, f"{KV}.node.t1.>", True),  # a canary's records, waited for
    ("runner", SUB, "tasks.cluster.>", False),
    ("scheduler", PUB, "tasks.global", True),
    ("scheduler", PUB, "tasks.cluster.c.n1", False),
    ("scheduler", PUB, f"{KV}.node.t1.n1", False),
    ("scheduler", SUB, "taskerman.api.submit", True),
    ("scheduler", SUB, "taskerman.api.schedules", True),
    ("scheduler", PUB, f"{API}.CONSUMER.MSG.NEXT.EVENTS.notifier", True),  # its notifier reads events
    ("scheduler", PUB, f"{API}.STREAM.PURGE.EVENTS", False),
    ("operator", PUB, "tasks.global", True),  # `nats pub tasks.global '<json>'` with credentials
    ("operator", PUB, "taskerman.api.submit", True),
    ("operator", PUB, f"{KV}.stop.t1", True),  # cancel
    ("operator", PUB, f"{KV}.pause.t1", True),  # pause, resume
    ("operator", PUB, f"{API}.STREAM.INFO.EVENTS", True),
    ("operator", PUB, "tasks.cluster.c.n1", False),
    ("operator", PUB, f"{KV}.node.t1.n1", False),
    ("operator", PUB, f"{API}.STREAM.PURGE.DEAD", False),  # dlq purge is admin's
    ("operator", SUB, "taskerman.api.submit", False),  # nobody poses as the scheduler
    ("admin", PUB, f"{API}.STREAM.PURGE.DEAD", True),
    ("admin", PUB, f"{API}.STREAM.MSG.DELETE.DEAD", True),
    ("admin", PUB, "tasks.cluster.c.n1", True),  # dlq replay
    ("admin", PUB, f"{API}.STREAM.UPDATE.WORK", True),
    ("observer", PUB, f"{API}.STREAM.INFO.EVENTS", True),
    ("observer", PUB, f"{API}.DIRECT.GET.KV_TASK_STATUS.{KV}.task.t1", True),
    ("observer", PUB, f"{API}.CONSUMER.CREATE.EVENTS", True),  # `taskerman events`
    ("observer", PUB, "tasks.global", False),
    ("observer", PUB, f"{KV}.task.t1", False),
    ("observer", PUB, "events.task.t1", False),
    ("observer", PUB, "taskerman.api.submit", False),
    ("observer", PUB, f"{API}.CONSUMER.CREATE.WORK.x", False),
] + [
    (role, PUB, subject, False)  # the audit trail: nobody erases, shortens or replaces it
    for role in permissions.ROLES
    for subject in (
        f"{API}.STREAM.DELETE.EVENTS",
        f"{API}.STREAM.PURGE.EVENTS",
        f"{API}.STREAM.UPDATE.EVENTS",
        f"{API}.STREAM.MSG.DELETE.EVENTS",
    )
]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    """A server of its own (the allowed cells act: a purge, a stream update), secured with the
    users of a stack home."""
    home = tmp_path_factory.mktemp("perm-stack")
    with NatsServer(tmp_path_factory.mktemp("perm-nats"), users=stack_secrets.nats_users(home)) as server:
        yield server, home


class Probe:
    """A client of one role that records the server's permission violations."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.nc = NATS()

    async def on_error(self, e: Exception) -> None:
        self.violations.append(str(e).lower())

    async def denied(self, kind: str, subject: str) -> bool:
        before = len(self.violations)
        if kind == PUB:
            await self.nc.publish(subject, b"{}")
        else:
            sub = await self.nc.subscribe(subject)
        await self.nc.flush(timeout=5)  # the server answers a violation before the PONG
        await asyncio.sleep(0.05)
        if kind == SUB:
            await sub.unsubscribe()
        found = [v for v in self.violations[before:] if subject.lower() in v]
        return bool(found)


@pytest.fixture(scope="module")
async def probes(secured: tuple[NatsServer, Path]) -> AsyncIterator[dict[str, Probe]]:
    server, home = secured
    folder = home / stack_secrets.SECRETS_DIR
    out: dict[str, Probe] = {}
    for role in permissions.ROLES:
        p = Probe()
        seed = signing.read_seed(folder / stack_secrets.nats_seed_name(role)).decode()
        await p.nc.connect(server.url, nkeys_seed_str=seed, error_cb=p.on_error, allow_reconnect=False)
        out[role] = p
    yield out
    for p in out.values():
        await p.nc.close()


@pytest.mark.parametrize(("role", "kind", "subject", "allowed"), MATRIX)
async def test_matrix_cell(
    probes: dict[str, Probe], role: str, kind: str, subject: str, allowed: bool
) -> None:
    denied = await probes[role].denied(kind, subject)
    assert denied != allowed, f"{role} {kind} {subject}: {'denied' if denied else 'allowed'}"


async def test_anonymous_and_unknown_clients_are_refused_at_once(
    secured: tuple[NatsServer, Path], tmp_path: Path
) -> None:
    server, _home = secured
    with pytest.raises(CredentialsError, match="TASKERMAN_NATS_CREDS is not set"):
        await asyncio.wait_for(bus.connect(Settings(nats_url=server.url), "anonymous"), 10)
    stranger = tmp_path / "stranger.nk"
    signing.write_seed(stranger)
    with pytest.raises(CredentialsError, match="refused the credentials"):
        await asyncio.wait_for(
            bus.connect(Settings(nats_url=server.url, nats_creds=stranger), "stranger"), 10
        )
    with pytest.raises(nats.errors.Error):  # and a client of its own, without our wrapper
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_unreadable_or_bad_credentials_say_so(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read it"):
        bus.credentials(Settings(nats_creds=tmp_path / "missing.nk"))
    bad = tmp_path / "bad.nk"
    bad.write_text("not a seed\n")
    with pytest.raises(CredentialsError, match=r"bad\.nk"):
        bus.credentials(Settings(nats_creds=bad))


async def test_a_role_connects_with_its_seed_and_provisions_a_fresh_bus(
    secured: tuple[NatsServer, Path],
) -> None:
    """The router may create the streams of a bus nobody provisioned, and a second start (an
    operator's CLI, which may not change streams) only reads them."""
    server, home = secured
    base = Settings(nats_url=server.url, **stack_secrets.generate(home))
    for role in ("router", "operator"):
        nc = await bus.connect(stack_secrets.as_role(base, role), role)
        try:
            await asyncio.wait_for(bus.provision(nc.jetstream(), base), 20)
        finally:
            await bus.close(nc)


def test_the_cli_prints_the_servers_authorization_block(tmp_path: Path) -> None:
    """`taskerman keys nats-config ROLE=FILE|KEY …`, as a deployment makes its server config."""
    taskerman = str(Path(sys.executable).parent / "taskerman")
    router, observer = tmp_path / "router.nk", tmp_path / "observer.nk"
    router_key, observer_key = signing.write_seed(router), signing.write_seed(observer)
    out = subprocess.run(
        [taskerman, "keys", "nats-config", f"router={router}", f"observer={observer_key}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == permissions.authorization({"router": router_key, "observer": observer_key})
    bad = subprocess.run(
        [taskerman, "keys", "nats-config", f"root={router}"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert "unknown NATS role 'root'" in bad.stderr
