"""The action API: reviewed classes with pre_check, execute_action and post_check, found by entry point.

The queue can only choose among installed actions and pass arguments that validate against the
action's schema: it can never make a node run an arbitrary command. What an action may touch on a
node (services, commands, paths, processes) comes from the node operator's `[packs.<pack>]` table,
validated against the action's `Config`; `check_args` then makes sure that the arguments only pick
among what that table allows. Both happen when the item arrives, before any lease or step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import msgspec

from taskcore.core.errors import InvalidTask, UnknownAction
from taskcore.core.model import Task, parse_version

ENTRY_POINT_GROUP = "taskerman.actions"
log = logging.getLogger(__name__)


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    """The arguments of an action that takes none."""


class AnyConfig(msgspec.Struct):
    """The settings of a pack that declares no schema: any table (or none) is accepted; the action
    reads `ctx.pack_config` as it is."""


@dataclass
class ActionContext:
    """What a running action may see: its task, its node, validated args, its fencing token,
    the node operator's settings for its pack, and a signal that fires when it must stop."""

    task: Task
    cluster: str
    node: str
    args: Any
    token: int
    attempt: int
    pack_config: Mapping[str, Any] = field(default_factory=dict)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: Mapping[str, int] = field(default_factory=dict)
    checkpoint: Callable[[], None] = lambda: None
    config: Any = field(default_factory=AnyConfig)

    # `token` is the fencing token of the task's slot (the slot znode's czxid: it only grows);
    # `tokens` has one per lease held. Call `checkpoint()` before each side effect: it raises
    # LeaseLost once the runner can no longer vouch for its leases. `cancelled` is set when the
    # action must stop (lease lost, step timeout, runner shutdown past its grace), just before the
    # step is cancelled: long steps may watch it to stop cleanly. `config` is the node's
    # `[packs.<pack>]` table decoded into the action's `Config`; `pack_config` is the raw table.


