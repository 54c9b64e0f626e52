"""The audit trail: every state change of a task and of each of its nodes, appended to the EVENTS
stream with who, what and when; `taskerman events TASK_ID` reads it back in order."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import msgspec
from nats.js import JetStreamContext, api

from taskcore.core import subjects
from taskcore.obs import tracing

log = logging.getLogger(__name__)
READ_TIMEOUT = 2.0


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One audit record."""

    kind: str  # submitted, emitted, routed, rejected, lease-acquired, pre_check-passed, …
    task_id: str = ""
    cluster: str = ""
    node: str = ""
    at: float = msgspec.field(default_factory=time.time)
    by: str = ""
    detail: str = ""
    trace_id: str = ""


def actor(role: str) -> str:
    """Who acts: role, host and pid (e.g. `runner:node-1@host:1234`)."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def task_subject(task_id: str) -> str:
    return f"{subjects.EVENTS_PREFIX}.task.{subjects.encode_token(task_id)}"


def cluster_subject(cluster: str) -> str:
    return f"{subjects.EVENTS_PREFIX}.cluster.{subjects.encode_token(cluster)}"


class Audit:
    """Appends events; a failure to append is logged, never allowed to break the work itself."""

    def __init__(self, js: JetStreamContext, by: str) -> None:
        self.js = js
        self.by = by

    async def record(
        self, kind: str, *, task_id: str = "", cluster: str = "", node: str = "", detail: str = ""
    ) -> None:
        event = Event(
            kind=kind,
            task_id=task_id,
            cluster=cluster,
            node=node,
            by=self.by,
            detail=detail,
            trace_id=tracing.current_trace_id(),
        )
        subject = task_subject(task_id) if task_id else cluster_subject(cluster or "-")
        try:
            await self.js.publish(subject, msgspec.json.encode(event), timeout=5)
        except Exception as e:
            log.warning("audit event not recorded kind=%s task_id=%s error=%r", kind, task_id, e)


async def read(js: JetStreamContext, subject: str) -> list[Event]:
    """Every event on `subject`, oldest first (an ordered ephemeral consumer, read to the end)."""
    out: list[Event] = []
    try:
        info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
    except Exception:
        return out
    if not info.state.subjects or subject not in info.state.subjects:
        return out
    expected = info.state.subjects[subject]
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    try:
        while len(out) < expected:
            try:
                msg = await sub.next_msg(timeout=READ_TIMEOUT)
            except TimeoutError:
                break
            with contextlib.suppress(msgspec.DecodeError):
                out.append(msgspec.json.decode(msg.data, type=Event))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def task_events(js: JetStreamContext, task_id: str) -> list[Event]:
    return await read(js, task_subject(task_id))
