"""`taskerman plan`: ask a router (`taskerman.api.plan`) which nodes a task would reach, in which
order and waves, under which leases, without running anything (`submit --dry-run` does the same)."""

from __future__ import annotations

import argparse

from taskcore.cli import common
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.core.settings import Settings


class Plan(ServerCommand):
    """Preview a task."""

    name = "plan"

    def add_parser(self, subparsers: Subparsers) -> None:
        p = subparsers.add_parser(
            self.name, help="preview a task's nodes, order, waves and leases; runs nothing"
        )
        common.add_task_options(p)
        p.add_argument("--json", action="store_true", help=common.JSON_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        return await common.preview(args, settings)
