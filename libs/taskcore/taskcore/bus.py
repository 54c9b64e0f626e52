"""The JetStream bus: safe connections, idempotent provisioning, publishing with ids and trace context."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from taskcore import subjects, tracing
from taskcore.settings import Settings

log = logging.getLogger(__name__)

PUBLISH_ATTEMPTS = 5
ROUTER_MAX_DELIVER = 5


async def connect(settings: Settings, name: str) -> NATS:
    """Connect with options that survive outages: reconnect forever, notice a dead server in seconds."""

    async def on_error(e: Exception) -> None:
        log.warning("nats error name=%s error=%s", name, e)

    async def on_disconnect() -> None:
        log.info("nats disconnected name=%s", name)

    async def on_reconnect() -> None:
        log.info("nats reconnected name=%s", name)

    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        ping_interval=5,
        max_outstanding_pings=3,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


async def close(nc: NATS) -> None:
    """Flush what was published and close. Every ack and publish we care about was awaited already,
    so this does not use drain(), which waits out its whole timeout on an idle pull subscription."""
    with contextlib.suppress(Exception):
        await nc.flush(timeout=2)
    await nc.close()


def _stream(name: str, subject: str, settings: Settings, work_queue: bool) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        subjects=[subject],
        retention=api.RetentionPolicy.WORK_QUEUE if work_queue else api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=settings.duplicate_window,
        max_age=0,
    )


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the streams, the status bucket and the router's consumer; safe to repeat."""
    await _ensure_stream(js, _stream(subjects.TASKS_STREAM, subjects.GLOBAL, settings, work_queue=True))
    await _ensure_stream(
        js, _stream(subjects.WORK_STREAM, f"{subjects.CLUSTER_PREFIX}.>", settings, work_queue=True)
    )
    await _ensure_stream(
        js, _stream(subjects.DEAD_STREAM, f"{subjects.DEAD_PREFIX}.>", settings, work_queue=False)
    )
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[f"{subjects.EVENTS_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=settings.events_retention,
        ),
    )
    await status_bucket(js, settings)
    await js.add_consumer(
        subjects.TASKS_STREAM,
        api.ConsumerConfig(
            durable_name=subjects.ROUTER_DURABLE,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_deliver=ROUTER_MAX_DELIVER,
            filter_subject=subjects.GLOBAL,
        ),
    )


async def status_bucket(js: JetStreamContext, settings: Settings | None = None) -> KeyValue:
    """The task-tracking KV bucket; created (or its retention updated) when settings are given."""
    if settings is None:
        try:
            return await js.key_value(subjects.STATUS_BUCKET)
        except NotFoundError:
            settings = Settings()
    config = api.KeyValueConfig(
        bucket=subjects.STATUS_BUCKET, history=1, storage=api.StorageType.FILE, ttl=settings.status_retention
    )
    try:
        return await js.create_key_value(config)
    except BadRequestError:  # exists with another retention: update just that
        info = await js.stream_info(f"KV_{subjects.STATUS_BUCKET}")
        window = min(info.config.duplicate_window or 120.0, settings.status_retention)
        await js.update_stream(info.config.evolve(max_age=settings.status_retention, duplicate_window=window))
        return await js.key_value(subjects.STATUS_BUCKET)


async def ensure_runner_consumer(js: JetStreamContext, settings: Settings, cluster: str, node: str) -> str:
    """The durable pull consumer of one node's subject; returns its name."""
    durable = subjects.runner_durable(cluster, node)
    await js.add_consumer(
        subjects.WORK_STREAM,
        api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_deliver=settings.max_deliver,
            filter_subject=subjects.node_subject(cluster, node),
        ),
    )
    return durable


async def publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    msg_id: str,
    headers: dict[str, str] | None = None,
) -> api.PubAck:
    """Publish with a stable `Nats-Msg-Id` and the current trace context; a timed-out publish is
    retried with the same id (it may have been stored), and a duplicate is reported, not an error."""
    hdrs = tracing.inject_headers(headers)
    hdrs["Nats-Msg-Id"] = msg_id
    delay = 0.2
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            ack = await js.publish(subject, payload, headers=hdrs, timeout=5)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if attempt == PUBLISH_ATTEMPTS:
                raise
            log.warning("publish timed out subject=%s msg_id=%s attempt=%d", subject, msg_id, attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
        else:
            if ack.duplicate:
                log.info("publish duplicate subject=%s msg_id=%s", subject, msg_id)
            return ack
    raise AssertionError("unreachable")
