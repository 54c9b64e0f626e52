"""What a `taskerman` sub-command is: a small object registered under the entry point group
`taskerman.cli`, with its own parser setup and one `run`. The top-level parser (`cli.main`) only
collects them, so a distribution adds commands by registering its own (taskerman-dev adds `dev`)."""

from __future__ import annotations

import argparse
import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol, TypeAlias, runtime_checkable

from taskcore.core.settings import Settings

ENTRY_POINT_GROUP = "taskerman.cli"

# argparse has no public name for it, and its class is subscriptable only for the type checker
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Command(Protocol):
    """One `taskerman NAME ...` sub-command."""

    name: str

    def add_parser(self, subparsers: Subparsers) -> None:
        """Add the `NAME` parser (and its own sub-commands) to the `taskerman` parser."""

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        """Do it; the exit code (`common.EXIT_*`)."""


@runtime_checkable
class SettingsHook(Protocol):
    """A command that also adjusts the settings every *other* command runs with (the dev stack
    points them at its servers); optional, the top-level parser looks for it."""

    def adjust_settings(self, settings: Settings, env: Mapping[str, str]) -> Settings:
        """The settings to run with, given the process environment."""


class ServerCommand(ABC):
    """A command that talks to the servers: `exec` is a coroutine, `run` gives it an event loop."""

    name: str

    @abstractmethod
    def add_parser(self, subparsers: Subparsers) -> None:
        """Add the command's parser."""

    @abstractmethod
    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        """Do it; the exit code."""

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        return asyncio.run(self.exec(args, settings))
