"""`taskerman dlq list|show|replay|purge`: the dead-letter queue."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import msgspec
from nats.js import JetStreamContext

from taskcore.bus import audit, deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.cli import common
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from taskcore.core import signing
from taskcore.core.settings import Settings
from taskcore.core.signing import Signer, SigningConfigError


class DeadLetters(ServerCommand):
    """List, show, replay or purge dead letters."""

    name = "dlq"

    def add_parser(self, subparsers: Subparsers) -> None:
        d = subparsers.add_parser(self.name, help="the dead-letter queue")
        dsub = d.add_subparsers(dest="dlq_cmd", required=True)
        dl = dsub.add_parser("list")
        dl.add_argument("--json", action="store_true", help=common.JSON_HELP)
        dsub.add_parser("show", help="one dead letter by its ID, or every one of a task").add_argument(
            "id", help="the letter's ID (dlq list), or a task id"
        )
        dr = dsub.add_parser("replay")
        dr.add_argument("id", type=int, nargs="?", help="the letter's id, from `dlq list`")
        dr.add_argument("--all", action="store_true", help="every letter in the queue")
        dr.add_argument(
            "--force",
            action="store_true",
            help="also replay work items a runner refused for their signature (they may be forged)",
        )
        dsub.add_parser("purge", help="remove every dead letter (admin)").add_argument(
            "--yes", action="store_true", help="do not ask first"
        )

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, js, status = await common.connect_jetstream(settings)
        try:
            if args.dlq_cmd == "list":
                return await _list(args, js)
            if args.dlq_cmd == "show":
                return await _show(args, js)
            if args.dlq_cmd == "replay":
                return await _replay(args, js, status, settings)
            return await _purge(args, js)
        finally:
            await bus.close(nc)


async def _list(args: argparse.Namespace, js: JetStreamContext) -> int:
    rows = [
        {
            "id": seq,
            "task_id": d.task_id,
            "cluster": d.cluster,
            "node": d.node,
            "reason": d.reason,
            "deliveries": d.deliveries,
            "attempts": d.attempts,
            "trace_id": d.trace_id,
            "dead_at": d.dead_at,
        }
        for seq, d in await deadletter.entries(js)
    ]
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        if rows:
            print(f"{'ID':>6}  {'TASK':<20} {'NODE':<16} {'TRIES':<5}  REASON")
        for r in rows:
            node, tries = r["node"] or "-", r["attempts"] or r["deliveries"]
            print(f"{r['id']:>6}  {r['task_id']:<20} {node:<16} x{tries:<4}  {r['reason']}")
        print(f"{len(rows)} dead letter(s)")
    return EXIT_OK


async def _show(args: argparse.Namespace, js: JetStreamContext) -> int:
    """A letter by its id, or every letter of a task; the payload shown as the JSON it carries."""
    if args.id.isdigit():
        letter = await deadletter.get(js, int(args.id))
        found = [(int(args.id), letter)] if letter is not None else []
    else:
        found = [(seq, d) for seq, d in await deadletter.entries(js) if d.task_id == args.id]
    if not found:
        print(
            f"taskerman dlq show: no dead letter {args.id!r} (an ID from `dlq list`, or a task id)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    for seq, letter in found:
        shown = msgspec.to_builtins(letter)
        with contextlib.suppress(msgspec.DecodeError):  # the JSON it carries; other payloads stay text
            shown["payload"] = msgspec.json.decode(letter.payload)
        print(msgspec.json.format(msgspec.json.encode({"id": seq, **shown})).decode())
    return EXIT_OK


class _ReplaySigner:
    """The admin's signer, loaded when the first work item is replayed (a task letter needs none)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: tuple[Signer | None] | None = None

    def get(self) -> Signer | None:
        if self._loaded is None:
            self._loaded = (signing.signer_for(self.settings, admin=True),)
        return self._loaded[0]


async def _replay(
    args: argparse.Namespace, js: JetStreamContext, status: StatusStore, settings: Settings
) -> int:
    """Replay dead letters. A work item is republished on its node's subject signed with the admin's
    key (`TASKERMAN_ADMIN_SEED_FILE`, which the runners must trust): the router's signature covered
    the item's first message id, and the operator, not the router, sends it again."""
    ids = [seq for seq, _ in await deadletter.entries(js)] if args.all else [args.id]
    if not args.all and args.id is None:
        print("taskerman dlq replay: give an ID or --all", file=sys.stderr)
        return EXIT_INVALID
    signer = _ReplaySigner(settings)
    failed = 0
    for seq in ids:
        try:
            found = await deadletter.get(js, seq)
            key = signer.get() if found is not None and deadletter.is_work_item(found) else None
            letter = await deadletter.replay(js, status, seq, key, force=args.force)
        except (deadletter.TruncatedPayload, deadletter.UnverifiedLetter, SigningConfigError) as e:
            print(f"taskerman dlq replay: {e}", file=sys.stderr)
            failed += 1
            continue
        if letter is None:
            print(f"no dead letter {seq}", file=sys.stderr)
            failed += 1
        else:
            await audit.Audit(js, common.user()).record(
                "replayed",
                task_id=letter.task_id,
                cluster=letter.cluster,
                node=letter.node,
                detail=f"dead letter {seq} ({letter.reason})",
            )
            print(f"replayed {seq} (task {letter.task_id}, node {letter.node or '-'})")
    return EXIT_FAILED if failed else EXIT_OK


async def _purge(args: argparse.Namespace, js: JetStreamContext) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("taskerman dlq purge: refusing without --yes (no terminal to confirm on)", file=sys.stderr)
            return EXIT_INVALID
        count = len(await deadletter.entries(js))
        answer = await asyncio.to_thread(input, f"Remove all {count} dead letter(s)? [y/N] ")
        if answer.strip().lower() != "y":
            print("nothing removed")
            return EXIT_OK
    print(f"purged {await deadletter.purge(js)} dead letter(s)")
    return EXIT_OK
