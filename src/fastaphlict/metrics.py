"""Prometheus metrics for ``GET /metrics`` on the admin port.

Nothing here runs on the delivery path. The hub, the fan-out and the relay
keep plain integer counters; a custom collector reads them only when
Prometheus scrapes, so a metric costs nothing between scrapes and the hot
path never touches a metric object or a lock.

Per-instance series are bounded: the :data:`MAX_INSTANCES` instances with the
most open sockets get their own ``instance`` label and every other instance is
summed under ``instance="_other"``, so a flood of made-up instance names in
client URLs cannot grow the scrape without limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fastaphlict.stats import Latency

if TYPE_CHECKING:
    from fastaphlict.broker import Broker
    from fastaphlict.hub import Hub
    from fastaphlict.peers import PeerRelay

__all__ = ["CONTENT_TYPE", "MAX_INSTANCES", "HubCollector", "Latency", "make_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MAX_INSTANCES = 20
OTHER = "_other"


class HubCollector(Collector):
    """Reads the hub's, the relay's and the broker's counters at scrape time."""

    def __init__(
        self, hub: Hub, relay: PeerRelay | None = None, broker: Broker | None = None
    ) -> None:
        self._hub = hub
        self._relay = relay
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        yield from self._per_instance()

        yield _counter(
            "fastaphlict_messages_in", "Messages accepted on the admin port.", hub.stats.messages_in
        )
        yield _counter(
            "fastaphlict_deliveries",
            "Frames delivered to sockets by live fan-out.",
            hub.stats.messages_out,
        )
        yield _counter(
            "fastaphlict_sent_bytes",
            "Frame bytes written to client sockets.",
            hub.outbox.bytes_sent,
        )
        yield _counter(
            "fastaphlict_coalesced_frames",
            "Frames that left in the same write as an earlier one to the same socket.",
            hub.outbox.coalesced,
        )
        yield _counter("fastaphlict_replays", "Replay commands served.", hub.stats.replays)
        yield _counter(
            "fastaphlict_replayed_messages",
            "Messages resent by replay commands.",
            hub.stats.replayed,
        )
        yield _counter(
            "fastaphlict_rejected_frames",
            "Client frames refused: malformed ones ignored, protocol errors, oversize messages.",
            hub.stats.frames_rejected,
        )
        yield _counter(
            "fastaphlict_rejected_posts",
            "Admin posts refused (not a JSON object, or too large).",
            hub.stats.posts_rejected,
        )
        yield _counter(
            "fastaphlict_slow_client_disconnects",
            "Sockets closed because their unsent data passed the cap.",
            hub.stats.slow_disconnects,
        )
        yield _counter(
            "fastaphlict_dead_client_disconnects",
            "Sockets closed because they stopped answering the server's pings.",
            hub.stats.dead_disconnects,
        )
        yield _counter(
            "fastaphlict_timestamps_capped",
            "Acceptance times from another node, Redis or a state file that lay ahead of"
            " this clock and were capped at now.",
            hub.stats.times_capped,
        )
        if self._relay is not None:
            yield from self._peers(self._relay)
        if self._broker is not None:
            yield from self._broker_metrics(self._broker)

    @staticmethod
    def _broker_metrics(broker: Broker) -> Iterator[Metric]:
        stats = broker.stats
        yield GaugeMetricFamily(
            "fastaphlict_broker_up",
            "1 while the node is subscribed to Redis and its own probe comes back, else 0.",
            value=1 if broker.up else 0,
        )
        yield GaugeMetricFamily(
            "fastaphlict_broker_nodes",
            "Other nodes of this broker cluster seen in the last two minutes (probes, messages).",
            value=len(broker.members()),
        )
        yield GaugeMetricFamily(
            "fastaphlict_broker_buffered",
            "Messages accepted here and waiting for Redis.",
            value=broker.buffered,
        )
        yield _counter(
            "fastaphlict_broker_published",
            "Messages this node published to Redis.",
            stats.published,
        )
        yield _counter(
            "fastaphlict_broker_dropped",
            "Messages dropped before reaching Redis (buffer full, or unsaved at a stop).",
            stats.dropped,
        )
        yield _counter(
            "fastaphlict_broker_publish_failures",
            "Publish attempts to Redis that failed and were retried.",
            stats.publish_failures,
        )
        yield _counter(
            "fastaphlict_broker_reconnects",
            "Times the subscription to Redis was rebuilt after having been up.",
            stats.reconnects,
        )
        yield _counter(
            "fastaphlict_broker_received",
            "Messages other nodes published that reached this node.",
            stats.received,
        )
        yield _counter(
            "fastaphlict_broker_malformed",
            "Stream entries and channel messages from Redis that could not be read and"
            " were skipped.",
            stats.malformed,
        )
        yield _counter(
            "fastaphlict_broker_primary_changes",
            "Times the Redis primary moved to another address (a failover, through Sentinel).",
            stats.primary_changes,
        )
        yield _counter(
            "fastaphlict_broker_republished",
            "Acknowledged messages published again on another Redis server after a failover"
            " or restart (Redis refuses those it has).",
            stats.republished,
        )
        if broker.primary is not None:
            primary = GaugeMetricFamily(
                "fastaphlict_broker_primary",
                "1, labelled with the address of the Redis primary in use.",
                labels=["address"],
            )
            primary.add_metric([broker.primary], 1)
            yield primary
        latency = HistogramMetricFamily(
            "fastaphlict_broker_publish_seconds",
            "Time from a message's acceptance here to Redis' acknowledgement.",
        )
        latency.add_metric([], stats.latency.cumulative(), stats.latency.sum)
        yield latency

    def _per_instance(self) -> Iterator[Metric]:
        # What expiry would leave, read without expiring (a read never
        # writes): no stale history, no instance that has nothing left.
        held = sorted(self._hub.held(), key=lambda item: item[0].channel.size, reverse=True)
        open_ = GaugeMetricFamily(
            "fastaphlict_connections_open", "Open client sockets.", labels=["instance"]
        )
        total = CounterMetricFamily(
            "fastaphlict_connections", "Client sockets ever opened.", labels=["instance"]
        )
        history = GaugeMetricFamily(
            "fastaphlict_history_size", "Messages held for replay.", labels=["instance"]
        )
        rest = [0, 0, 0]
        for index, (inst, size) in enumerate(held):
            values = (inst.channel.size, inst.clients_total, size)
            if index < MAX_INSTANCES:
                open_.add_metric([inst.name], values[0])
                total.add_metric([inst.name], values[1])
                history.add_metric([inst.name], values[2])
            else:
                rest = [a + b for a, b in zip(rest, values, strict=True)]
        if len(held) > MAX_INSTANCES:
            open_.add_metric([OTHER], rest[0])
            total.add_metric([OTHER], rest[1])
            history.add_metric([OTHER], rest[2])
        yield from (open_, total, history)
        yield GaugeMetricFamily(
            "fastaphlict_instances",
            "Instances held (with sockets or history); idle ones are dropped.",
            value=len(held),
        )
        yield GaugeMetricFamily(
            "fastaphlict_subscribed_phids",
            "Distinct PHIDs some socket listens to, over all instances.",
            value=sum(inst.channel.phid_count for inst, _ in held),
        )

    @staticmethod
    def _peers(relay: PeerRelay) -> Iterator[Metric]:
        labels = ["peer"]
        sent = CounterMetricFamily(
            "fastaphlict_relay_sent", "Relays a peer accepted.", labels=labels
        )
        failed = CounterMetricFamily(
            "fastaphlict_relay_failed",
            "Relays that failed (error, timeout, bad receipt).",
            labels=labels,
        )
        dropped = CounterMetricFamily(
            "fastaphlict_relay_dropped", "Relays dropped from a full peer queue.", labels=labels
        )
        queued = GaugeMetricFamily("fastaphlict_relay_queued", "Relays waiting.", labels=labels)
        known = GaugeMetricFamily(
            "fastaphlict_peer_fingerprint_known",
            "1 once the peer's fingerprint was learned from a receipt.",
            labels=labels,
        )
        latency = HistogramMetricFamily(
            "fastaphlict_relay_seconds", "Relay round-trip time.", labels=labels
        )
        for peer in relay.peers:
            name = [peer.url]
            sent.add_metric(name, peer.sent)
            failed.add_metric(name, peer.failed)
            dropped.add_metric(name, peer.dropped)
            queued.add_metric(name, peer.queued)
            known.add_metric(name, 1 if peer.fingerprint else 0)
            latency.add_metric(name, peer.latency.cumulative(), peer.latency.sum)
        yield from (sent, failed, dropped, queued, known, latency)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def render(registry: CollectorRegistry) -> bytes:
    """The scrape body in Prometheus' text format."""
    return generate_latest(registry)


def make_registry(
    hub: Hub, relay: PeerRelay | None = None, broker: Broker | None = None
) -> CollectorRegistry:
    """A registry of our own (not the global one), so servers in one process don't clash."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HubCollector(hub, relay, broker))
    return registry
