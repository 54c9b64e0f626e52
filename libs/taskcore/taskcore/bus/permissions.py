"""Who may do what on the bus: one NATS user per role, authenticated by its nkey, with the
publish and subscribe permissions of its role, no more. `authorization(users)` renders the
server's `authorization` block from these grants (the dev stack, the tests, chaos runs and the
benchmarks all run with it; README "Security" has the matrix).

The roles:
- router: consumes `tasks.global`, publishes work items on `tasks.cluster.>`, writes task records,
  dead letters and audit events, serves plan previews, hears max-deliveries advisories;
- runner: pulls and acks work items, writes node records (and the failure count and stop record a
  failing node writes), dead letters and audit events; never publishes a task or a work item;
- scheduler: publishes to `tasks.global`, serves the submit and schedules APIs, reads the audit
  trail through its own durable consumer (the notifier);
- operator: publishes raw tasks to `tasks.global` (`nats pub tasks.global '<json>'` keeps working
  with its credentials), submits through the API, cancels, pauses and resumes, reads everything;
- admin: everything else on the bus too (dead letters replayed or purged, streams updated), except
  erasing the audit trail;
- observer: reads only.

Every role reads: stream and consumer information, records, dead letters and events (JetStream
direct gets and ordered consumers on the streams that are only read). No role may delete, purge,
update or rewrite EVENTS: besides the stream's own `deny_delete` and `deny_purge`, nobody can
shorten its retention or replace it. A service may create a missing stream (provisioning a new
bus), which cannot change one that exists."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from taskcore.core import subjects

API = "$JS.API"
KV = f"$KV.{subjects.STATUS_BUCKET}"
KV_STREAM = f"KV_{subjects.STATUS_BUCKET}"
STREAMS = (
    subjects.TASKS_STREAM,
    subjects.WORK_STREAM,
    subjects.DEAD_STREAM,
    subjects.EVENTS_STREAM,
    KV_STREAM,
)
READ_ONLY_STREAMS = (subjects.DEAD_STREAM, subjects.EVENTS_STREAM, KV_STREAM)  # readers make consumers here
INBOX = "_INBOX.>"


@dataclass(frozen=True)
class Grant:
    """The permissions of one role: subjects it may publish and subscribe to, and those it may
    never publish to whatever it is allowed (`deny`); `responses` lets it answer requests."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny: tuple[str, ...] = ()
    responses: bool = False


def _consumers(stream: str) -> tuple[str, ...]:
    """Create or look up a consumer of `stream` (named, filtered or ephemeral) and delete it."""
    return (
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{API}.CONSUMER.DELETE.{stream}.*",
    )


def _pull(stream: str) -> tuple[str, ...]:
    """Fetch from and ack the consumers of `stream`."""
    return (f"{API}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>")


READ = Grant(
    publish=(
        f"{API}.INFO",
        f"{API}.STREAM.INFO.*",
        f"{API}.STREAM.NAMES",
        f"{API}.STREAM.LIST",
        f"{API}.CONSUMER.INFO.*.*",
        f"{API}.CONSUMER.NAMES.*",
        f"{API}.CONSUMER.LIST.*",
        f"{API}.DIRECT.GET.>",
        f"{API}.STREAM.MSG.GET.*",
        "$JS.FC.>",  # flow control of the ordered consumers that read
        subjects.PLAN_SUBJECT,
        *(s for stream in READ_ONLY_STREAMS for s in _consumers(stream)),
    ),
    subscribe=(INBOX,),
)
# Never, for anyone: the audit trail is not erased, shortened or replaced.
ERASE_AUDIT = (
    f"{API}.STREAM.DELETE.{subjects.EVENTS_STREAM}",
    f"{API}.STREAM.PURGE.{subjects.EVENTS_STREAM}",
    f"{API}.STREAM.UPDATE.{subjects.EVENTS_STREAM}",
    f"{API}.STREAM.MSG.DELETE.{subjects.EVENTS_STREAM}",
)
CREATE_STREAMS = tuple(f"{API}.STREAM.CREATE.{s}" for s in STREAMS)
AUDIT = f"{subjects.EVENTS_PREFIX}.>"
DEAD = f"{subjects.DEAD_PREFIX}.>"
WORK = f"{subjects.CLUSTER_PREFIX}.>"


def _with(
    base: Grant, *, publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = (), responses: bool = False
) -> Grant:
    return Grant(
        publish=base.publish + publish,
        subscribe=base.subscribe + subscribe,
        deny=ERASE_AUDIT,
        responses=responses,
    )


OPERATOR = _with(
    READ,
    publish=(
        subjects.GLOBAL,
        subjects.SUBMIT_SUBJECT,
        subjects.SCHEDULES_SUBJECT,
        AUDIT,
        f"{KV}.task.>",  # a task submitted straight to the stream is recorded pending first
        f"{KV}.stop.>",  # cancel
        f"{KV}.pause.>",  # pause, resume
    ),
)

ROLES: dict[str, Grant] = {
    "router": _with(
        READ,
        publish=(
            *CREATE_STREAMS,
            *_consumers(subjects.TASKS_STREAM),
            *_pull(subjects.TASKS_STREAM),
            f"{API}.STREAM.MSG.DELETE.{subjects.WORK_STREAM}",  # the item a dead letter replaced
            WORK,
            DEAD,
            AUDIT,
            f"{KV}.>",
        ),
        subscribe=(subjects.PLAN_SUBJECT, f"{subjects.MAX_DELIVERIES_ADVISORY}.>"),
        responses=True,
    ),
    "runner": _with(
        READ,
        publish=(
            *CREATE_STREAMS,
            *_consumers(subjects.WORK_STREAM),
            *_pull(subjects.WORK_STREAM),
            DEAD,
            AUDIT,
            f"{KV}.node.>",
            f"{KV}.failures.>",
            f"{KV}.stop.>",  # a node past max_failures, a failed post_check, a deadline
        ),
        subscribe=(f"{KV}.stop.>", f"{KV}.pause.>", f"{KV}.node.>"),  # the node records: a canary's
    ),
    "scheduler": _with(
        READ,
        publish=(
            *CREATE_STREAMS,
            *_pull(subjects.EVENTS_STREAM),
            subjects.GLOBAL,
            DEAD,
            AUDIT,
            f"{KV}.task.>",
        ),
        subscribe=(subjects.SUBMIT_SUBJECT, subjects.SCHEDULES_SUBJECT),
        responses=True,
    ),
    "operator": OPERATOR,
    "admin": Grant(publish=(">",), subscribe=(">",), deny=ERASE_AUDIT, responses=True),
    "observer": _with(READ),
}


def authorization(users: Mapping[str, str]) -> str:
    """The nats-server.conf `authorization` block giving each role's public nkey (role → key)
    its role's permissions. Unknown roles are refused."""
    entries = []
    for role, key in sorted(users.items()):
        if role not in ROLES:
            raise ValueError(f"unknown NATS role {role!r}: one of {', '.join(ROLES)}")
        g = ROLES[role]
        permissions: dict[str, object] = {
            "publish": {"allow": list(g.publish), "deny": list(g.deny)},
            "subscribe": {"allow": list(g.subscribe)},
        }
        if g.responses:
            permissions["allow_responses"] = True
        entries.append({"nkey": key, "permissions": permissions})
    return f"authorization {{\n  users: {json.dumps(entries, indent=2)}\n}}\n"
