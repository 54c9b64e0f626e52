"""The `taskerman` command: a parser that collects every command registered under the entry point
group `taskerman.cli` (see `command.Command`), and the dispatch to the one given."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points

from aiozk import exc as zk_exc

from taskcore.cli.command import ENTRY_POINT_GROUP, Command, SettingsHook
from taskcore.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from taskcore.coord.acl import AUTH_ENV
from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings
from taskcore.obs import tracing

log = logging.getLogger(__name__)


def installed() -> list[Command]:
    """Every registered command, by name; one that fails to load is logged and left out (the others
    still work)."""
    found: list[Command] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append(ep.load()())
        except Exception as e:
            log.error("command %s (%s) failed to load: %r", ep.name, ep.value, e)
    return sorted(found, key=lambda c: c.name)


def build_parser(commands: Iterable[Command] | None = None) -> argparse.ArgumentParser:
    """The `taskerman` parser with a sub-command per command (by default: the installed ones); each
    parsed namespace carries the command that parsed it as `command`."""
    p = argparse.ArgumentParser(
        prog="taskerman", description="Safe rolling maintenance for datastore fleets."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for command in installed() if commands is None else commands:
        command.add_parser(sub)
        sub.choices[command.name].set_defaults(command=command)
    return p


def settings_for(command: Command, commands: Iterable[Command]) -> Settings:
    """The settings from the environment, adjusted by the settings hooks of the other commands."""
    settings = Settings.from_env()
    for other in commands:
        if other is not command and isinstance(other, SettingsHook):
            settings = other.adjust_settings(settings, os.environ)
    return settings


def main(argv: list[str] | None = None) -> int:
    commands = installed()
    args = build_parser(commands).parse_args(argv)
    command: Command = args.command
    settings = settings_for(command, commands)
    # aiozk logs every failed connection try with a traceback; the command says what failed itself
    logging.getLogger("aiozk").setLevel(logging.CRITICAL)
    tracing.setup("taskerman-cli", settings.home)
    try:
        return command.run(args, settings)
    except TaskermanError as e:
        print(f"taskerman: {e}", file=sys.stderr)
        return EXIT_FAILED
    except zk_exc.NoAuth:
        print(
            f"taskerman: ZooKeeper refused it: this identity ({settings.zk_auth or 'anonymous'}) may only "
            f"read there; budgets, windows, freezes and breaker resets take the admin's (set {AUTH_ENV})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `taskerman events X | head`: the reader has what it wanted
        _quiet_stdout()
        return EXIT_OK
    finally:
        tracing.shutdown()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into the closed pipe does
    not print a traceback of its own."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
