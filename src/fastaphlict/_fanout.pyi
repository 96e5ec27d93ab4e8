"""Typed face of the compiled fan-out module (kept by hand; a test checks it)."""

from collections.abc import Iterable
from typing import Any, Final

from picows import WSTransport

__all__ = ["COMPILED", "Channel", "Subscriber", "build_frame"]

COMPILED: Final[bool]

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
    def listens_to_any(self, phids: frozenset[str]) -> bool:
        """Whether any of ``phids`` is one of this socket's subscriptions."""
    def send(self, frame: bytes) -> bool:
        """Write a prebuilt frame; False if the socket is closing."""

class Channel:
    """The PHID index of one instance."""

    @property
    def size(self) -> int: ...
    @property
    def phid_count(self) -> int: ...
    def attach(self, transport: WSTransport) -> Subscriber: ...
    def detach(self, sub: Subscriber) -> None: ...
    def subscribe(self, sub: Subscriber, phids: Iterable[Any]) -> None: ...
    def unsubscribe(self, sub: Subscriber, phids: Iterable[Any]) -> None: ...
    def match(self, subscribers: Any) -> list[Subscriber]: ...
    def publish(self, subscribers: Any, frame: bytes) -> int: ...
    def subscribers(self) -> list[Subscriber]: ...
