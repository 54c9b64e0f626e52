"""The JetStream bus: safe connections, idempotent provisioning, publishing with ids and trace context."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from taskcore.core import subjects
from taskcore.core.errors import CredentialsError
from taskcore.core.settings import Settings
from taskcore.core.signing import Signer, SigningConfigError, read_seed
from taskcore.obs import tracing

log = logging.getLogger(__name__)

PUBLISH_ATTEMPTS = 5
ROUTER_MAX_DELIVER = 5
REPLICAS_ENV = "TASKERMAN_STREAM_REPLICAS"
KV_STREAM = f"KV_{subjects.STATUS_BUCKET}"  # the stream under the status bucket


# What a client sees for a few seconds while a server dies or a stream elects a new leader: a request
# timed out, nobody answered, or JetStream answered 503. Try again later; never crash on these.
UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
# JetStream's answers to creating a stream: its name is taken (made meanwhile by another process, maybe
# with another configuration), or its replicas cannot be placed yet (a server of the cluster is down, or
# not yet known to the meta leader just after the cluster formed: retried by `provision`).
STREAM_NAME_IN_USE = 10058
NO_SUITABLE_PEERS = 10005


def _not_ready(e: Exception) -> bool:
    """JetStream cannot do it yet: unavailable, or unable to place a stream's replicas."""
    return isinstance(e, UNAVAILABLE) or (isinstance(e, BadRequestError) and e.err_code == NO_SUITABLE_PEERS)


def server_urls(url: str) -> list[str]:
    """`TASKERMAN_NATS_URL` may name several servers, comma-separated; nats-py wants a list."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages within `wait` seconds; an empty queue, or a cluster failing over, is an
    empty list."""
    try:
        return await sub.fetch(batch, timeout=wait)
    except TimeoutError:  # nats.errors.TimeoutError too: an empty queue is normal
        return []
    except UNAVAILABLE as e:
        log.warning("fetch failed, will retry error=%r", e)
        await asyncio.sleep(wait)
        return []


async def connect(settings: Settings, name: str) -> NATS:
    """Connect as this process's role (`settings.nats_creds`), with options that survive outages:
    reconnect forever, notice a dead server in seconds. Credentials the server refuses (or none,
    where it asks for some) are a CredentialsError at once, never a retry loop."""
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(e: Exception) -> None:
        refusal = isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in str(e).lower()
        if refusal and not refused.done():
            refused.set_result(e)
        # before the first connection its caller reports the outcome: each try is a detail
        level = logging.WARNING if connecting.done() else logging.INFO
        log.log(level, "nats error name=%s error=%s", name, e)

    async def on_disconnect() -> None:
        log.info("nats disconnected name=%s", name)

    async def on_reconnect() -> None:
        log.info("nats reconnected name=%s", name)

    connecting = asyncio.ensure_future(
        nats.connect(
            server_urls(settings.nats_url),
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            ping_interval=5,
            max_outstanding_pings=3,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **credentials(settings),
        )
    )
    either: set[asyncio.Future[Any]] = {connecting, refused}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    given = settings.nats_creds or "none (TASKERMAN_NATS_CREDS is not set)"
    raise CredentialsError(
        f"NATS at {settings.nats_url} refused the credentials of {name}: {given}. Set "
        "TASKERMAN_NATS_CREDS to the nkey seed file of this process's role (README, Security)"
    )


def credentials(settings: Settings) -> dict[str, str]:
    """The `nats.connect` options for `settings.nats_creds`: a creds file (a user JWT and its seed)
    or a bare nkey seed; none when unset."""
    path = settings.nats_creds
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as e:
        raise CredentialsError(f"TASKERMAN_NATS_CREDS={path}: cannot read it ({e.strerror})") from None
    if "BEGIN NATS USER JWT" in text:
        return {"user_credentials": str(path)}
    try:
        return {"nkeys_seed_str": read_seed(path).decode()}
    except SigningConfigError as e:
        raise CredentialsError(f"TASKERMAN_NATS_CREDS={path}: {e}") from None


async def close(nc: NATS) -> None:
    """Flush what was published and close. Every ack and publish we care about was awaited already,
    so this does not use drain(), which waits out its whole timeout on an idle pull subscription."""
    with contextlib.suppress(Exception):
        await nc.flush(timeout=2)
    await nc.close()


