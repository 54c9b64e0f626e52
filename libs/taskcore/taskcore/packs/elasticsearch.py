"""The `elasticsearch` pack: `elasticsearch:restart`, Elastic's documented rolling-restart procedure for
one node, through the cluster's HTTP API and the restart command that the node's config names.

1. pre_check: the cluster is green (or yellow, when the node's config accepts yellow) and lists this node.
2. `PUT _cluster/settings {"persistent": {"cluster.routing.allocation.enable": "primaries"}}`: while the
   node is away its replicas are not rebuilt elsewhere.
3. `POST _flush`, so the restarted node recovers its shards quickly.
4. The restart: `restart_command`, or `stop_command` then `start_command`.
5. post_check: wait until `_cat/nodes` lists the node again from a new process (its pid changed).
6. `PUT _cluster/settings {"persistent": {"cluster.routing.allocation.enable": null}}`.
7. Wait until the cluster is green (yellow when accepted).

Allocation is re-enabled whatever happens after step 2: when a step fails, and also when the node does not
come back in time (the cluster then rebuilds its replicas elsewhere instead of staying one copy short).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask, TaskermanError
from taskcore.packs.common import Argv, CommandFailed, in_thread, pack_config, run_command

log = logging.getLogger(__name__)

PACK = "elasticsearch"
POLL = 0.5
ALLOCATION = "cluster.routing.allocation.enable"
STATUS_RANK = {"green": 0, "yellow": 1, "red": 2}


class ElasticsearchConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[packs.elasticsearch]`: the node operator's settings for this node's Elasticsearch."""

    node_name: str  # this node's name as `_cat/nodes` lists it
    url: str = "http://127.0.0.1:9200"
    other_urls: list[str] = []  # other nodes, asked while `url` does not answer (it is restarting)
    username: str | None = None
    password: str | None = None
    ca_file: str = ""  # CA bundle for an https url
    restart_command: Argv | None = None  # or stop_command then start_command
    stop_command: Argv | None = None
    start_command: Argv | None = None
    command_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0
    request_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0
    accept_yellow: bool = False  # whether pre_check and post_check accept a yellow cluster


class RestartArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`elasticsearch:restart`: how long to wait for the node to rejoin, then for the cluster's health."""

    rejoin_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0
    health_timeout: Annotated[float, msgspec.Meta(gt=0, le=14400)] = 1800.0


class HttpError(TaskermanError):
    """A request to the cluster failed or answered an error."""


class Cluster:
    """The few calls of the HTTP API that the procedure uses. Each goes to `url` (usually this node),
    or, while that does not answer (this node is restarting), to the `other_urls` in turn."""

    def __init__(self, conf: ElasticsearchConfig) -> None:
        self.conf = conf
        self.bases = [u.rstrip("/") for u in (conf.url, *conf.other_urls)]
        self.context = ssl.create_default_context(cafile=conf.ca_file or None)

    async def call(self, method: str, path: str, body: Any = None, time_limit: float | None = None) -> Any:
        return await in_thread(self._call, method, path, body, time_limit or self.conf.request_timeout)

    def _call(self, method: str, path: str, body: Any, time_limit: float) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.conf.username is not None:
            token = base64.b64encode(f"{self.conf.username}:{self.conf.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        problems = []
        for base in self.bases:
            request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=time_limit, context=self.context) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:  # it answered: no other node is asked
                detail = e.read()[:300].decode(errors="replace")
                raise HttpError(f"{method} {path} answered {e.code}: {detail}") from e
            except ValueError as e:
                raise HttpError(f"{method} {path} answered something that is not JSON: {e}") from e
            except OSError as e:  # refused, unreachable, timed out: try the next
                problems.append(f"{base}: {getattr(e, 'reason', e)}")
        raise HttpError(f"{method} {path}: no answer ({'; '.join(problems)})")

    async def health(self) -> dict[str, Any]:
        answer = await self.call("GET", "/_cluster/health")
        if not isinstance(answer, dict) or answer.get("status") not in STATUS_RANK:
            raise HttpError(f"GET /_cluster/health answered {answer!r:.200}")
        return answer

    async def node_pids(self) -> dict[str, str]:
        """{node name: pid} as `_cat/nodes` lists them."""
        rows = await self.call("GET", "/_cat/nodes?format=json&h=name,pid")
        if not isinstance(rows, list):
            raise HttpError(f"GET /_cat/nodes answered {rows!r:.200}")
        return {str(r.get("name")): str(r.get("pid")) for r in rows if isinstance(r, dict)}

    async def set_allocation(self, value: str | None) -> None:
        answer = await self.call("PUT", "/_cluster/settings", {"persistent": {ALLOCATION: value}})
        if not isinstance(answer, dict) or answer.get("acknowledged") is not True:
            raise HttpError(
                f"PUT /_cluster/settings {ALLOCATION}={value} was not acknowledged: {answer!r:.200}"
            )


def good_enough(status: str, conf: ElasticsearchConfig) -> bool:
    return STATUS_RANK[status] <= STATUS_RANK["yellow" if conf.accept_yellow else "green"]


