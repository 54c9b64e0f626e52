"""Notifications: the audit trail (EVENTS) turned into webhook posts (webhooks.py).

The leader reads EVENTS through one durable consumer (`notifier`, from the events that arrive
after it was first made), so a new leader continues where the old one stopped. An event becomes a
notice: `dead-lettered`, `breaker-opened` and `canary-late` as they are; the end of a task is not
an event of its own, so the notifier follows each task whose nodes end (it reads the task's
records once, when it first sees it, then counts the ended nodes' events) and, when the last one
ends, reads the task's final state: `finished` (succeeded) or `failed` (anything else).

Each notice goes to every webhook that wants it. The event is acked once all of them took it (a
2xx); otherwise it comes back after the webhook's backoff (nak with a delay), and the webhooks that
took it already are not posted again while this leader lives. A notice undelivered `give_up_s`
after its event is dropped with an error in the log. At least once: a receiver drops repeats by
the `X-Taskerman-Delivery` id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from taskcore.bus import jetstream as bus
from taskcore.bus.audit import Event
from taskcore.bus.tracking import StatusStore, TaskView
from taskcore.core import subjects
from taskcore.core.model import TASK_FINISHED
from taskerman_scheduler import webhooks
from taskerman_scheduler.webhooks import Notice, Webhook

log = logging.getLogger(__name__)

DURABLE = "notifier"
BATCH = 64
FETCH_WAIT = 2.0
ACK_WAIT = 120.0  # longer than a batch of posts that time out
FOLLOWED = 10_000  # tasks followed at once (the oldest are forgotten, and read again if seen)
DELIVERED_KEPT = 10_000  # events whose partial deliveries are remembered
RETRY_ON_ERROR = 5.0  # an event whose handling failed (a record unreadable) comes back after this
# audit kinds of a node that has ended (the runner's, and the router's dead letters and unserved)
NODE_ENDED = frozenset({"succeeded", "dead-lettered", "skipped", "cancelled", "expired", "unserved"})
ENDED_STATES = frozenset({"succeeded", "dead", "skipped", "cancelled", "expired", "unserved"})  # records
PASSED_ON = {"dead-lettered": "dead-lettered", "rejected": "dead-lettered"}
PASSED_ON |= {"breaker-opened": "breaker-opened", "canary-late": "canary-late"}

Post = Callable[[Webhook, Notice], Awaitable[None]]  # raises when the receiver did not take it


class _Progress:
    """A followed task: how many nodes it has, which have ended."""

    def __init__(self, view: TaskView) -> None:
        planned = {n for wave in view.plan for n in wave.nodes}
        self.nodes = planned | set(view.nodes)
        self.ended = {n for n, r in view.nodes.items() if r.state in ENDED_STATES}


class Notifier:
    def __init__(
        self, js: JetStreamContext, status: StatusStore, hooks: dict[str, Webhook], post: Post | None = None
    ) -> None:
        self.js = js
        self.status = status
        self.hooks = hooks
        self.post = post or post_http
        self._followed: OrderedDict[str, _Progress] = OrderedDict()
        self._notify: OrderedDict[str, tuple[str, ...]] = OrderedDict()  # task → hooks it names
        self._delivered: OrderedDict[int, dict[str, set[str]]] = OrderedDict()  # seq → notice → hooks
        self._ends: OrderedDict[str, tuple[int, Notice]] = OrderedDict()  # task → the event that ended it

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set (or the task is cancelled at the end of a leader's term)."""
        await ensure_consumer(self.js)
        sub = await self.js.pull_subscribe_bind(durable=DURABLE, stream=subjects.EVENTS_STREAM)
        log.info("notifier started webhooks=%s", sorted(self.hooks))
        try:
            while not stop.is_set():
                batch = await bus.fetch(sub, BATCH, wait=FETCH_WAIT)
                # what each event is worth telling, in order (a task's end is decided once), then
                # the posts side by side
                prepared = [await self.prepare(m) for m in batch]
                await asyncio.gather(*(self.deliver(m, p) for m, p in zip(batch, prepared, strict=True)))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def prepare(self, msg: Msg) -> list[tuple[Webhook, Notice]] | None:
        """The posts an event needs (None: it could not be read now, it comes back); never raises."""
        try:
            event = msgspec.json.decode(msg.data, type=Event)
        except msgspec.DecodeError as e:
            log.warning("audit event not decoded, skipped error=%s", e)
            return []
        try:
            seq = msg.metadata.sequence.stream
            pending: list[tuple[Webhook, Notice]] = []
            for notice in await self.notices(event, seq):
                named = await self._named(notice.task_id)
                for hook in self.hooks.values():
                    if webhooks.wanted(hook, notice, named) and hook.name not in self._taken(seq, notice):
                        pending.append((hook, notice))
            return pending
        except Exception as e:  # one event never stops the notifier
            log.warning("audit event not read, retried task_id=%s error=%r", event.task_id, e)
            return None

    async def deliver(self, msg: Msg, pending: list[tuple[Webhook, Notice]] | None) -> None:
        """Post, then ack the event (or nak it for a retry); never raises."""
        try:
            if pending is None:
                await msg.nak(delay=RETRY_ON_ERROR)
                return
            await self._deliver(msg, pending)
        except Exception as e:
            log.warning("event not settled, it comes back error=%r", e)

    async def _deliver(self, msg: Msg, pending: list[tuple[Webhook, Notice]]) -> None:
        seq = msg.metadata.sequence.stream
        took = await asyncio.gather(*(self._post(h, n) for h, n in pending))
        failed = [p for p, ok in zip(pending, took, strict=True) if not ok]
        for (hook, notice), ok in zip(pending, took, strict=True):
            if ok:
                self._taken(seq, notice).add(hook.name)
        if not failed:
            await msg.ack()
            self._forget(seq)
            return
        late = [(h, n) for h, n in failed if time.time() - n.at > h.give_up_s]
        for hook, notice in late:
            log.error("notice given up webhook=%s id=%s kind=%s", hook.name, notice.id, notice.kind)
            self._taken(seq, notice).add(hook.name)
        if len(late) == len(failed):
            await msg.ack()
            self._forget(seq)
            return
        delay = min(webhooks.retry_delay(h, msg.metadata.num_delivered) for h, _ in failed)
        await msg.nak(delay=delay)

    async def _post(self, hook: Webhook, notice: Notice) -> bool:
        try:
            await self.post(hook, notice)
        except Exception as e:
            log.warning("webhook not reached webhook=%s id=%s error=%r", hook.name, notice.id, e)
            return False
        log.info("notified webhook=%s kind=%s id=%s", hook.name, notice.kind, notice.id)
        return True

    def _taken(self, seq: int, notice: Notice) -> set[str]:
        """The webhooks that took this event's notice already (while this leader lives)."""
        if seq not in self._delivered:
            self._delivered[seq] = {}
            _bound(self._delivered, DELIVERED_KEPT)
        return self._delivered[seq].setdefault(notice.id, set())

    def _forget(self, seq: int) -> None:
        self._delivered.pop(seq, None)

    async def _named(self, task_id: str) -> tuple[str, ...]:
        """The webhooks a task names in `taskerman_params.notify` (read once per task)."""
        if not task_id:
            return ()
        if task_id not in self._notify:
            record = await self.status.get_task(task_id)
            task = record.task if record is not None else None
            named = task.taskerman_params.notify if task is not None else ()
            if unknown := [n for n in named if n not in self.hooks]:
                log.warning("task %s names unknown webhook(s) %s", task_id, unknown)
            self._notify[task_id] = named
            _bound(self._notify)
        return self._notify[task_id]

    async def notices(self, event: Event, seq: int) -> list[Notice]:
        """What the event is worth telling (often nothing)."""
        out: list[Notice] = []
        if kind := PASSED_ON.get(event.kind):
            out.append(
                Notice(
                    id=f"{kind}:{seq}",
                    kind=kind,  # type: ignore[arg-type]  # a NoticeKind by PASSED_ON
                    at=event.at,
                    task_id=event.task_id,
                    cluster=event.cluster,
                    node=event.node,
                    detail=event.detail,
                )
            )
        if event.kind in NODE_ENDED and event.task_id and (end := await self._ended(event, seq)):
            out.append(end)
        return out

    async def _ended(self, event: Event, seq: int) -> Notice | None:
        """The task's end, when this event's node was its last to end: decided once per task (the
        same event, come back for a retry, gives the same notice again)."""
        task_id = event.task_id
        if (end := self._ends.get(task_id)) is not None:
            return end[1] if end[0] == seq else None
        progress = self._followed.get(task_id)
        if progress is None or event.kind == "unserved":  # first seen (or many nodes at once): read it
            view = await self.status.view(task_id)
            if view is None:
                return None
            progress = self._followed[task_id] = _Progress(view)
            _bound(self._followed)
        if event.node:
            progress.ended.add(event.node)
        if not progress.nodes <= progress.ended:
            return None
        view = await self.status.view(task_id)
        if view is None or view.state not in TASK_FINISHED:
            return None  # a node retried by a dead letter's replay, say: it ends again later
        self._followed.pop(task_id, None)
        notice = Notice(
            id=f"end:{task_id}",
            kind="finished" if view.state == "succeeded" else "failed",
            at=event.at,
            task_id=task_id,
            cluster=view.cluster_name,
            state=view.state,
            detail=_summary(view),
        )
        self._ends[task_id] = (seq, notice)
        _bound(self._ends)
        return notice