def stream_replicas(replicas: int | None = None) -> int | None:
    """The replica count asked for: the argument, else `TASKERMAN_STREAM_REPLICAS`, else None (new streams
    get 1, existing ones keep theirs, so a client without the variable never shrinks a clustered stream)."""
    if replicas is None:
        raw = os.environ.get(REPLICAS_ENV, "").strip()
        if not raw:
            return None
        try:
            replicas = int(raw)
        except ValueError:
            raise ValueError(f"{REPLICAS_ENV}={raw!r} is not an integer") from None
    if not 1 <= replicas <= 5:
        raise ValueError(f"stream replicas must be between 1 and 5, not {replicas}")
    return replicas


def _stream(
    name: str, subject: str, settings: Settings, work_queue: bool, replicas: int = 1
) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        subjects=[subject],
        retention=api.RetentionPolicy.WORK_QUEUE if work_queue else api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=settings.duplicate_window,
        max_age=0,
        num_replicas=replicas,
    )


def events_stream(settings: Settings, replicas: int = 1) -> api.StreamConfig:
    """The audit trail, which nobody may erase: the server refuses to delete or purge its messages
    (`deny_delete`, `deny_purge`, which no later update can lift), and events leave it only by age
    (`TASKERMAN_EVENTS_RETENTION`), never by count or size. An EVENTS stream of an older version is
    updated to this at provisioning where the bus lets the process (an insecure one); no role of a
    secured bus may (bus/permissions.py `ERASE_AUDIT`)."""
    return api.StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[f"{subjects.EVENTS_PREFIX}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_age=settings.events_retention,
        max_msgs=-1,
        max_bytes=-1,
        max_msgs_per_subject=-1,
        deny_delete=True,
        deny_purge=True,
        num_replicas=replicas,
    )


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig, keep_replicas: bool = False) -> None:
    """Create the stream when it is missing, update it where it differs from `config` (with
    `keep_replicas` an existing stream keeps its replica count). It is read first, so a process
    whose role may not change streams (bus/permissions.py) starts on a provisioned bus without
    asking to; where it differs and the update is refused, the stream is used as it is."""
    assert config.name is not None
    try:
        have = (await js.stream_info(config.name)).config
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            have = (await js.stream_info(config.name)).config
    if keep_replicas:
        config = config.evolve(num_replicas=have.num_replicas)
    if fields := differences(have, config):
        await _update_stream(js, config, fields)


STREAM_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "discard",
    "duplicate_window",
    "max_age",
    "max_msgs",
    "max_bytes",
    "max_msgs_per_subject",
    "deny_delete",
    "deny_purge",
    "num_replicas",
)


def differences(have: api.StreamConfig, want: api.StreamConfig) -> list[str]:
    """The fields `want` sets that `have` does not match (what the server fills in is not compared)."""
    out = []
    for name in STREAM_FIELDS:
        wanted, current = getattr(want, name), getattr(have, name)
        if wanted is None or (name == "duplicate_window" and not wanted):  # unset: the server's default
            continue
        if isinstance(wanted, float | int) and not isinstance(wanted, bool):
            if abs(float(wanted) - float(current or 0)) > 1e-3:
                out.append(name)
        elif wanted != current:
            out.append(name)
    return out


async def _update_stream(js: JetStreamContext, config: api.StreamConfig, fields: list[str]) -> None:
    try:
        await js.update_stream(config)
    except nats.errors.TimeoutError:  # a role without the right gets no answer
        log.warning(
            "stream %s differs from this process's settings in %s and was not updated (not permitted "
            "to this role, or no answer): it is used as it is; an admin's process updates it",
            config.name,
            ", ".join(fields),
        )


