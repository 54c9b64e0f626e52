"""`taskerman actions [NAME] [--json]`: the installed actions, with their arguments (name, type,
default), version, exclusion groups, global limit and step timeout, as the runners on this
machine's installation know them."""

from __future__ import annotations

import argparse
import sys
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from taskcore.cli.command import Subparsers
from taskcore.cli.common import EXIT_FAILED, EXIT_OK, JSON_HELP
from taskcore.core.actions import Action, ActionRegistry
from taskcore.core.settings import Settings


class ArgInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: str
    required: bool
    default: Any = None


class ActionInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: str
    summary: str
    args: list[ArgInfo]
    exclusion_groups: list[str]
    global_limit: int | None
    timeout_s: float | None


def type_name(t: Any) -> str:
    """A field's type as a person reads it: `float`, `list[str]`, `str | None`, `'a' | 'b'`."""
    origin, params = get_origin(t), get_args(t)
    if origin is Annotated:
        return type_name(params[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in params)
    if origin is Literal:
        return " | ".join(repr(a) for a in params)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in params)}]"
    return "None" if t is type(None) else str(getattr(t, "__name__", t))


def describe(name: str, cls: type[Action]) -> ActionInfo:
    args = []
    for f in msgspec.structs.fields(cls.Args):
        default = (
            None if f.required else f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
        )
        args.append(ArgInfo(name=f.encode_name, type=type_name(f.type), required=f.required, default=default))
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return ActionInfo(
        name=name,
        version=cls.version,
        summary=" ".join(doc.split()),
        args=args,
        exclusion_groups=list(cls.exclusion_groups),
        global_limit=cls.global_limit,
        timeout_s=cls.timeout,
    )


class Actions:
    """List the installed actions, or show one."""

    name = "actions"

    def add_parser(self, subparsers: Subparsers) -> None:
        p = subparsers.add_parser(self.name, help="installed actions: arguments, version, exclusion groups")
        p.add_argument("action", nargs="?", help="only this action (e.g. redis:restart)")
        p.add_argument("--json", action="store_true", help=JSON_HELP)

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        registry = ActionRegistry.installed()
        names = registry.names()
        if args.action and args.action not in names:
            known = ", ".join(names)
            print(
                f"taskerman actions: no action {args.action!r} is installed here; installed: {known}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        infos = [describe(n, registry.get(n)) for n in ([args.action] if args.action else names)]
        if args.json:
            print(msgspec.json.encode(infos).decode())
            return EXIT_OK
        for info in infos:
            extra = [f"version {info.version}"]
            if info.exclusion_groups:
                extra.append(f"exclusion groups {', '.join(info.exclusion_groups)}")
            if info.global_limit:
                extra.append(f"at most {info.global_limit} cluster(s) at once")
            if info.timeout_s:
                extra.append(f"step timeout {info.timeout_s:g}s")
            print(f"{info.name}  ({'; '.join(extra)})")
            if info.summary:
                print(f"  {info.summary}")
            for a in info.args:
                default = "required" if a.required else f"default {msgspec.json.encode(a.default).decode()}"
                print(f"  --arg {a.name}=<{a.type}>  {default}")
        return EXIT_OK
