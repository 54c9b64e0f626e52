"""The `service` pack: restart, reload or stop-start a service that the node's operator names.

A task only picks a service by name; what that name means is the node's `[packs.service]` table:
a systemd unit (`systemctl <verb> <unit>`) or allowed argv lists (`start`, `stop`, optional
`reload` and `restart`), never a shell string from the task, and a health probe. pre_check: the
service is healthy (a broken node is left alone unless the task says `allow_unhealthy`); post_check:
healthy again within `health_timeout`, else the step fails (and the runner stops the task)."""

from __future__ import annotations

import logging
import re
from typing import Annotated, ClassVar, Literal

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.common import (
    Argv,
    CommandFailed,
    Probe,
    ProbeFailed,
    Seconds,
    allowed_name,
    missing_program,
    pack_config,
    probe_once,
    run_fenced,
    wait_down,
    wait_healthy,
)

log = logging.getLogger(__name__)
PACK = "service"
_UNIT = re.compile(r"^[A-Za-z0-9_.@:\\][A-Za-z0-9_.@:\\-]*$")
Verb = Literal["restart", "reload", "stop-start"]


class ServiceDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One service tasks may act on: `unit`, or `start` and `stop` (with optional `reload` and
    `restart`) commands; `probe` says whether it is healthy."""

    probe: Probe
    unit: str | None = None
    start: Argv | None = None
    stop: Argv | None = None
    reload: Argv | None = None
    restart: Argv | None = None
    health_timeout: Seconds = 30.0  # post_check: healthy again within this
    stop_timeout: Seconds = 30.0  # after a stop: the probe stops passing within this
    command_timeout: Seconds = 120.0  # each systemctl or allowed command

    def __post_init__(self) -> None:
        commands = [c for c in (self.start, self.stop, self.reload, self.restart) if c is not None]
        if self.unit is not None:
            if commands:
                raise ValueError("give either `unit` or commands (start, stop, reload, restart), not both")
            if not _UNIT.match(self.unit):
                raise ValueError(f"`unit` {self.unit!r} is not a systemd unit name")
        elif self.start is None or self.stop is None:
            raise ValueError("a service needs `unit`, or both `start` and `stop` commands")

    def can_reload(self) -> bool:
        return self.unit is not None or self.reload is not None


class ServiceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The node operator's `[packs.service]` table."""

    services: dict[str, ServiceDef]
    # how to call systemctl, e.g. ["sudo", "-n", "systemctl"] for a runner that is not root
    systemctl: Argv = msgspec.field(default_factory=lambda: ["systemctl"])


class ServiceArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of every `service:` action."""

    service: Annotated[str, msgspec.Meta(min_length=1)]
    allow_unhealthy: bool = False  # act even though pre_check finds the service unhealthy


class _ServiceAction(Action):
    """What the three actions share: the checks, and the commands of each verb."""

    verb: ClassVar[Verb]
    version = "1.0"
    Args = ServiceArgs
    Config = ServiceConfig
    timeout = 3600.0  # a backstop: every command and probe wait has its own, shorter, configured bound

    @classmethod
    def check_args(cls, args: ServiceArgs, config: ServiceConfig) -> None:
        allowed_name(args.service, config.services, "service", "service", PACK)
        if cls.verb == "reload" and not config.services[args.service].can_reload():
            raise InvalidTask(
                f"service {args.service!r} has no `reload` command in this node's [packs.{PACK}] config",
                field="taskerman_params.action_args.service",
            )

    def commands(self, conf: ServiceConfig, svc: ServiceDef) -> list[list[str] | Literal["wait-down"]]:
        """The steps of this verb for `svc`: commands to run in order, and where to wait until the
        probe stops passing (between a stop and a start)."""
        if svc.unit is not None:
            ctl = list(conf.systemctl)
            if self.verb == "stop-start":
                return [[*ctl, "stop", svc.unit], "wait-down", [*ctl, "start", svc.unit]]
            return [[*ctl, self.verb, svc.unit]]
        assert svc.start is not None  # ServiceDef checked it
        assert svc.stop is not None
        if self.verb == "reload":
            assert svc.reload is not None  # check_args refused it otherwise
            return [list(svc.reload)]
        if self.verb == "restart" and svc.restart is not None:
            return [list(svc.restart)]
        return [list(svc.stop), "wait-down", list(svc.start)]

    async def pre_check(self, ctx: ActionContext) -> None:
        """The commands can run here, and the service is healthy (unless `allow_unhealthy`)."""
        conf = pack_config(ctx, ServiceConfig, "pre_check")
        args: ServiceArgs = ctx.args
        svc = conf.services[args.service]
        for cmd in self.commands(conf, svc):
            if cmd != "wait-down" and (why := missing_program(cmd)):
                raise ActionFailed("pre_check", f"service {args.service!r}: {why}")
        try:
            await probe_once(svc.probe)
        except ProbeFailed as e:
            if not args.allow_unhealthy:
                raise ActionFailed(
                    "pre_check",
                    f"service {args.service!r} on {ctx.node} is not healthy before the {self.verb} ({e}); "
                    "not acting on a broken node (allow_unhealthy overrides)",
                ) from e
            log.warning("service %s unhealthy before %s, allowed: %s", args.service, self.verb, e)

    async def execute_action(self, ctx: ActionContext) -> None:
        """Run the verb's commands in order, checkpointing before each side effect."""
        conf = pack_config(ctx, ServiceConfig, "execute_action")
        args: ServiceArgs = ctx.args
        svc = conf.services[args.service]
        for cmd in self.commands(conf, svc):
            ctx.checkpoint()
            if cmd == "wait-down":
                try:
                    await wait_down(svc.probe, svc.stop_timeout)
                except ProbeFailed as e:
                    raise ActionFailed("execute_action", f"service {args.service!r} did not stop: {e}") from e
                continue
            log.info("service %s %s: %s", args.service, self.verb, " ".join(cmd))
            try:
                await run_fenced(ctx, cmd, svc.command_timeout)
            except CommandFailed as e:
                raise ActionFailed("execute_action", f"service {args.service!r}: {e}") from e

    async def post_check(self, ctx: ActionContext) -> None:
        """The service's probe passes again within its `health_timeout`."""
        conf = pack_config(ctx, ServiceConfig, "post_check")
        args: ServiceArgs = ctx.args
        svc = conf.services[args.service]
        try:
            await wait_healthy(svc.probe, svc.health_timeout)
        except ProbeFailed as e:
            raise ActionFailed(
                "post_check", f"service {args.service!r} on {ctx.node} after the {self.verb}: {e}"
            ) from e


class Restart(_ServiceAction):
    """`service:restart`: `systemctl restart`, the `restart` command, or stop, wait down, start."""

    name = "service:restart"
    verb = "restart"


class Reload(_ServiceAction):
    """`service:reload`: `systemctl reload`, or the `reload` command (refused when there is none)."""

    name = "service:reload"
    verb = "reload"


class StopStart(_ServiceAction):
    """`service:stop-start`: stop, wait until the probe stops passing, start."""

    name = "service:stop-start"
    verb = "stop-start"
