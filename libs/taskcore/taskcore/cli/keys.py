"""`taskerman keys new|show`: the nkey seeds that sign work items (the router's, an admin's for
`dlq replay`) and the public keys runners trust (`TASKERMAN_TRUSTED_ROUTER_KEYS`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        new.add_argument("file", type=Path)
        show = ksub.add_parser("show", help="print the public key of a seed (or NATS creds) file")
        show.add_argument("file", type=Path)

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        try:
            if args.keys_cmd == "new":
                key = signing.write_seed(args.file)
            else:
                key = signing.public_key(signing.read_seed(args.file))
        except FileExistsError:
            print(f"taskerman keys new: {args.file} exists; not overwriting a key", file=sys.stderr)
            return EXIT_FAILED
        except (OSError, signing.SigningConfigError) as e:
            print(f"taskerman keys {args.keys_cmd}: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(key)
        return EXIT_OK
