"""The core every component shares: the task model and its wire codec, the error tree, NATS subject
names, settings, and the action API (the plugin API for pack authors is taskcore.plugins)."""

__all__ = ["actions", "errors", "model", "settings", "subjects"]
