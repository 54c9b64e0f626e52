"""The action API: reviewed classes with pre_check, execute_action and post_check, found by entry point.

The queue can only choose among installed actions and pass arguments that validate against the
action's schema: it can never make a node run an arbitrary command."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import msgspec

from taskcore.errors import InvalidTask, UnknownAction
from taskcore.model import Task, parse_version

ENTRY_POINT_GROUP = "taskerman.actions"
log = logging.getLogger(__name__)


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    """The arguments of an action that takes none."""


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

    # `token` is the fencing token of the task's slot (the slot znode's czxid: it only grows);
    # `tokens` has one per lease held. Call `checkpoint()` before each side effect: it raises
    # LeaseLost once the runner can no longer vouch for its leases; `cancelled` is set then too.


class Action:
    """Base class of every action. A step fails by raising; returning means it passed."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0"
    Args: ClassVar[type[msgspec.Struct]] = NoArgs
    # Tasks whose actions share a group never act on the same cluster at the same time.
    exclusion_groups: ClassVar[tuple[str, ...]] = ()
    # At most this many clusters run this action at once, fleet-wide (None: no such lease).
    global_limit: ClassVar[int | None] = None

    async def pre_check(self, ctx: ActionContext) -> None:
        """Is it safe to act on this node of the cluster now? Raise if not."""

    async def execute_action(self, ctx: ActionContext) -> None:
        """Do the work."""
        raise NotImplementedError

    async def post_check(self, ctx: ActionContext) -> None:
        """Is the cluster healthy after the action? Raise if it is not."""


class ActionRegistry:
    """The installed actions by name."""

    def __init__(self, actions: Mapping[str, type[Action]]) -> None:
        self._actions = dict(actions)

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

    def resolve(self, task: Task) -> tuple[type[Action], msgspec.Struct]:
        """The action class and its validated arguments; InvalidTask naming the field otherwise."""
        cls = self._actions.get(task.action)
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
            raise InvalidTask(str(e), field="taskerman_params.action_args") from e
        return cls, args