async def provision(
    js: JetStreamContext, settings: Settings, replicas: int | None = None, within: float = 30.0
) -> None:
    """`provision_once`, retried while JetStream is briefly unavailable (a stream electing a new
    leader after a server died) or cannot place a stream's replicas yet (a server down or not yet
    known); the last error is raised after `within` seconds."""
    deadline = time.monotonic() + within
    delay = 0.25
    while True:
        try:
            await provision_once(js, settings, replicas)
            return
        except Exception as e:
            if not _not_ready(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("provisioning retried: jetstream not ready error=%r", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def provision_once(js: JetStreamContext, settings: Settings, replicas: int | None = None) -> None:
    """Create or update the streams, the status bucket and the router's consumer; safe to repeat.

    `replicas` (else `TASKERMAN_STREAM_REPLICAS`) sets every stream's replica count (3 on a 3-node
    cluster); when neither is given, new streams get 1 and existing ones keep theirs. The consumers
    inherit their stream's count."""
    wanted = stream_replicas(replicas)
    n, keep = (1, True) if wanted is None else (wanted, False)
    await _ensure_stream(
        js, _stream(subjects.TASKS_STREAM, subjects.GLOBAL, settings, work_queue=True, replicas=n), keep
    )
    await _ensure_stream(
        js,
        _stream(subjects.WORK_STREAM, f"{subjects.CLUSTER_PREFIX}.>", settings, work_queue=True, replicas=n),
        keep,
    )
    await _ensure_stream(
        js,
        _stream(subjects.DEAD_STREAM, f"{subjects.DEAD_PREFIX}.>", settings, work_queue=False, replicas=n),
        keep,
    )
    await _ensure_stream(js, events_stream(settings, n), keep)
    await status_bucket(js, settings, replicas=wanted)
    await _ensure_consumer(
        js,
        subjects.TASKS_STREAM,
        api.ConsumerConfig(
            durable_name=subjects.ROUTER_DURABLE,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_deliver=ROUTER_MAX_DELIVER,
            filter_subject=subjects.GLOBAL,
        ),
    )


async def _ensure_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    """Create the durable consumer, or update it where it differs; read first (`_ensure_stream`)."""
    assert config.durable_name is not None
    with contextlib.suppress(NotFoundError):
        have = (await js.consumer_info(stream, config.durable_name)).config
        same = (have.ack_wait, have.max_deliver, have.filter_subject) == (
            config.ack_wait,
            config.max_deliver,
            config.filter_subject,
        )
        if same:
            return
    try:
        await js.add_consumer(stream, config)
    except nats.errors.TimeoutError:
        if not await _exists(js, stream, config.durable_name):
            raise
        log.warning(
            "consumer %s of %s differs and was not updated: used as it is", config.durable_name, stream
        )


async def _exists(js: JetStreamContext, stream: str, consumer: str) -> bool:
    try:
        await js.consumer_info(stream, consumer)
    except NotFoundError:
        return False
    return True


async def status_bucket(
    js: JetStreamContext, settings: Settings | None = None, replicas: int | None = None
) -> KeyValue:
    """The task-tracking KV bucket; created (or its retention updated) when settings are given.
    `replicas` as for `provision`. Read first, as the streams are (`_ensure_stream`)."""
    try:
        info: api.StreamInfo | None = await js.stream_info(KV_STREAM)
    except NotFoundError:
        info = None
    if settings is None:
        if info is not None:
            return await js.key_value(subjects.STATUS_BUCKET)
        settings = Settings()
    wanted = stream_replicas(replicas)
    if info is None:
        kv_config = api.KeyValueConfig(
            bucket=subjects.STATUS_BUCKET,
            history=1,
            storage=api.StorageType.FILE,
            ttl=settings.status_retention,
            replicas=wanted or 1,
        )
        try:
            return await js.create_key_value(kv_config)
        except BadRequestError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            info = await js.stream_info(KV_STREAM)
    window = min(info.config.duplicate_window or 120.0, settings.status_retention)
    config = info.config.evolve(
        max_age=settings.status_retention,
        duplicate_window=window,
        num_replicas=wanted or info.config.num_replicas,
    )
    if fields := differences(info.config, config):
        await _update_stream(js, config, fields)
    return await js.key_value(subjects.STATUS_BUCKET)


async def ensure_runner_consumer(js: JetStreamContext, settings: Settings, cluster: str, node: str) -> str:
    """The durable pull consumer of one node's subject; returns its name."""
    durable = subjects.runner_durable(cluster, node)
    await _ensure_consumer(
        js,
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


async def publish_work(
    js: JetStreamContext, signer: Signer | None, subject: str, payload: bytes, msg_id: str
) -> api.PubAck:
    """Publish a work item on a node's subject, signed over its subject, message id and payload
    (`core/signing.py`), so its runner knows it came from the router (or an admin's replay). Every
    work-item publish goes through here; `signer` is None only in insecure mode."""
    headers = signer.sign(subject, msg_id, payload) if signer is not None else None
    return await publish(js, subject, payload, msg_id, headers)
