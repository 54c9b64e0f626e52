"""`taskerman keys new|show|nats-config`: the nkey seeds that sign work items (the router's, an
admin's for `dlq replay`) and the public keys runners trust (`TASKERMAN_TRUSTED_ROUTER_KEYS`); the
seeds of the NATS users, one per role, and the server's `authorization` block that admits them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from taskcore.bus import permissions
from taskcore.cli.command import Subparsers
from taskcore.cli.common import EXIT_FAILED, EXIT_OK
from taskcore.core import signing
from taskcore.core.settings import Settings


class Keys:
    """Create a signing seed file, or show the public key of one."""

    name = "keys"

    def add_parser(self, subparsers: Subparsers) -> None:
        k = subparsers.add_parser(self.name, help="signing keys of work items: new, show")
        ksub = k.add_subparsers(dest="keys_cmd", required=True)
        new = ksub.add_parser("new", help="create a seed file (mode 0600) and print its public key")
        new.add_argument(
            "file", type=Path, help="where to write the new seed (mode 0600); its public key is printed"
        )
        show = ksub.add_parser("show", help="print the public key of a seed (or NATS creds) file")
        show.add_argument("file", type=Path, help="a seed file; prints its public key")
        conf = ksub.add_parser(
            "nats-config",
            help="print nats-server.conf's authorization block: each role's user and permissions",
        )
        conf.add_argument(
            "users",
            nargs="+",
            metavar="ROLE=FILE",
            help=f"a role ({', '.join(permissions.ROLES)}) and its seed file, or its public key",
        )

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        try:
            if args.keys_cmd == "nats-config":
                out = permissions.authorization(_users(args.users))
            elif args.keys_cmd == "new":
                out = signing.write_seed(args.file) + "\n"
            else:
                out = signing.public_key(signing.read_seed(args.file)) + "\n"
        except FileExistsError:
            print(f"taskerman keys new: {args.file} exists; not overwriting a key", file=sys.stderr)
            return EXIT_FAILED
        except (OSError, ValueError, signing.SigningConfigError) as e:
            print(f"taskerman keys {args.keys_cmd}: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(out, end="")  # outside the try: a closed pipe is not a bad key file
        return EXIT_OK


def _users(pairs: list[str]) -> dict[str, str]:
    """`role=FILE` or `role=U…` pairs as role → public key."""
    out = {}
    for pair in pairs:
        role, sep, where = pair.partition("=")
        if not sep or not where:
            raise ValueError(f"{pair!r}: give ROLE=FILE (a seed file) or ROLE=PUBLIC_KEY")
        if role in out:
            raise ValueError(f"role {role!r} given twice")
        if Path(where).exists():
            out[role] = signing.public_key(signing.read_seed(Path(where)))
        else:
            signing.parse_public_key(where)  # a clear error when it is neither
            out[role] = where
    return out