class Action:
    """Base class of every action. A step fails by raising; returning means it passed."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0"
    Args: ClassVar[type[msgspec.Struct]] = NoArgs
    # Tasks whose actions share a group never act on the same cluster at the same time.
    exclusion_groups: ClassVar[tuple[str, ...]] = ()
    # At most this many clusters run this action at once, fleet-wide (None: no such lease).
    global_limit: ClassVar[int | None] = None
    # Seconds each step (pre_check, execute_action, post_check) may take; past it the runner sets
    # `ctx.cancelled`, cancels the step and the attempt fails ("timed out"). None: no limit.
    timeout: ClassVar[float | None] = None
    # The schema of the node operator's `[packs.<pack>]` table. A node whose table does not
    # validate (or is missing while the schema has required fields) dead-letters the item unrun.
    Config: ClassVar[type[msgspec.Struct]] = AnyConfig

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        """Checks that need the node's config: raise InvalidTask when an argument names something
        (a service, a process, a path) that the node operator's `config` does not allow, or asks
        for more than it permits. Runs when the item arrives, before any lease or step."""

    async def pre_check(self, ctx: ActionContext) -> None:
        """Is it safe to act on this node of the cluster now? Raise if not."""

    async def execute_action(self, ctx: ActionContext) -> None:
        """Do the work."""
        raise NotImplementedError

    async def post_check(self, ctx: ActionContext) -> None:
        """Is the cluster healthy after the action? Raise if it is not."""


def pack_of(action: str) -> str:
    """`service` for `service:restart`."""
    return action.split(":", 1)[0]


def node_config(cls: type[Action], action: str, table: Mapping[str, Any] | None) -> msgspec.Struct:
    """The node operator's `[packs.<pack>]` table decoded into `cls.Config`; InvalidTask naming the
    table and the problem when it is missing or does not validate."""
    pack = pack_of(action)
    try:
        return msgspec.convert(dict(table or {}), cls.Config, strict=True)
    except msgspec.ValidationError as e:
        if table is None:
            problem = (
                f"this node has no [packs.{pack}] table in its runner config, and {action} needs one ({e})"
            )
        else:
            problem = f"the node's [packs.{pack}] settings are not valid for {action}: {e}"
        raise InvalidTask(problem, field=f"packs.{pack}") from e


class ActionRegistry:
    """The installed actions by name (only those of the enabled packs, when the node restricts them)."""

    def __init__(
        self, actions: Mapping[str, type[Action]], disabled: Mapping[str, type[Action]] | None = None
    ) -> None:
        self._actions = dict(actions)
        self._disabled = dict(disabled or {})

    def only(self, packs: Iterable[str] | None) -> ActionRegistry:
        """This registry restricted to the actions of `packs` (None: unrestricted)."""
        if packs is None:
            return self
        allowed = set(packs)
        every = {**self._actions, **self._disabled}
        return ActionRegistry(
            {n: c for n, c in every.items() if pack_of(n) in allowed},
            {n: c for n, c in every.items() if pack_of(n) not in allowed},
        )

    def packs(self) -> set[str]:
        """The packs of every installed action, enabled or not."""
        return {pack_of(n) for n in (*self._actions, *self._disabled)}

    def by_pack(self, pack: str) -> list[tuple[str, type[Action]]]:
        """The enabled actions of one pack, by name."""
        return [(name, cls) for name, cls in sorted(self._actions.items()) if pack_of(name) == pack]

    @classmethod
    def installed(cls) -> ActionRegistry:
        """Every action registered under the `taskerman.actions` entry point group; one that fails
        to load is logged and left out (its tasks then fail as unknown actions, with a reason)."""
        actions: dict[str, type[Action]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                actions[ep.name] = ep.load()
            except Exception as e:
                log.error("action %s (%s) failed to load: %r", ep.name, ep.value, e)
        return cls(actions)

    def names(self) -> list[str]:
        return sorted(self._actions)

    def get(self, name: str) -> type[Action]:
        """The enabled action `name` (KeyError when there is none)."""
        return self._actions[name]

    def resolve(self, task: Task) -> tuple[type[Action], msgspec.Struct]:
        """The action class and its validated arguments; InvalidTask naming the field otherwise."""
        cls = self._actions.get(task.action)
        if cls is None and task.action in self._disabled:
            raise UnknownAction(
                f"action {task.action!r} is installed but its pack {pack_of(task.action)!r} is not "
                "enabled on this node (enabled_packs in its runner config)",
                field="action",
            )
        if cls is None:
            known = ", ".join(self.names()) or "none"
            raise UnknownAction(f"unknown action {task.action!r} (installed: {known})", field="action")
        if task.version is not None:
            want, have = parse_version(task.version), parse_version(cls.version)
            if want[0] != have[0] or want[1] > have[1]:
                raise InvalidTask(
                    f"{task.action} {task.version} is not compatible with installed {cls.version}",
                    field="version",
                )
        try:
            args = msgspec.convert(task.action_args, cls.Args, strict=True)
        except msgspec.ValidationError as e:
            known = ", ".join(f.encode_name for f in msgspec.structs.fields(cls.Args)) or "none"
            hint = f" ({task.action} takes: {known}; `taskerman actions {task.action}`)"
            raise InvalidTask(f"{e}{hint}", field="taskerman_params.action_args") from e
        return cls, args

    def resolve_for_node(
        self, task: Task, packs: Mapping[str, Mapping[str, Any]]
    ) -> tuple[type[Action], msgspec.Struct, msgspec.Struct]:
        """`resolve`, then the node's pack settings validated against the action's Config and the
        arguments checked against them: (class, args, config), or InvalidTask with the reason."""
        cls, args = self.resolve(task)
        config = node_config(cls, task.action, packs.get(pack_of(task.action)))
        try:
            cls.check_args(args, config)
        except InvalidTask:
            raise
        except Exception as e:  # a broken check refuses the item; it must not take the runner down
            raise InvalidTask(f"{task.action} could not check its arguments: {e!r}") from e
        return cls, args, config
