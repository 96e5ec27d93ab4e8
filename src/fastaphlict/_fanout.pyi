"""Typed face of the compiled fan-out: what _fanout re-exports (kept by hand; a test checks it)."""

from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

from picows import WSTransport

__all__ = [
    "COMPILED",
    "PICOWS_VERSION",
    "Channel",
    "Outbox",
    "Subscriber",
    "build_frame",
    "check_picows_version",
]

COMPILED: Final[bool]
#: The picows version this module was compiled against.
PICOWS_VERSION: Final[str]

def check_picows_version(installed: str, built: str = ...) -> None:
    """Raise ImportError unless ``installed`` is the picows compiled against."""

def build_frame(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked WebSocket text frame."""

class Subscriber:
    """One open client socket as the index sees it."""

    @property
    def transport(self) -> WSTransport: ...
    @property
    def channel(self) -> Channel: ...
    @property
    def phids(self) -> frozenset[str]: ...
    @property
    def attached(self) -> bool: ...
    @property
    def replaying(self) -> bool: ...
    heard: bool
    slow: bool
    def subscriptions(self) -> Collection[str]:
        """The socket's PHIDs, as held: read it, never change it."""
    def send(self, frame: bytes) -> bool:
        """Write a prebuilt frame (behind a paced replay); False if the socket is closing."""
    def wrote_around(self) -> None:
        """picows wrote to the socket itself (a pong): its transport may hold bytes now."""
    def replay(self, frames: list[bytes]) -> int:
        """Send history frames in order, paced by the socket's drain; return how many."""
    def pause(self) -> bool:
        """The transport is full: True if a replay now waits, False if the socket is slow."""
    def resume(self) -> None:
        """The transport drained: continue a paced replay."""

class Outbox:
    """Frames published in this event-loop iteration, written when it ends."""

    def __init__(self, max_buffered: int = ..., max_backlog: int = ...) -> None: ...
    @property
    def pending(self) -> int: ...
    @property
    def coalesced(self) -> int: ...
    bytes_sent: int
    max_buffered: int
    max_backlog: int
    on_overflow: Callable[[Subscriber], None] | None
    def flush(self) -> None:
        """Write every pending frame: one write per socket."""

class Channel:
    """The PHID index of one instance."""

    def __init__(
        self,
        outbox: Outbox | None = None,
        max_subscriptions: int = 4096,
        max_phid_length: int = 512,
    ) -> None: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def size(self) -> int: ...
    @property
    def phid_count(self) -> int: ...
    def attach(self, transport: WSTransport) -> Subscriber: ...
    def detach(self, sub: Subscriber) -> None: ...
    def subscribe(self, sub: Subscriber, phids: Iterable[Any]) -> bool: ...
    def unsubscribe(self, sub: Subscriber, phids: Iterable[Any]) -> None: ...
    def match(self, subscribers: Any) -> list[Subscriber]: ...
    def publish(self, subscribers: Any, frame: bytes) -> int: ...
    def subscribers(self) -> list[Subscriber]: ...
    def sweep(self, ping_frame: bytes, subscribers: Iterable[Subscriber] | None = None) -> int: ...
