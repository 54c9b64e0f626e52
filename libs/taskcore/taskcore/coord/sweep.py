"""The garbage collector of lease folders. A fair semaphore's waiters and holders are ephemeral and
go with their session, but its folders are plain znodes (`coord/semaphore.py`): when the last
holder dies without releasing, nobody is left to delete them, and one folder per task would pile
up for ever. `sweep` finds every semaphore folder the recipes create and deletes those nobody waits
in or holds (an expired down marker holds nothing and is deleted first), with the semaphore's own
all-or-nothing `clean_up` (a newcomer racing it recreates them, as after any clean-up). Reads
first: a folder in use costs two reads, never a write."""

from __future__ import annotations

import logging
import time

from taskcore.coord.fleet import CLUSTERS_ROOT, children
from taskcore.coord.leases import TASK_LEASES_ROOT
from taskcore.coord.runners import NODE_LOCKS_ROOT
from taskcore.coord.semaphore import FairSemaphore, expired
from taskcore.coord.session import ZkSession

log = logging.getLogger(__name__)
GLOBAL_ROOT = "/global"


async def semaphore_folders(zk: ZkSession) -> list[str]:
    """Every semaphore folder: tasks' slots and topology leases, cluster budgets and exclusion
    groups, global action leases, cron runs' node locks (the layout in docs/architecture.md)."""
    found = [f"{TASK_LEASES_ROOT}/{t}" for t in await children(zk, TASK_LEASES_ROOT)]
    found += [f"{GLOBAL_ROOT}/{a}" for a in await children(zk, GLOBAL_ROOT)]
    for cluster in await children(zk, NODE_LOCKS_ROOT):
        found += [
            f"{NODE_LOCKS_ROOT}/{cluster}/{n}" for n in await children(zk, f"{NODE_LOCKS_ROOT}/{cluster}")
        ]
    for cluster in await children(zk, CLUSTERS_ROOT):
        root = f"{CLUSTERS_ROOT}/{cluster}"
        if "budget" in await children(zk, root):
            found.append(f"{root}/budget")
        found += [f"{root}/exclusion/{g}" for g in await children(zk, f"{root}/exclusion")]
    return found


async def sweep(zk: ZkSession) -> int:
    """Delete the semaphore folders nobody waits in or holds; how many were deleted."""
    deleted = 0
    for path in await semaphore_folders(zk):
        sem = FairSemaphore(zk, path, 1)
        holders = await children(zk, sem.holders_path)
        now = time.time()
        if stale := [n for n in holders if expired(n, now)]:  # down markers nobody cleared
            await sem.drop_expired(stale)
        if await children(zk, sem.queue) or len(holders) > len(stale):
            continue
        await sem.clean_up()
        if not await zk.client.exists(path):
            deleted += 1
    if deleted:
        log.info("swept %d abandoned lease folder(s)", deleted)
    return deleted
