"""`--help` explains every argument of every command, and the everyday ones show examples."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from taskcore.cli.main import build_parser


def commands(
    p: argparse.ArgumentParser, path: str = "taskerman"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def test_every_argument_of_every_command_says_what_it_is() -> None:
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, p in commands(build_parser())
        for a in p._actions
        if not a.help and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    assert missing == []


@pytest.mark.parametrize("path", ["taskerman submit", "taskerman status", "taskerman cluster window"])
def test_everyday_commands_end_their_help_with_examples(path: str) -> None:
    found = dict(commands(build_parser()))[path]
    help_text = found.format_help()
    assert "examples:\n  taskerman " in help_text
