"""`taskerman dev up|down|status`: the local stack, registered under `taskerman.cli` by this
distribution, so the command exists only where the development tooling is installed.

Its settings hook points every other command at a running stack's servers while
`TASKERMAN_NATS_URL` / `TASKERMAN_ZK_HOSTS` are unset (`devstack.with_stack_servers`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from taskcore.cli.command import Subparsers
from taskcore.cli.common import JSON_HELP
from taskcore.core.settings import Settings

# unset: the running `dev up` stack's servers (and its admin seed, with which `dlq replay` signs)
SERVER_VARS = ("TASKERMAN_NATS_URL", "TASKERMAN_ZK_HOSTS", "TASKERMAN_ADMIN_SEED_FILE")


class Dev:
    """Start, stop or show the local stack."""

    name = "dev"

    def add_parser(self, subparsers: Subparsers) -> None:
        dev = subparsers.add_parser(self.name, help="the local stack")
        devsub = dev.add_subparsers(dest="dev_cmd", required=True)
        dup = devsub.add_parser("up")
        dup.add_argument(
            "--runners", type=int, default=4, help="runner processes of the demo clusters (default 4)"
        )
        dup.add_argument(
            "--cluster-mode",
            action="store_true",
            help="3 clustered nats-servers and a 3-server ZooKeeper ensemble, streams at 3 replicas",
        )
        devsub.add_parser("down")
        devsub.add_parser("status").add_argument("--json", action="store_true", help=JSON_HELP)

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        from taskerman_dev import devstack  # noqa: PLC0415 - only the dev commands need the launchers

        if args.dev_cmd == "up":
            return devstack.up(settings, runners=args.runners, cluster_mode=args.cluster_mode)
        if args.dev_cmd == "down":
            return devstack.down(settings)
        return devstack.status(settings, as_json=args.json)

    def adjust_settings(self, settings: Settings, env: Mapping[str, str]) -> Settings:
        """The running stack's servers (and admin seed) wherever the environment names none."""
        if all(var in env for var in SERVER_VARS):
            return settings
        from taskerman_dev import devstack  # noqa: PLC0415 - only without the variables

        return devstack.with_stack_servers(settings, env)
