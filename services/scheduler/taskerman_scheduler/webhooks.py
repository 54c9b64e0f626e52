"""Webhooks: where notifications go (a TOML file of `[[webhook]]` tables), what they say (a
Slack-compatible JSON body) and how a receiver knows they come from us (HMAC-SHA256 over the
timestamp and the exact body, with the webhook's shared secret). Pure: the notifier posts them.

    [[webhook]]
    name = "oncall"                       # tasks name it in `taskerman_params.notify`
    url = "https://hooks.slack.com/services/…"
    secret_file = "/etc/taskerman/oncall.secret"   # or secret_env = "ONCALL_SECRET"
    events = ["failed", "dead-lettered", "breaker-opened", "canary-late"]   # default: all
    clusters = ["demo:*"]                 # fnmatch patterns; default: none (only tasks naming it)

A receiver checks `X-Taskerman-Signature` (`sha256=<hex>`) against
`hmac_sha256(secret, "<X-Taskerman-Timestamp>." + body)` (`verify`), refuses old timestamps, and
may drop a repeated `X-Taskerman-Delivery` id: delivery is at least once."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import msgspec

from taskcore.core.model import WEBHOOK_NAME

NoticeKind = Literal["finished", "failed", "dead-lettered", "breaker-opened", "canary-late"]
KINDS: tuple[NoticeKind, ...] = ("finished", "failed", "dead-lettered", "breaker-opened", "canary-late")
SIGNATURE_HEADER = "X-Taskerman-Signature"
TIMESTAMP_HEADER = "X-Taskerman-Timestamp"
DELIVERY_HEADER = "X-Taskerman-Delivery"
EVENT_HEADER = "X-Taskerman-Event"
NAME = re.compile(WEBHOOK_NAME)
ICONS = {
    "finished": ":white_check_mark:",
    "failed": ":x:",
    "dead-lettered": ":skull:",
    "breaker-opened": ":rotating_light:",
    "canary-late": ":hourglass:",
}


class WebhookError(ValueError):
    """The webhooks file is wrong: the message says which table and field, and what to write."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Webhook:
    """One receiver; its secret never appears in its repr (nor in a log line)."""

    name: str
    url: str
    secret: bytes = dataclasses.field(default=b"", repr=False)
    events: frozenset[NoticeKind] = frozenset(KINDS)
    clusters: tuple[str, ...] = ()
    timeout_s: float = 10.0
    retry_base_s: float = 2.0  # the first retry's delay; doubled on each failure
    retry_max_s: float = 300.0
    give_up_s: float = 86400.0  # a notice still undelivered this long after its event is dropped


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """One notification. `id` is the same on every retry and from every scheduler replica."""

    id: str
    kind: NoticeKind
    at: float
    task_id: str = ""
    cluster: str = ""
    node: str = ""
    state: str = ""  # the task's final state (finished, failed)
    detail: str = ""


def load(path: Path, env: dict[str, str] | None = None) -> dict[str, Webhook]:
    """The webhooks of a TOML file, by name; WebhookError saying what is wrong and where."""
    env = dict(os.environ) if env is None else env
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise WebhookError(f"{path}: cannot read it as TOML: {e}") from e
    hooks: dict[str, Webhook] = {}
    tables = raw.get("webhook", [])
    if not isinstance(tables, list):
        raise WebhookError(f"{path}: write each webhook as a [[webhook]] table")
    for i, table in enumerate(tables):
        hook = _webhook(table, env, where=f"{path}: webhook {i + 1}")
        if hook.name in hooks:
            raise WebhookError(f"{path}: webhook name {hook.name!r} is used twice")
        hooks[hook.name] = hook
    return hooks


def _webhook(table: dict[str, Any], env: dict[str, str], where: str) -> Webhook:
    known = {f.name for f in dataclasses.fields(Webhook)} - {"secret"} | {"secret_file", "secret_env"}
    if unknown := sorted(set(table) - known):
        raise WebhookError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    name = table.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise WebhookError(f"{where}: `name` must be 1-64 letters, digits, '-' or '_', got {name!r}")
    where = f"{where} ({name})"
    url = table.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise WebhookError(f"{where}: `url` must be an http:// or https:// URL, got {url!r}")
    secret = _secret(table, env, where)
    events = table.get("events", list(KINDS))
    if not isinstance(events, list) or not events or not set(events) <= set(KINDS):
        raise WebhookError(f"{where}: `events` must be a list of {', '.join(KINDS)}, got {events!r}")
    fields = {k: v for k, v in table.items() if k not in ("secret_file", "secret_env")}
    fields.update(events=frozenset(events), secret=secret)
    try:
        return msgspec.convert(fields, Webhook)
    except msgspec.ValidationError as e:
        raise WebhookError(f"{where}: {e}") from e


def _secret(table: dict[str, Any], env: dict[str, str], where: str) -> bytes:
    """The shared secret, from a file or a variable (never in the webhooks file itself)."""
    if file := table.get("secret_file"):
        try:
            secret = Path(file).read_text().strip()
        except OSError as e:
            raise WebhookError(f"{where}: `secret_file` {file!r} cannot be read: {e}") from e
    elif var := table.get("secret_env"):
        secret = env.get(var, "").strip()
    else:
        raise WebhookError(f"{where}: give a shared secret with `secret_file` or `secret_env`")
    if len(secret) < 16:
        raise WebhookError(f"{where}: the shared secret must have at least 16 characters")
    return secret.encode()


def wanted(hook: Webhook, notice: Notice, named: tuple[str, ...] = ()) -> bool:
    """Whether `hook` gets `notice`: it wants that kind (a failed task is a finished one too), and
    the notice's task names the hook or its cluster matches one of the hook's patterns."""
    kinds = {notice.kind, "finished"} if notice.kind == "failed" else {notice.kind}
    if not kinds & hook.events:
        return False
    return hook.name in named or any(fnmatchcase(notice.cluster, p) for p in hook.clusters)


def text(notice: Notice) -> str:
    """The line a chat channel shows."""
    what = f"task `{notice.task_id}`" if notice.task_id else "cluster"
    where = f" on `{notice.cluster}`" if notice.cluster else ""
    node = f" node `{notice.node}`" if notice.node else ""
    state = f" ({notice.state})" if notice.state else ""
    detail = f": {notice.detail}" if notice.detail else ""
    return f"{ICONS[notice.kind]} {what}{where}{node} {notice.kind}{state}{detail}"


def body(notice: Notice) -> bytes:
    """Slack-compatible: `text` for the channel, the notice itself under `taskerman`."""
    return msgspec.json.encode({"text": text(notice), "taskerman": notice})


def sign(secret: bytes, timestamp: str, payload: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + payload, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, payload: bytes, signature: str) -> bool:
    """What a receiver checks (constant time)."""
    return hmac.compare_digest(sign(secret, timestamp, payload), signature)


def headers(hook: Webhook, notice: Notice, payload: bytes, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "Content-Type": "application/json",
        "User-Agent": "taskerman-notifier",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(hook.secret, timestamp, payload),
        DELIVERY_HEADER: notice.id,
        EVENT_HEADER: notice.kind,
    }


def retry_delay(hook: Webhook, deliveries: int) -> float:
    """Seconds before the next try, after `deliveries` tries (1, 2, …)."""
    return float(min(hook.retry_base_s * 2 ** max(deliveries - 1, 0), hook.retry_max_s))