def _bound(d: OrderedDict[Any, Any], kept: int = FOLLOWED) -> None:
    """Forget the oldest entries past `kept`."""
    while len(d) > kept:
        d.popitem(last=False)


def _summary(view: TaskView) -> str:
    counts: dict[str, int] = {}
    for r in view.nodes.values():
        counts[r.state] = counts.get(r.state, 0) + 1
    nodes = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{view.action}, {nodes}" + (f"; {view.error}" if view.error else "")


async def ensure_consumer(js: JetStreamContext) -> None:
    """The notifier's durable consumer of EVENTS, made once; it starts with the events to come."""
    with contextlib.suppress(NotFoundError):
        await js.consumer_info(subjects.EVENTS_STREAM, DURABLE)
        return
    config = api.ConsumerConfig(
        durable_name=DURABLE,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        deliver_policy=api.DeliverPolicy.NEW,
        max_ack_pending=10_000,
    )
    await js.add_consumer(subjects.EVENTS_STREAM, config)


async def post_http(hook: Webhook, notice: Notice) -> None:
    """POST the notice; raises unless the receiver answers 2xx."""
    payload = webhooks.body(notice)
    request = urllib.request.Request(
        hook.url, data=payload, headers=webhooks.headers(hook, notice, payload, time.time()), method="POST"
    )

    def send() -> int:
        with urllib.request.urlopen(request, timeout=hook.timeout_s) as response:
            return int(response.status)

    status = await asyncio.to_thread(send)
    if not 200 <= status < 300:
        raise urllib.error.HTTPError(hook.url, status, "not a 2xx", None, None)  # type: ignore[arg-type]
