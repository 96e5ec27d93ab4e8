"""Plain counters every room may import: the hub's, the broker's, latencies.

They sit apart from :mod:`fastaphlict.metrics` so that what is measured
(the hub, the broker, the peers' relay) does not import what reads the
measures: the collector imports them all, and none of them imports it.
Each counter is written by its owner alone, on the event loop; a scrape or
``/status/`` only reads them.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

__all__ = [
    "BROKER_LATENCY_BUCKETS",
    "RELAY_LATENCY_BUCKETS",
    "BrokerStats",
    "Latency",
    "Stats",
]

#: Latency bucket bounds (seconds) both histograms share: a millisecond to 2.5 s.
_SHARED_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Upper bounds (seconds) of the broker's publish latency histogram; the last is +Inf.
#: A Redis on the same host answers within half a millisecond.
BROKER_LATENCY_BUCKETS = (0.0005, *_SHARED_BOUNDS, float("inf"))
#: Upper bounds (seconds) of the peers' relay latency histogram; the last is +Inf.
#: An HTTP round trip to another node may take seconds before it fails.
RELAY_LATENCY_BUCKETS = (*_SHARED_BOUNDS, 5.0, float("inf"))


class Latency:
    """Seconds counted into fixed buckets: a histogram kept as plain numbers.

    Whoever measures calls :meth:`observe` (a bisection of a dozen floats); the
    collector turns it into Prometheus' cumulative form only at scrape time.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        #: Upper bounds, ascending, the last ``inf``.
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # The first bound at or above ``seconds`` (the last is ``inf``), in C:
        # the broker observes every message it publishes.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them."""
        total, out = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else str(bound), total))
        return out


@dataclass(slots=True)
class Stats:
    """The process-wide counters: ``/status/`` and ``/metrics`` read this one object.

    Each is incremented where the event happens (the hub, the client and
    admin listeners); nothing else writes them, and reading them costs the
    delivery path nothing.
    """

    #: Messages accepted on the admin port (``messages.in``).
    messages_in: int = 0
    #: Frames queued to sockets by live fan-out (``messages.out``).
    messages_out: int = 0
    #: Replay commands served, and the messages they resent.
    replays: int = 0
    replayed: int = 0
    #: Client frames ignored or refused, and admin posts refused.
    frames_rejected: int = 0
    posts_rejected: int = 0
    #: Sockets closed for not reading (1013) and for not answering pings.
    slow_disconnects: int = 0
    dead_disconnects: int = 0
    #: Acceptance times from elsewhere (another node, Redis, a state file)
    #: that lay ahead of this clock and were capped (see hub.TimeCap).
    times_capped: int = 0


@dataclass
class BrokerStats:
    """Counters ``/metrics`` reads; only the broker writes them, on the loop."""

    #: Messages this node published to Redis (acknowledged).
    published: int = 0
    #: Messages dropped: the buffer was full, or a stop found them unpublished
    #: with no state directory to keep them.
    dropped: int = 0
    #: Times the link to Redis was rebuilt after it had been up.
    reconnects: int = 0
    #: Messages other nodes published that reached this node.
    received: int = 0
    #: Publish attempts that failed (a pipeline counts once).
    publish_failures: int = 0
    #: Stream entries and channel messages that could not be read (skipped).
    malformed: int = 0
    #: Times the primary moved to another address (through Sentinel).
    primary_changes: int = 0
    #: Acknowledged messages published again on another Redis server.
    republished: int = 0

    def __post_init__(self) -> None:
        #: Seconds from a message's acceptance to Redis' acknowledgement
        #: (not a field: the fields are the counters).
        self.latency = Latency(BROKER_LATENCY_BUCKETS)
