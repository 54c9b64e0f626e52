"""Every size bound on what enters Taskerman, in one place, and the cheap checks that run before a
payload is decoded. Anyone may `nats pub` anything, so each bound keeps one message from ending or
wedging a service:

- MAX_PAYLOAD_BYTES (1 MiB): a task or work item as published. NATS' default max_payload; anything
  larger could not have been published to a default server, and decoding stays cheap.
- MAX_JSON_DEPTH (32): nesting of the whole document, checked on the raw bytes before msgspec
  decodes (msgspec recurses; 5,000 levels raise RecursionError). A task uses 2 levels around its
  `action_args` (the task and `taskerman_params`), so the arguments may nest MAX_ARGS_DEPTH (30)
  levels, their own object included: far more than any action needs.
- MAX_ARGS_BYTES (64 KiB): `action_args` encoded. Every work item carries them, once per node, and
  a dead letter keeps 64 KiB of payload: large inputs belong in a file or a URL the action reads.
- MAX_NAME_CHARS (512) and MAX_NAME_TOKEN (1,024): a cluster or node name, in characters and once
  encoded as a subject token (`=XX` escapes make a character up to 12 token characters). The work
  subject `tasks.cluster.<cluster>.<node>` is then at most 2,063 characters, and the KV key
  `node.<task>.<node>` about 1,650: well under the server's 4 KiB control line, whose overflow
  makes nats-server close the connection (nats-py then closes the client for good).
- MAX_TASK_ID_CHARS (200) and MAX_TASK_ID_TOKEN (600): a task id, in characters and encoded (it is
  part of KV keys, audit subjects and every message id).
- MAX_ACTION_CHARS (200), MAX_OWNER_CHARS (200), MAX_DISCOVERY_CHARS (100): short labels.
- MAX_NODES (100,000): explicit `nodes`. A benchmark routes 10,000; 100,000 short names still fit
  in MAX_PAYLOAD_BYTES, and the plan is chunked whatever the count.
- MAX_LIMIT (100,000) and MAX_FAILURES (100,000): `limit` and `max_failures`; more than there can
  be nodes means nothing, and huge integers would be kept in ZooKeeper slot paths.
- MAX_SLEEP_SECONDS (3,600): the built-in test actions' `seconds`.
- UNEXPECTED_STRIKES (3): a message whose handling raised unexpectedly this many times is
  dead-lettered with the exception as its reason, so no message can be retried forever.
"""

from __future__ import annotations

import re

from taskcore.core.errors import InvalidTask

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
TASK_DEPTH = 2  # levels around a task's action_args: the task and taskerman_params
MAX_ARGS_DEPTH = MAX_JSON_DEPTH - TASK_DEPTH
MAX_ARGS_BYTES = 64 * 1024
MAX_NAME_CHARS = 512
MAX_NAME_TOKEN = 1024
MAX_TASK_ID_CHARS = 200
MAX_TASK_ID_TOKEN = 600
MAX_ACTION_CHARS = 200
MAX_OWNER_CHARS = 200
MAX_DISCOVERY_CHARS = 100
MAX_NODES = 100_000
MAX_LIMIT = 100_000
MAX_FAILURES = 100_000
MAX_CANARY = 100  # canary nodes of a task: each item names them all
MAX_NOTIFY = 8  # webhooks a task names
MAX_SLEEP_SECONDS = 3600.0
UNEXPECTED_STRIKES = 3

# a JSON string (escapes included), in the unrolled form that the regex engine runs in one pass
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_OPEN = frozenset(b"[{")


def json_depth(data: bytes, stop_above: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of a JSON document, from its raw bytes (strings skipped), without
    decoding it; the scan stops as soon as the depth passes `stop_above`."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if m.group()[0] in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    break
        else:
            depth -= 1
    return deepest


def check_payload(data: bytes | str, what: str = "task") -> bytes:
    """Refuse a payload too large or too deeply nested to decode safely; returns it as bytes."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidTask(
            f"the {what} is {len(raw)} bytes, more than the {MAX_PAYLOAD_BYTES} allowed: "
            "keep large inputs in a file or URL that the action reads"
        )
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidTask(
            f"the {what} nests deeper than {MAX_JSON_DEPTH} levels (action_args may nest at most "
            f"{MAX_ARGS_DEPTH}): flatten the arguments"
        )
    return raw


def check_token(length: int, field: str, bound: int = MAX_NAME_TOKEN) -> None:
    """Refuse a name whose encoded subject token (`length` characters) is longer than `bound`."""
    if length > bound:
        raise InvalidTask(
            f"encodes to a subject token of {length} characters, more than the {bound} allowed "
            "(every character outside [A-Za-z0-9_-] takes 3 per UTF-8 byte): use a shorter name",
            field=field,
        )


def check_args_size(size: int) -> None:
    if size > MAX_ARGS_BYTES:
        raise InvalidTask(
            f"{size} bytes encoded, more than the {MAX_ARGS_BYTES} allowed: every node's work item "
            "carries them; keep large inputs in a file or URL that the action reads",
            field="taskerman_params.action_args",
        )
