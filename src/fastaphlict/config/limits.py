"""Limits: the tunables Aphlict's file has no key for, each declared once with its metadata."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, fields
from typing import Any

from fastaphlict.config.errors import LimitError

__all__ = ["Limits"]

#: A limit's minimum meaning "any value above zero will do".
_POSITIVE = -1.0


def _limit(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    why: str = "",
    shown: str = "",
    past: str = "",
) -> Any:
    """One limit, declared once: its default, and what ``--help``, the checks and
    the flag table of ``docs/settings.md`` say of it.

    ``minimum`` and ``why`` are the smallest workable value and what a smaller
    one would do; ``shown`` and ``past`` (the default as an operator reads it,
    and what happens past the limit) put it in that table.
    """
    return field(
        default=default,
        metadata={"help": help, "minimum": minimum, "why": why, "shown": shown, "past": past},
    )


@dataclass(frozen=True)
class Limits:
    """Tunables Aphlict's file has no key for: set by CLI flags or FASTAPHLICT_* variables.

    Every limit has a default safe for a public client port; each one that
    refuses something says so with a close code or an HTTP status. Each is
    declared once, here: :data:`~fastaphlict.config.options.OPTIONS` makes
    one option of each field (its flag, variable, ``--help`` and row of the
    table of ``docs/settings.md``).
    """

    max_frame_size: int = _limit(
        64 * 1024,
        "largest client frame or message in bytes; bigger closes with 1009",
        # Above the 125 bytes of any control frame, so pings and closes still pass.
        minimum=128,
        why="a smaller one closes nearly every client",
        shown="64 KiB",
        past="close 1009 (also for a fragmented message)",
    )
    max_subscriptions: int = _limit(
        4096,
        "PHIDs one socket may listen to; more closes it with 1008",
        minimum=1,
        why="0 closes every socket that subscribes",
        shown="4096 per socket",
        past="close 1008",
    )
    max_phid_length: int = _limit(
        512,
        "longest PHID kept, in bytes; longer ones are skipped",
        minimum=1,
        why="0 skips every PHID",
        shown="512 bytes",
        past="the PHID is skipped",
    )
    max_instance_length: int = _limit(
        128,
        "longest instance name; longer is refused with 400",
        minimum=1,
        why="0 refuses every named instance",
        shown="128 characters",
        past="400 (client upgrade and admin post)",
    )
    max_connections: int = _limit(
        0,
        "open client sockets before upgrades get 503; 0: open-file limit less 256",
        minimum=0,
        why="0 means the open-file limit less 256",
        shown="open-file limit less 256",
        past="upgrade answered 503 with `Retry-After`",
    )
    max_buffered: int = _limit(
        1024 * 1024,
        "unsent live bytes a socket may hold before it is closed with 1013 (behind a"
        " replay: judged by its progress, at most 16 times this)",
        minimum=1,
        why="0 closes every socket that is sent anything",
        shown="1 MiB unsent per socket",
        past="close 1013, counted",
    )
    max_body_size: int = _limit(
        2 * 1024 * 1024,
        "largest admin post in bytes; bigger gets 413",
        minimum=1,
        why="0 refuses every post",
        shown="2 MiB",
        past="413",
    )
    # Phorge's feed names the users a story notifies: the object's subscribers,
    # projects expanded to their members. Hundreds at most as a rule, a few
    # thousand for a task a big project follows. 16384 is four times that,
    # and the most one post can then cost is a few ms of loop and ~3 MiB of
    # history; 2 MiB of short PHIDs (260k) held the loop 55-100 ms and +36 MiB.
    max_subscribers: int = _limit(
        16384,
        "entries in one admin post's subscribers list; more gets 413",
        minimum=1,
        why="0 refuses every post that names a subscriber",
        shown="16384 per message",
        past="413 (admin post, a peer's relay included)",
    )
    handshake_timeout: float = _limit(
        5.0,
        "seconds a connection has to finish its WebSocket handshake",
        minimum=_POSITIVE,
        why="no handshake could finish",
        shown="5 s",
        past="connection dropped",
    )
    ping_interval: float = _limit(
        30.0,
        "seconds of silence before a server ping; no answer as long again closes"
        " the socket; 0 turns pings off",
        minimum=0,
        why="0 turns pings off",
        shown="30 s",
        past="silent sockets closed after two intervals",
    )
    relay_timeout: float = _limit(
        5.0, "seconds a relay to a peer may take", minimum=_POSITIVE, why="no relay could finish"
    )
    relay_queue: int = _limit(
        4096,
        "relays queued per peer before the oldest are dropped",
        minimum=1,
        why="0 would drop every relayed message",
    )
    relay_drain_timeout: float = _limit(
        2.0,
        "seconds peer queues get to drain at shutdown",
        minimum=0,
        why="0 abandons queued relays at shutdown",
    )
    shutdown_timeout: float = _limit(
        10.0,
        "longest graceful shutdown before exiting anyway",
        minimum=0,
        why="0 exits without draining",
    )
    broker_timeout: float = _limit(
        2.0,
        "seconds any one Redis call may take before the broker counts as down",
        minimum=_POSITIVE,
        why="no Redis call could finish",
    )
    broker_buffer: int = _limit(
        16384,
        "messages kept for Redis while it is unreachable; past it the oldest are dropped",
        minimum=1,
        why="0 would drop every message of an outage",
        shown="16384 messages",
        past="oldest dropped from the buffer, counted and logged",
    )
    broker_buffer_bytes: int = _limit(
        64 * 1024 * 1024,
        "payload bytes kept for Redis while it is unreachable; past it the oldest are dropped",
        minimum=1,
        why="0 would drop every message of an outage",
        shown="64 MiB",
        past="oldest dropped from the buffer, counted and logged",
    )
    broker_probe_interval: float = _limit(
        1.0,
        "seconds between the probes a node publishes to itself; three missed mean"
        " the subscription is stalled and is reconnected",
        minimum=_POSITIVE,
        why="probes would never stop",
    )
    admin_allow: tuple[str, ...] = _limit(
        (), "networks (CIDR) allowed on the admin port; empty: anyone who reaches it"
    )
    allowed_origins: tuple[str, ...] = _limit(
        (), "Origins allowed on the client port; empty: any, as Aphlict"
    )

    def __post_init__(self) -> None:
        """Refuse values that would start a server that cannot work (``--test`` included)."""
        for spec in fields(self):
            minimum, why = spec.metadata["minimum"], spec.metadata["why"]
            if minimum is None:
                continue
            value = getattr(self, spec.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LimitError(spec.name, value, "must be a finite number")
            if minimum == _POSITIVE and value <= 0:
                raise LimitError(spec.name, value, f"must be more than 0; {why}")
            if value < minimum:
                raise LimitError(spec.name, value, f"must be at least {minimum:g}; {why}")
        self.admin_networks()  # raises LimitError naming a bad entry

    def admin_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``admin_allow`` parsed: the one place the allow-list is read."""
        networks = []
        for net in self.admin_allow:
            try:
                networks.append(ipaddress.ip_network(net.strip(), strict=False))
            except ValueError as exc:
                raise LimitError("admin_allow", net, f"{net!r} is not a network ({exc})") from exc
        return tuple(networks)
