"""The launchers start real servers that answer, and stop them for good."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import nats
from aiozk import ZKClient

from taskerman_dev.launchers import NatsServer, ZooKeeperServer, port_open


def _healthy(server: NatsServer, timeout: float = 1.0) -> bool:
    """Return whether the server's /healthz answers 200 within `timeout`."""
    try:
        with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def test_nats_has_jetstream(nats_server: NatsServer, prefix: str, nats_auth: dict[str, str]) -> None:
    nc = await nats.connect(nats_server.url, allow_reconnect=False, **nats_auth)
    try:
        js = nc.jetstream()
        info = await js.account_info()
        assert info.limits is not None
        await js.add_stream(name=prefix, subjects=[f"{prefix}.>"])
        ack = await js.publish(f"{prefix}.hello", b"hi")
        assert ack.stream == prefix
        assert ack.seq == 1
        await js.delete_stream(prefix)
    finally:
        await nc.close()


def test_nats_fsyncs_every_write(nats_server: NatsServer) -> None:
    with urllib.request.urlopen(f"{nats_server.monitor_url}/varz", timeout=5) as response:
        varz = json.load(response)
    assert varz["jetstream"]["config"]["sync_always"] is True


async def test_zookeeper_answers(zk_server: ZooKeeperServer, prefix: str) -> None:
    zk = ZKClient(zk_server.hosts)
    await zk.start()
    try:
        await zk.create(f"/{prefix}", data=b"hello")
        assert await zk.get_data(f"/{prefix}") == b"hello"
        await zk.delete(f"/{prefix}")
        assert not await zk.exists(f"/{prefix}")
    finally:
        await zk.close()


def test_stopped_nats_is_gone(tmp_path: Path) -> None:
    server = NatsServer(tmp_path)
    with server:
        assert port_open(server.host, server.port)
        pid = server.pid
    assert not server.running
    assert not port_open(server.host, server.port)
    assert not Path(f"/proc/{pid}").exists()


def test_killed_zookeeper_is_gone_and_restarts(tmp_path: Path) -> None:
    server = ZooKeeperServer(tmp_path)
    with server:
        server.kill()
        assert not server.running
        assert not port_open(server.host, server.port)
        server.start()
        server.wait_ready()
        assert port_open(server.host, server.port)
    assert not port_open(server.host, server.port)


def test_paused_nats_stops_answering(tmp_path: Path) -> None:
    with NatsServer(tmp_path) as server:
        server.pause()
        assert not _healthy(server, timeout=0.5)
        server.resume()
        server.wait_ready(10)  # answers again (raises ServerNotReady otherwise), on a busy machine too
        assert _healthy(server, timeout=5)
        server.pause()
    assert not server.running
