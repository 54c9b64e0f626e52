"""The local stack behind `taskerman dev up|down|status`: servers, services and a demo fleet under one home.

Every process started is recorded in `$TASKERMAN_HOME/stack.json` (name, pid, command, and for runners
and demo services their cluster and node), so that `down` stops exactly what `up` started and a chaos
tool can find every pid.

`up --cluster-mode` runs the multi-node topology of compose/ on loopback instead of one server of each:
three clustered nats-servers and a three-server ZooKeeper ensemble (each member recorded as its own
`nats-server` / `zookeeper` process with its `member` index), every stream at 3 replicas. The record
keeps the servers' URLs, so the CLI finds them while `TASKERMAN_NATS_URL` / `TASKERMAN_ZK_HOSTS` are
unset (`with_stack_servers`).

`record` is the stack file and the liveness of what it names; `addresses` where the servers listen;
`starting` is `up`, `stopping` is `down`, `report` is `status`."""

from taskerman_dev.devstack.record import (
    CLUSTER,
    Stack,
    StackError,
    StackProcess,
    is_alive,
    is_running,
    load_stack,
    with_stack_servers,
)
from taskerman_dev.devstack.report import status
from taskerman_dev.devstack.starting import up
from taskerman_dev.devstack.stopping import down

__all__ = [
    "CLUSTER",
    "Stack",
    "StackError",
    "StackProcess",
    "down",
    "is_alive",
    "is_running",
    "load_stack",
    "status",
    "up",
    "with_stack_servers",
]
