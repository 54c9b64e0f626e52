"""`taskerman dev status`: every recorded process, its pid and whether it runs; with `--json` also
where the servers listen and each NATS role's credentials, for another client to connect as one
(`nats --creds` takes the seed file as it is)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from taskcore.bus import permissions
from taskcore.core.settings import Settings
from taskerman_dev import secrets
from taskerman_dev.devstack.record import (
    CLUSTER_SIZE,
    absolute,
    current_pid,
    display_name,
    is_alive,
    load_stack,
)


def status(settings: Settings, as_json: bool) -> int:
    """Every recorded process with its pid and whether it runs; 0 when all run, 1 otherwise."""
    settings = absolute(settings)
    stack = load_stack(settings)
    procs = stack.processes if stack is not None else []
    rows: list[dict[str, object]] = [
        {
            "name": p.name,
            "pid": current_pid(p),
            "alive": is_alive(p),
            "cluster": p.cluster,
            "node": p.node,
            "member": p.member,
        }
        for p in procs
    ]
    if as_json:
        folder = (settings.home / secrets.SECRETS_DIR).absolute()
        report = {
            "nats_url": stack.nats_url if stack else settings.nats_url,
            "zk_hosts": stack.zk_hosts if stack else settings.zk_hosts,
            "credentials": {
                role: str(folder / secrets.nats_seed_name(role))
                for role in permissions.ROLES
                if (folder / secrets.nats_seed_name(role)).is_file()
            },
            "processes": rows,
        }
        print(json.dumps(report, indent=2))
    elif stack is not None and rows:
        mode = f" (cluster mode, streams at {CLUSTER_SIZE} replicas)" if stack.cluster_mode else ""
        print(f"NATS {stack.nats_url}  ZooKeeper {stack.zk_hosts}{mode}")
        _print_table(rows)
    else:
        print(f"no stack recorded under {settings.home}")
    return 0 if rows and all(r["alive"] for r in rows) else 1


def _print_table(rows: Sequence[dict[str, object]]) -> None:
    """The rows as an aligned table."""
    print(f"{'NAME':<13} {'PID':>8}  {'ALIVE':<5}  {'CLUSTER':<10} NODE")
    for r in rows:
        alive = "yes" if r["alive"] else "no"
        name = display_name(r["name"], r["member"])
        print(f"{name:<13} {r['pid']!s:>8}  {alive:<5}  {r['cluster'] or '-'!s:<10} {r['node'] or '-'}")
