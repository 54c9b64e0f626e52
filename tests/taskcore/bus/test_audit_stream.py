"""The audit trail cannot be erased: on a real nats-server the EVENTS stream refuses purge and
delete, also when it was created by an older version without those protections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import APIError

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.core import subjects
from taskcore.core.settings import Settings
from taskerman_dev.launchers import NatsServer


@pytest.fixture
async def js(tmp_path: Path) -> AsyncIterator[tuple[Settings, JetStreamContext]]:
    """A nats-server of this test's own (the stream names are fixed by the design)."""
    with NatsServer(tmp_path / "nats") as server:
        settings = Settings(nats_url=server.url, home=tmp_path)
        nc: NATS = await bus.connect(settings, "test")
        try:
            yield settings, nc.jetstream()
        finally:
            await nc.close()


async def _one_event(js: JetStreamContext) -> int:
    event = audit.Event(kind="routed", task_id="t1", by="test")
    ack = await js.publish(audit.task_subject("t1"), msgspec.json.encode(event), timeout=5)
    return ack.seq


async def _assert_unerasable(js: JetStreamContext, seq: int) -> None:
    with pytest.raises(APIError):
        await js.purge_stream(subjects.EVENTS_STREAM)
    with pytest.raises(APIError):
        await js.purge_stream(subjects.EVENTS_STREAM, subject=audit.task_subject("t1"))
    with pytest.raises(APIError):
        await js.delete_msg(subjects.EVENTS_STREAM, seq)
    assert (await js.get_msg(subjects.EVENTS_STREAM, seq)).seq == seq  # still there
    events = await audit.read(js, audit.task_subject("t1"))
    assert [e.kind for e in events] == ["routed"]


async def test_events_refuse_purge_and_delete(js: tuple[Settings, JetStreamContext]) -> None:
    settings, jsc = js
    await bus.provision(jsc, settings)
    config = (await jsc.stream_info(subjects.EVENTS_STREAM)).config
    assert config.deny_delete
    assert config.deny_purge
    assert config.max_age == settings.events_retention  # retention by age only
    assert config.max_msgs == -1
    assert config.max_bytes == -1
    seq = await _one_event(jsc)
    await _assert_unerasable(jsc, seq)
    with pytest.raises(APIError, match="can not cancel deny"):  # and no update lifts the protection
        await jsc.update_stream(bus.events_stream(settings).evolve(deny_delete=False, deny_purge=False))
    await _assert_unerasable(jsc, seq)


async def test_an_older_events_stream_is_updated_at_provision(js: tuple[Settings, JetStreamContext]) -> None:
    settings, jsc = js
    old = api.StreamConfig(  # what versions before the protection created
        name=subjects.EVENTS_STREAM,
        subjects=[f"{subjects.EVENTS_PREFIX}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_age=settings.events_retention,
    )
    await jsc.add_stream(old)
    seq = await _one_event(jsc)
    await bus.provision(jsc, settings)
    await _assert_unerasable(jsc, seq)
    await bus.provision(jsc, settings)  # provisioning again is harmless
    assert (await jsc.stream_info(subjects.EVENTS_STREAM)).state.messages == 1
