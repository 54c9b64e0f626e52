"""Reviewed action packs, one module per pack, each registered by entry point (`taskerman.actions`):
`service` (restart, reload, stop-start a service the node config names), `chaos` (kill or pause a
process the node config names), and the datastore packs. `common` holds what they share: health
probes, allowed commands with timeouts, typed node settings.

Importing this package imports no pack: the runner loads each action through its entry point."""
