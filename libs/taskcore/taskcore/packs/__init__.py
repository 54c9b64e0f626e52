"""Reviewed action packs, each registered by entry point (`taskerman.actions`): `service` (restart,
reload, stop-start a service the node config names), `chaos` (kill or pause a process the node
config names), `taskerman:ping` (canary), and the datastore packs: cassandra, elasticsearch,
postgres, and redis (redis_restart and redis_backup, sharing redis_client). `common` holds what
every pack shares: health probes, allowed commands with timeouts, typed node settings; `backups`
what the backup actions share. How to write a pack of your own: taskcore.plugins.

Importing this package imports no pack: the runner loads each action through its entry point."""

__all__ = [
    "backups",
    "canary",
    "cassandra",
    "chaos",
    "common",
    "elasticsearch",
    "postgres",
    "redis_backup",
    "redis_client",
    "redis_restart",
    "service",
]
