"""The chaos run's workload, drawn from a seed: overlapping tasks on two clusters with budgets,
exclusion groups (`test:backup` and `test:repair` share `io`), limits of 1 to 3, and failures —
nodes that fail their first attempt and recover on a retry, and nodes that always fail and end as
dead letters."""

from __future__ import annotations

import random
from typing import Any

import msgspec

from taskerman_dev.chaos.checker import Submitted

CLUSTERS = {"chaos-a": 3, "chaos-b": 2}  # cluster → its disruption budget
NODES_PER_CLUSTER = 6
GROUPS = {"test:backup": ("io",), "test:repair": ("io",), "test:sleep": ()}


def nodes_of(cluster: str) -> list[str]:
    return [f"{cluster}-n{i}" for i in range(1, NODES_PER_CLUSTER + 1)]


class Workload:
    """Task after task, each a JSON task for `tasks.global` and what the checker needs of it."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0

    def next(self) -> tuple[bytes, Submitted]:
        rng = self.rng
        self.count += 1
        cluster = rng.choice(sorted(CLUSTERS))
        action = rng.choices(sorted(GROUPS), weights=[1, 1, 4])[0]  # backup, repair, sleep
        nodes = rng.sample(nodes_of(cluster), rng.randint(2, NODES_PER_CLUSTER))
        limit = rng.randint(1, 3)
        args: dict[str, Any] = {"seconds": round(rng.uniform(0.2, 1.2), 2)}
        roll = rng.random()
        if roll < 0.25:  # one node fails its first attempt, then recovers
            args |= {"fail_nodes": [rng.choice(nodes)], "fail_attempts": 1}
        elif roll < 0.32:  # one node always fails: a dead letter after its retries
            args |= {"fail_nodes": [rng.choice(nodes)]}
        task_id = f"chaos-{self.count:05d}"
        task = {
            "task_id": task_id,
            "action": action,
            "cluster_name": cluster,
            "nodes": nodes,
            "limit": limit,
            "taskerman_params": {
                "action_args": args,
                "workqueue_args": {"retry_count": 2, "backoff": 0.5, "backoff_max": 2},
                "max_failures": NODES_PER_CLUSTER,  # a dead node does not stop the rest
            },
        }
        return msgspec.json.encode(task), Submitted(
            task_id=task_id, cluster=cluster, nodes=tuple(nodes), limit=limit, groups=GROUPS[action]
        )
