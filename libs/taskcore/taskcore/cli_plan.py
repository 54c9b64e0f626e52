"""Sub-commands of `taskerman` (registered by cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from taskcore.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
COMMANDS: dict[str, Command] = {}


def add_parsers(sub: Any) -> None:
    """Add this module's sub-commands to the `taskerman` parser."""
