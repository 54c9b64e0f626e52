"""Coordination through ZooKeeper: the session and the fencing semaphore, leases, per-cluster safety
state (budgets, breakers, counters), the runner registry, and the scheduler's control znodes."""

__all__ = ["clusters", "leases", "runners", "schedule_control", "session", "sweep"]