class ElasticsearchRestart(Action):
    """Restarts one node following the rolling-restart procedure (see the module doc)."""

    name = "elasticsearch:restart"
    version = "1.0"
    Args = RestartArgs
    Config = ElasticsearchConfig
    timeout = 3600.0 + 14400.0 + 600.0  # per step: post_check waits to rejoin, then for health

    def __init__(self) -> None:
        self.pid_before: str | None = None

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        for url in (config.url, *config.other_urls):
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise InvalidTask(f"[packs.elasticsearch] url {url!r} is not http(s)", "packs.elasticsearch")
        if config.restart_command is None and (config.stop_command is None or config.start_command is None):
            raise InvalidTask(
                "elasticsearch:restart needs restart_command, or stop_command and start_command, in the "
                "node's [packs.elasticsearch]",
                "packs.elasticsearch",
            )

    async def pre_check(self, ctx: ActionContext) -> None:
        """The cluster is green (or yellow, when accepted) and lists this node."""
        conf = pack_config(ctx, ElasticsearchConfig, "pre_check")
        self.check_args(ctx.args, conf)
        cluster = Cluster(conf)
        try:
            health = await cluster.health()
            pids = await cluster.node_pids()
        except HttpError as e:
            raise ActionFailed("pre_check", f"cannot check the cluster: {e}") from e
        if not good_enough(health["status"], conf):
            raise ActionFailed(
                "pre_check",
                f"refusing to restart {ctx.node!r}: the cluster is {health['status']} "
                f"({health.get('unassigned_shards')} unassigned, "
                f"{health.get('relocating_shards')} relocating shards)",
            )
        if conf.node_name not in pids:
            raise ActionFailed("pre_check", f"_cat/nodes does not list node {conf.node_name!r}")
        self.pid_before = pids[conf.node_name]

    async def execute_action(self, ctx: ActionContext) -> None:
        """Allocation to primaries, flush, restart. If a step fails, allocation is re-enabled."""
        conf = pack_config(ctx, ElasticsearchConfig, "execute_action")
        self.check_args(ctx.args, conf)
        cluster = Cluster(conf)
        ctx.checkpoint()
        try:
            await cluster.set_allocation("primaries")
        except HttpError as e:
            raise ActionFailed("execute_action", f"disabling replica allocation: {e}") from e
        try:
            flushed = await cluster.call("POST", "/_flush", time_limit=conf.command_timeout)
            failed = (flushed or {}).get("_shards", {}).get("failed", 0) if isinstance(flushed, dict) else 0
            if failed:  # a shard that did not flush recovers more slowly, no more
                log.warning("elasticsearch:restart node=%s: flush failed on %s shard(s)", ctx.node, failed)
            ctx.checkpoint()
            await self.restart(conf)
        except (HttpError, CommandFailed) as e:
            await reenable(cluster, ctx.node)
            raise ActionFailed("execute_action", str(e)) from e
        except BaseException:
            await asyncio.shield(reenable(cluster, ctx.node))
            raise

    async def restart(self, conf: ElasticsearchConfig) -> None:
        if conf.restart_command is not None:
            await run_command(conf.restart_command, conf.command_timeout)
            return
        assert conf.stop_command is not None
        assert conf.start_command is not None
        await run_command(conf.stop_command, conf.command_timeout)
        await run_command(conf.start_command, conf.command_timeout)

    async def post_check(self, ctx: ActionContext) -> None:
        """The node rejoins from a new process, allocation is re-enabled (in any case), then the cluster
        turns green (yellow when accepted)."""
        conf = pack_config(ctx, ElasticsearchConfig, "post_check")
        args: RestartArgs = ctx.args
        cluster = Cluster(conf)
        try:
            await self.wait_rejoined(cluster, conf, args.rejoin_timeout)
        finally:
            try:
                await asyncio.shield(cluster.set_allocation(None))
            except HttpError as e:
                raise ActionFailed(
                    "post_check",
                    f"re-enabling allocation failed, it is still 'primaries': {e}; set "
                    f"{ALLOCATION} back to null by hand",
                ) from e
        await self.wait_health(cluster, conf, args.health_timeout)

    async def wait_rejoined(self, cluster: Cluster, conf: ElasticsearchConfig, within: float) -> None:
        until = time.monotonic() + within
        while True:
            try:
                pid = (await cluster.node_pids()).get(conf.node_name)
                last = f"pid {pid}, {self.pid_before} before" if pid else "not listed in _cat/nodes"
            except HttpError as e:  # the node restarted may be the one we ask
                pid, last = None, str(e)
            if pid is not None and pid != self.pid_before:
                return
            if time.monotonic() > until:
                raise ActionFailed(
                    "post_check",
                    f"node {conf.node_name!r} did not rejoin within {within:g}s ({last}); "
                    "allocation is re-enabled so the cluster rebuilds its replicas elsewhere",
                )
            await asyncio.sleep(POLL)

    async def wait_health(self, cluster: Cluster, conf: ElasticsearchConfig, within: float) -> None:
        want = "yellow" if conf.accept_yellow else "green"
        until = time.monotonic() + within
        while True:
            try:
                health = await cluster.health()
                if good_enough(health["status"], conf):
                    return
                last = f"{health['status']}, {health.get('unassigned_shards')} unassigned shards"
            except HttpError as e:
                last = str(e)
            if time.monotonic() > until:
                raise ActionFailed("post_check", f"the cluster is not {want} within {within:g}s: {last}")
            await asyncio.sleep(POLL)


async def reenable(cluster: Cluster, node: str) -> None:
    """Best effort, on a failure path: allocation back to null (logged when it fails too)."""
    try:
        await cluster.set_allocation(None)
    except HttpError as e:
        log.error("elasticsearch:restart node=%s: could not re-enable allocation: %s", node, e)
