"""Start real nats-server and ZooKeeper processes for tests, `taskerman dev` and chaos runs.

`ports` finds free ports; `process` is one server process (start, readiness, stop, kill, pause);
`group` is servers started together; `nats` and `zookeeper` are the two servers, alone or clustered."""

from taskerman_dev.launchers.nats import NatsCluster, NatsClusterMember, NatsServer, nats_server_binary
from taskerman_dev.launchers.ports import free_port, free_ports, port_open
from taskerman_dev.launchers.zookeeper import ZooKeeperEnsemble, ZooKeeperEnsembleMember, ZooKeeperServer

__all__ = [
    "NatsCluster",
    "NatsClusterMember",
    "NatsServer",
    "ZooKeeperEnsemble",
    "ZooKeeperEnsembleMember",
    "ZooKeeperServer",
    "free_port",
    "free_ports",
    "nats_server_binary",
    "port_open",
]
