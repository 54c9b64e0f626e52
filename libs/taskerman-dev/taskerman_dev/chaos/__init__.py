"""`make chaos`: a nemesis against real processes and an independent checker (see run.py)."""

__all__ = ["checker", "fleet", "nemesis", "run", "workload"]
