"""Subjects, stream names and the reversible encoding of names into subject tokens.

Cluster and node names may hold `.`, `:`, spaces or any unicode. A subject token (and a KV key
segment) may only hold a safe subset, so every byte outside `[A-Za-z0-9_-]` is written as `=XX`
(upper-case hex of its UTF-8 bytes). `=` itself is escaped, so decoding is exact.
"""

from __future__ import annotations

import hashlib
import re

from taskcore.core.errors import InvalidName

GLOBAL = "tasks.global"
CLUSTER_PREFIX = "tasks.cluster"
DEAD_PREFIX = "tasks.dead"
EVENTS_PREFIX = "events"

TASKS_STREAM = "TASKS"
WORK_STREAM = "WORK"
DEAD_STREAM = "DEAD"
EVENTS_STREAM = "EVENTS"
STATUS_BUCKET = "TASK_STATUS"
ROUTER_DURABLE = "router"
SUBMIT_SUBJECT = "taskerman.api.submit"
SUBMIT_QUEUE = "schedulers"
PLAN_SUBJECT = "taskerman.api.plan"  # routers preview a task's routing (request/reply)
SCHEDULES_SUBJECT = (
    "taskerman.api.schedules"  # the leading scheduler lists, previews and triggers (request/reply)
)
ROUTER_QUEUE = "routers"  # the queue group of every router: plan previews, max-deliveries advisories
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"

_SAFE = re.compile(r"[A-Za-z0-9_-]")
_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")
_UNSAFE_BYTE = re.compile(rb"[^A-Za-z0-9_-]")


def encode_token(name: str) -> str:
    """Encode a name into one subject token; reversible with `decode_token`."""
    if not name:
        raise InvalidName("a name must not be empty")
    out: list[str] = []
    for ch in name:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def token_length(name: str) -> int:
    """len(encode_token(name)), computed without building the token (cheap for 100,000 names)."""
    raw = name.encode("utf-8")
    return len(raw) + 2 * len(_UNSAFE_BYTE.findall(raw))


def decode_token(token: str) -> str:
    """Decode a token produced by `encode_token`."""
    if not _TOKEN.fullmatch(token):
        raise InvalidName(f"not an encoded name token: {token!r}")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(token[i].encode())
            i += 1
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidName(f"token {token!r} does not decode to UTF-8") from e
    if encode_token(name) != token:
        raise InvalidName(f"token {token!r} is not in canonical form")
    return name


def node_subject(cluster: str, node: str) -> str:
    """The work subject of one node: `tasks.cluster.<cluster>.<node>`."""
    return f"{CLUSTER_PREFIX}.{encode_token(cluster)}.{encode_token(node)}"


def dead_subject(cluster: str, node: str) -> str:
    """The dead-letter subject of one node's work (or of a task that never routed)."""
    return f"{DEAD_PREFIX}.{encode_token(cluster)}.{encode_token(node)}"


def parse_node_subject(subject: str) -> tuple[str, str]:
    """(cluster, node) of a node work subject."""
    parts = subject.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != CLUSTER_PREFIX:
        raise InvalidName(f"not a node work subject: {subject!r}")
    return decode_token(parts[2]), decode_token(parts[3])


def runner_durable(cluster: str, node: str) -> str:
    """Durable consumer name of a node's runner; `~` never occurs in a token, so names cannot collide."""
    name = f"runner~{encode_token(cluster)}~{encode_token(node)}"
    if len(name) > 200:
        name = "runner~" + hashlib.sha256(name.encode()).hexdigest()
    return name


def work_msg_id(task_id: str, node: str) -> str:
    """Idempotent message id of one node's work item: `<task_id>:<node token>`. The token never
    holds `:`, so ids of different (task, node) pairs cannot collide."""
    return f"{task_id}:{encode_token(node)}"
