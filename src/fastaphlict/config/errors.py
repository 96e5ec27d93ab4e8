"""The errors of configuration: every message is for the operator, and names where to fix it."""

from __future__ import annotations

__all__ = ["ConfigError", "LimitError"]


class ConfigError(Exception):
    """A configuration problem; the message is user-facing, names index and key."""


class LimitError(ConfigError):
    """A limit out of range; the CLI names the flag or variable it came from."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"{name} = {value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason
