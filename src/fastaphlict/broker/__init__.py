"""The Redis broker: every node given the same Redis is one cluster.

What it owns: the connection to Redis, the buffer of messages waiting for
it, the subscription other nodes' messages arrive on, and the record of how
far this node has read each instance's shared history. What it must never
do: block or fail a post. :meth:`Broker.relay` runs on the publish path (the
posting node's own tabs already have the message) and only appends to a
bounded buffer.

Redis holds, per instance, a stream ``fastaphlict:history:<instance>``
(trimmed to the history's 4096 entries and 60 s by Redis' clock, expiring
with its instance), a sorted set of instances by last publish, and a short-
lived mark per published message. One Lua script (``publish.lua``) writes
the stream entry and publishes it on the cluster's channel, so a node never
sees a message the history lacks or the reverse, and refuses a message whose
mark is there, so a publish retried after a timeout lands once. The
connection layer is :mod:`fastaphlict.resp`.

The parts, in the manner of the ``websockets`` library:

- :mod:`.wire`: pure: the channel's and the streams' formats, the window
  against duplicates, the position rule, what a refused permission says;
- :mod:`.commands`: the command connection, the scripts loaded and the
  Redis user's permissions checked on each new one;
- :mod:`.publisher`: the bounded buffer, the batches, the messages kept
  against a failover that loses them (Redis replicates asynchronously),
  published again on another server;
- :mod:`.link`: where the primary is (through :mod:`.sentinel` or not), the
  subscription, the catch-up after every (re)connection, the probes that
  find a stalled subscription and list the cluster's members;
- this module: :class:`Broker`, which composes them, says once when the
  broker goes down and comes back, and is what the server, the hub and
  ``/metrics`` see. The parts share one :class:`.wire.Node` (what they are
  told) and reach each other only through the broker, by the narrow
  :class:`.wire.Events` it implements: no part imports another's class
  but the publisher its command connection.

The password stays in the connection settings: logs, errors and metrics
name the broker by :attr:`BrokerConfig.display`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fastaphlict.broker import wire
from fastaphlict.broker.commands import Commands
from fastaphlict.broker.link import MEMBER_TTL, Link, Primary
from fastaphlict.broker.publisher import Publisher
from fastaphlict.broker.wire import PREFIX, StreamId, parse_stream_id
from fastaphlict.protocol import HISTORY_TTL_MS
from fastaphlict.resp import RedisError, RespConnection
from fastaphlict.stats import BROKER_LATENCY_BUCKETS, BrokerStats

if TYPE_CHECKING:
    from fastaphlict.config import BrokerConfig
    from fastaphlict.hub import Hub
    from fastaphlict.state import Pending

__all__ = [
    "LATENCY_BUCKETS",
    "MEMBER_TTL",
    "Broker",
    "BrokerStats",
    "RedisError",
    "StreamId",
    "parse_stream_id",
]

log = logging.getLogger("fastaphlict.broker")

#: Upper bounds (seconds) of the publish latency histogram (kept under this name).
LATENCY_BUCKETS = BROKER_LATENCY_BUCKETS
#: Seconds between two prunings of the per-instance and per-node records.
PRUNE_INTERVAL = 60.0


class Broker:
    """One node's link to the Redis broker: publish, subscribe, catch up, probe.

    Lifecycle: construct, ``await start()`` before the listeners accept (it
    warms the history from Redis, or gives up after a few timeouts), ``relay()``
    from the publish path, ``await close()`` at shutdown (it returns what
    could not be published).
    """

    def __init__(
        self,
        hub: Hub,
        config: BrokerConfig,
        *,
        timeout: float = 2.0,
        buffer_limit: int = 16384,
        buffer_bytes: int = 64 * 1024 * 1024,
        probe_interval: float = 1.0,
        ca_file: str | None = None,
    ) -> None:
        if timeout <= 0 or probe_interval <= 0:
            raise ValueError("timeout and probe_interval must be positive")
        if buffer_limit < 1:
            raise ValueError(f"buffer_limit must be at least 1, got {buffer_limit!r}")
        self._hub = hub
        self.config = config
        self.display = config.display
        self.fingerprint = hub.fingerprint
        self.stats = BrokerStats()
        self._channel = f"{PREFIX}{config.db}:messages"
        node = wire.Node(
            self.fingerprint,
            self.display,
            self._channel,
            timeout,
            probe_interval=probe_interval,
            buffer_limit=buffer_limit,
            buffer_bytes=buffer_bytes,
            ca_file=ca_file,
        )
        self._node = node
        self._primary = Primary(config, node, self)
        self._commands = Commands(node, self)
        self._publisher = Publisher(self.stats, node, self._commands, self)
        self._link = Link(hub, self.stats, node, self)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._down_since: float | None = None
        self._ever_up = False
        self._synced = asyncio.Event()
        self._attempted = asyncio.Event()
        self._start_reason = "timed out"
        self._down_logged = False
        #: ``stats.published`` when the outage began: the "back" line says
        #: how many of the messages that waited went out since.
        self._published_at_down = self._republished_at_down = 0

    def deliver_from(self, at_ms: float) -> None:
        """Deliver to tabs, on an instance's first sync, what was accepted from ``at_ms`` on.

        The default is this node's start: older messages were never its to
        deliver, and its tabs replayed what it had. A node with a state
        directory gives the time its previous process was last known alive:
        what other nodes accepted after that, and is not in the saved history,
        reached none of its tabs (the merge skips payloads the history holds).
        """
        self._link.deliver_from = at_ms

    # -- state for metrics and the hub ------------------------------------

    @property
    def up(self) -> bool:
        """Subscribed and caught up, our own probe comes back, and publishing works."""
        return self._link.up and not self._publisher.stuck() and self._commands.refused is None

    @property
    def primary(self) -> str | None:
        """The primary's ``host:port`` (or socket path) last connected to."""
        return self._primary.where

    @property
    def buffered(self) -> int:
        """Messages accepted here and not yet acknowledged by Redis."""
        return self._publisher.buffered

    @property
    def last_catch_up(self) -> tuple[int, float, float] | None:
        """The last catch-up read: messages new to this node, seconds, when it ended (monotonic)."""
        return self._link.last_catch_up

    @property
    def on_restored(self) -> Callable[[], None] | None:
        """Called once every restored message is acknowledged by Redis (or dropped)."""
        return self._publisher.on_restored

    @on_restored.setter
    def on_restored(self, callback: Callable[[], None] | None) -> None:
        self._publisher.on_restored = callback

    def is_member(self, fingerprint: str) -> bool:
        """Whether ``fingerprint`` is another node of this cluster (seen recently)."""
        return self._link.is_member(fingerprint)

    def members(self) -> list[str]:
        """The other nodes of this cluster seen recently (for the mesh relay's ``touched``)."""
        return self._link.members()

    # -- the publish path -------------------------------------------------

    def relay(self, instance: str, message: Mapping[str, Any], body: bytes) -> None:
        """Queue a message this node accepted for Redis. Never blocks, never raises."""
        self._publisher.relay(instance, body)

    def restore(self, pending: Iterable[Pending]) -> int:
        """Queue the unpublished messages a previous process left; return how many.

        They keep their origin and number (Redis refuses one it already has)
        and their acceptance time; those already out of the history window
        are dropped and counted. Their origin counts as our own: the tabs
        that replayed them from the saved history must not get them again.
        :attr:`on_restored` is called once every one is acknowledged by Redis
        (or dropped by the buffer's bound): until then the caller keeps them.
        """
        horizon = wire.now_ms() - HISTORY_TTL_MS
        queued = expired = 0
        for origin, seq, instance, saved_at, payload in pending:
            at = self._hub.accepted_at(saved_at, "the state directory's unpublished messages")
            if at < horizon:
                expired += 1
                continue
            self._link.adopt(origin)
            self._publisher.restore((origin, seq, instance, at, payload, time.monotonic()))
            queued += 1
        self.stats.dropped += expired
        if queued or expired:
            log.info(
                "broker: %d saved message(s) to publish, %d past the history window dropped",
                queued,
                expired,
            )
        return queued

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        r"""Connect, warm the history from Redis, and start the tasks.

        Waits for the first attempt's outcome (at most a few ``timeout``\ s):
        an unreachable Redis is logged and retried in the background, and the
        node serves its own tabs meanwhile.
        """
        self._tasks = [
            asyncio.create_task(self._link.run(), name="fastaphlict-broker-subscriber"),
            asyncio.create_task(self._publisher.run(), name="fastaphlict-broker-publisher"),
            asyncio.create_task(self._prober(), name="fastaphlict-broker-probe"),
        ]
        sentinels = self._primary.sentinels
        if sentinels is not None:
            self._tasks.append(
                asyncio.create_task(sentinels.watch(), name="fastaphlict-broker-sentinels")
            )
        # A first catch-up that is reading (a big shared history) is waited
        # for, up to a minute: the listeners must not accept before it.
        started = time.monotonic()
        while not self._attempted.is_set():
            waited = time.monotonic() - started
            if waited > self._node.timeout * 4 and (not self._link.catching_up or waited > 60.0):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._attempted.wait(), 0.1)
        self._link.serving = True
        if not self._synced.is_set():
            log.warning(
                "broker %s unreachable at start (%s): serving this node's tabs with %s history,"
                " retrying in the background",
                self.display,
                self._start_reason,
                "its saved" if any(len(i.history) for i in self._hub.instances()) else "no",
            )
            self._down_logged = True
            self._went_down()

    async def close(self, drain_timeout: float = 2.0) -> list[Pending]:
        """Publish what is buffered (for up to ``drain_timeout`` s), stop; return the rest.

        Idempotent. The caller keeps the returned messages (state directory)
        or counts them as dropped.
        """
        if self._closing:
            return []
        self._closing = True
        self._publisher.stop()
        self._link.closing = True
        if not self._tasks:
            return self.abandon()  # never started: nothing could be published
        # Drain while publishing works. After a failure, one more attempt at
        # once (Redis may be back and the publisher only backing off); a new
        # failure, and the rest goes to the caller.
        failures = self.stats.publish_failures
        self._publisher.hurry()
        deadline = time.monotonic() + drain_timeout
        while (
            self.buffered
            and time.monotonic() < deadline
            and self.stats.publish_failures == failures
        ):
            await asyncio.sleep(0.01)
        return self.abandon()

    def drop_unsaved(self, count: int) -> None:
        """Count messages a stop left unpublished with nowhere to keep them (dropped)."""
        self.stats.dropped += count

    def abandon(self) -> list[Pending]:
        """Stop at once (also a forced shutdown); return what is still buffered."""
        self._closing = True
        left = [(o, s, i, at, p) for o, s, i, at, p, _ in self._publisher.abandon()]
        for task in self._tasks:
            task.cancel()
        self._commands.drop()
        self._link.stop()
        return left

    # -- what the parts ask of and tell the broker (wire.Events) --------------

    async def connect_primary(self, role: str) -> RespConnection:
        return await self._primary.connect(role)

    async def command_reply(self, command: tuple[Any, ...]) -> Any:
        return await self._commands.reply(command)

    def server_changed(self, run_id: str | None) -> None:
        self._publisher.republish_on(run_id)

    def publishing_allowed(self) -> None:
        self._publisher.wake()

    def instances_read(self) -> int:
        return len(self._link.read)

    def primary_moved(self, why: str) -> None:
        """A connection found a new primary: count it, and the others follow."""
        self.stats.primary_changes += 1
        self._leave_primary(why)

    def primary_announced(self, where: str) -> None:
        """A sentinel announced a failover: move now, not at the next failure."""
        self._leave_primary(f"the sentinels announced {where} as the new primary")
        self._link.switched.set()
        self._publisher.hurry()

    def _leave_primary(self, why: str) -> None:
        """Close the command connection and the subscription: they reconnect to the primary."""
        self._link.drop(RedisError(why))  # the reason the subscriber logs
        self._commands.drop()

    # -- watching: the probe interval, down and back -------------------------

    async def _prober(self) -> None:
        """Every interval: probe the link, give up one whose probes stopped, watch publishing."""
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(self._node.probe_interval)
            now = time.monotonic()
            if now - pruned > PRUNE_INTERVAL:
                pruned = now
                self._publisher.forget(self._link.prune())
            if self._publisher.stuck() and not self._down_logged:
                self.link_down(f"publishing fails: {self._publisher.error}")
            elif self._down_logged and self._ever_up and self.up:
                self._on_back()
            self._commands.recheck()
            self._link.watch(now)

    def batch_published(self) -> None:
        """A batch went through: an outage that publishing alone held may be over."""
        if self._down_logged and self.up:
            self._on_back()

    def link_up(self, caught_up: int) -> None:
        """The link is up (subscribed, caught up, probe answered): say so once."""
        self._attempted.set()
        if not self._ever_up:
            self._ever_up = True
            self._synced.set()
            log.info(
                "broker %s connected: history in sync (%d message(s) from Redis)%s",
                self.display,
                caught_up,
                "" if self._commands.refused is None else ", but publishing is refused (see above)",
            )
            self._down_logged = False
            self._down_since = None
            return
        self.stats.reconnects += 1
        if not self._publisher.stuck():
            self._on_back(caught_up)

    def _went_down(self) -> None:
        self._down_since = time.monotonic()
        self._published_at_down = self.stats.published
        self._republished_at_down = self.stats.republished

    def _on_back(self, caught_up: int | None = None) -> None:
        """The end of an outage: one line, how long it lasted and where every message is.

        What went out of this node's buffer, what came in from other nodes
        (when the link was rebuilt), and what still waits: a "0 ... caught up"
        alone used to read as loss when the buffered messages had gone out.
        """
        if self._down_logged:
            down_for = time.monotonic() - (self._down_since or time.monotonic())
            published = self.stats.published - self._published_at_down
            again = self.stats.republished - self._republished_at_down
            parts = [
                f"{published} message(s) of this node published"
                + (f" ({again} of them again, on another Redis server)" if again else "")
            ]
            if caught_up is not None:
                parts.append(f"{caught_up} missed message(s) of other nodes caught up")
            parts.append(f"{self.buffered} still waiting to publish")
            log.info("broker %s back after %.1fs: %s", self.display, down_for, ", ".join(parts))
            self._down_logged = False
        self._down_since = None

    def link_down(self, reason: str) -> None:
        if self._closing:
            return
        if not self._attempted.is_set():
            # At start: one line says it all (see start()).
            self._attempted.set()
            log.debug("broker %s unreachable: %s", self.display, reason)
            self._start_reason = reason
            return
        if self._down_since is None:
            self._went_down()
        if not self._down_logged:
            self._down_logged = True
            log.warning(
                "broker %s down: %s; posts still reach this node's tabs and wait for Redis"
                " in a buffer of up to %d messages",
                self.display,
                reason,
                self._node.buffer_limit,
            )
        else:
            log.debug("broker %s still down: %s", self.display, reason)
