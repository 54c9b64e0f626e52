"""What every service process shares at run time: logging, uvloop and staged shutdown."""

__all__ = ["lifecycle"]
