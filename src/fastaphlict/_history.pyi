"""Typed face of the compiled history module (kept by hand; a test checks it)."""

from collections.abc import Iterable
from typing import Any, Final

__all__ = ["COMPILED", "History"]

COMPILED: Final[bool]

class History:
    """At most ``limit`` entries, none older than ``ttl_ms``, indexed by PHID."""

    def __init__(self, limit: int = 4096, ttl_ms: float = 60000.0) -> None: ...
    def __len__(self) -> int: ...
    @property
    def limit(self) -> int: ...
    @property
    def ttl_ms(self) -> float: ...
    @property
    def phid_count(self) -> int: ...
    def oldest(self) -> float | None: ...
    def newest(self) -> float | None: ...
    def add(self, at: float, subscribers: Any, frame: bytes) -> None:
        """Store a message; entries past the window or the limit leave first."""
    def purge(self, now: float) -> int:
        """Drop entries older than the retention window; return how many left."""
    def live(self, now: float) -> tuple[int, float | None]:
        """``(size, oldest)`` of the entries inside the window at ``now``, dropping none."""
    def entries(self) -> list[tuple[float, Any, bytes]]:
        """Every entry as ``(at, subscribers, frame)``, oldest first: what a restart keeps."""
    def clear(self) -> None: ...
    def since(self, now: float, age_ms: float) -> list[bytes]:
        """Frames of every entry inside the window, oldest first."""
    def select(self, phids: Iterable[str], now: float, age_ms: float) -> list[bytes]:
        """Frames of the window's entries naming any of ``phids``, oldest first, each once."""
