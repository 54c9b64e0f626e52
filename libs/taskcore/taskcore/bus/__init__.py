"""The JetStream bus: connecting and provisioning, task status tracking in KV, submitting tasks, the
dead-letter queue and the audit trail."""

__all__ = ["audit", "deadletter", "jetstream", "submission", "tracking"]
