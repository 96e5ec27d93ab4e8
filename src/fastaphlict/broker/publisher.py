"""Publishing to Redis: the bounded buffer, the batches, the messages kept for a failover.

:meth:`Publisher.relay` runs on the publish path and must never block or
fail a post: it appends to a bounded buffer and, when no batch is out,
writes it to Redis in the same loop iteration; what comes meanwhile leaves
with the reply (:meth:`Publisher._kick`). The task :meth:`Publisher.run`
only steps in when there is no connection or the last batch failed, and
backs off.

Every acknowledged message is kept (for the history window, within the
buffer's bounds) with the ``run_id`` of the server that took it; when the
command connection lands on another server, the kept messages go back in
front of the buffer and are published again (:meth:`Publisher.republish_on`):
the script's mark refuses those the new server has. The connection itself,
and the scripts, are :mod:`.commands`'.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import hiredis

from fastaphlict.broker import wire
from fastaphlict.broker.commands import PUBLISH_SHA, Commands
from fastaphlict.broker.wire import BACKOFF_CAP, BACKOFF_FIRST, PREFIX
from fastaphlict.protocol import HISTORY_LIMIT, HISTORY_TTL_MS
from fastaphlict.resp import RedisError, RespConnection
from fastaphlict.stats import BrokerStats

__all__ = ["Item", "Publisher"]

log = logging.getLogger("fastaphlict.broker")


#: Messages published in one pipeline (each still its own atomic script).
PUBLISH_BATCH = 256
#: Milliseconds a published message's mark stays in Redis: a retry after a
#: lost reply, even one saved to the state directory and sent after a
#: restart, comes well within it. About 100 to 150 bytes of Redis memory a
#: message: some 10 MB at 100 messages/s.
MARK_TTL_MS = 10 * 60 * 1000
#: Seconds between two "maintain" publishes of one instance (see publish.lua).
MAINTAIN_INTERVAL = 1.0

#: The sorted set of instances by last publish (the script's second key).
INSTANCES_KEY = f"{PREFIX}instances"

#: (origin, seq, instance, accepted at ms, payload, accepted monotonic).
Item = tuple[str, int, str, float, bytes, float]


class Publisher:
    """The buffer of messages for Redis, and the batches out on the command connection."""

    def __init__(
        self, stats: BrokerStats, node: wire.Node, commands: Commands, events: wire.Events
    ) -> None:
        self._stats = stats
        self._node = node
        self._commands = commands
        self._events = events
        self._script_tail = (HISTORY_LIMIT, int(HISTORY_TTL_MS), node.channel)
        self._buffer: collections.deque[Item] = collections.deque()
        #: Payload bytes in the buffer (a batch out is counted again if it comes back).
        self._buffer_bytes = 0
        #: The batch being published: out of the buffer, not yet acknowledged.
        self._in_flight: list[Item] = []
        self._in_flight_bytes = 0
        #: The batch out's deadline: when it left, and on which connection. One
        #: timer checks it, re-armed only when it fires (see _check_in_flight).
        self._in_flight_sent = 0.0
        self._in_flight_conn: RespConnection | None = None
        self._in_flight_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Per instance, its stream's key and its name as the script gets them.
        self._names: dict[str, tuple[str, bytes]] = {}
        #: Messages Redis acknowledged lately, in order, and the run_id of the
        #: server that did (see the module docstring).
        self._kept: collections.deque[Item] = collections.deque()
        self._kept_bytes = 0
        self._kept_on: str | None = None
        self._seq = 0
        self._wakeup = asyncio.Event()
        #: Set at close or a failover: a publisher backing off tries once more at once.
        self._stop_backoff = asyncio.Event()
        self._tried_at_close = False
        self.closing = False
        self._dropping = False
        #: The last publish attempt failed (Redis unreachable, or timing out).
        self._failing = False
        #: The batch out was given up for its timeout (for the log line).
        self._timed_out = False
        #: Since when publishing fails, and why (None: it works).
        self._failing_since: float | None = None
        self.error = ""
        #: Per instance, when this node last asked the script to maintain it.
        self._maintained: dict[str, float] = {}
        #: Restored messages not yet acknowledged by Redis (nor dropped), and
        #: who is told when none is left (the server removes the saved file).
        self._restored_left = 0
        self.on_restored: Callable[[], None] | None = None

    # -- what the broker asks -----------------------------------------------

    @property
    def buffered(self) -> int:
        """Messages accepted here and not yet acknowledged by Redis."""
        return len(self._buffer) + len(self._in_flight)

    def stuck(self) -> bool:
        """Publishing has failed for longer than one ``timeout`` (OOM, READONLY, an ACL...)."""
        since = self._failing_since
        return since is not None and time.monotonic() - since > self._node.timeout

    def relay(self, instance: str, body: bytes) -> None:
        """Queue a message this node accepted. Never blocks, never raises."""
        if self.closing:
            self._stats.dropped += 1
            return
        self._seq += 1
        # _append inlined: this runs for every post.
        self._buffer.append(
            (self._node.fingerprint, self._seq, instance, wire.now_ms(), body, time.monotonic())
        )
        self._buffer_bytes += len(body)
        if len(self._buffer) > 1:
            self._bound()  # a single message is never dropped
        self._kick()

    def restore(self, item: Item) -> None:
        """Queue a message a previous process left; :attr:`on_restored` counts it."""
        self._restored_left += 1
        self._append(item)

    def hurry(self) -> None:
        """Cut a backoff short: closing, or a failover was announced."""
        self._stop_backoff.set()
        self._wakeup.set()

    def stop(self) -> None:
        self.closing = True

    def abandon(self) -> list[Item]:
        """Stop publishing; return what is still buffered, the batch out first."""
        self.closing = True
        left = [*self._in_flight, *self._buffer]
        self._in_flight = []
        self._buffer.clear()
        self._buffer_bytes = 0
        if self._in_flight_timer is not None:
            self._in_flight_timer.cancel()
            self._in_flight_timer = None
        return left

    def wake(self) -> None:
        """Something changed that may let what waits go (a refusal lifted)."""
        self._wakeup.set()

    def forget(self, instances: list[str]) -> None:
        for instance in instances:
            self._maintained.pop(instance, None)
            self._names.pop(instance, None)

    # -- the buffer -----------------------------------------------------------

    def _append(self, item: Item) -> None:
        self._buffer.append(item)
        self._buffer_bytes += len(item[4])
        self._bound()
        self._kick()

    def _bound(self) -> None:
        """Drop the oldest past ``buffer_limit`` messages or ``buffer_bytes`` (never the newest)."""
        buffer = self._buffer
        while len(buffer) > 1 and (
            len(buffer) > self._node.buffer_limit or self._buffer_bytes > self._node.buffer_bytes
        ):
            item = buffer.popleft()
            self._buffer_bytes -= len(item[4])
            self._dropped_oldest()
            if item[0] != self._node.fingerprint:
                self._restored_done(1)

    def _dropped_oldest(self) -> None:
        """Count one message the bound pushed out; the first of a streak is logged."""
        self._stats.dropped += 1
        if not self._dropping:
            self._dropping = True
            log.warning(
                "broker buffer full (%d messages or %d MiB): dropping the oldest; other"
                " nodes' tabs will miss them",
                self._node.buffer_limit,
                self._node.buffer_bytes >> 20,
            )

    def _restored_done(self, count: int) -> None:
        """``count`` restored messages are in Redis (or dropped); the last one tells."""
        if not count:
            return
        self._restored_left -= count
        if self._restored_left == 0 and self.on_restored is not None:
            self.on_restored()

    def republish_on(self, run_id: str | None) -> None:
        """Publishing goes to server ``run_id`` now: another one gets the kept messages again."""
        if run_id == self._kept_on:
            return
        # Another server has not seen this node's "maintain" (the instance
        # set): the first publish of each instance there does it again.
        self._maintained.clear()
        kept = self._kept
        if kept:
            self._stats.republished += len(kept)
            log.info(
                "broker: publishing again the %d message(s) the previous Redis server"
                " acknowledged in the last minute (it may have failed over before its"
                " replica had them; Redis refuses those it has)",
                len(kept),
            )
            self._buffer.extendleft(reversed(kept))
            self._buffer_bytes += self._kept_bytes
            kept.clear()
            self._kept_bytes = 0
            self._bound()
            self._wakeup.set()
        self._kept_on = run_id

    # -- publishing -------------------------------------------------------------

    async def run(self) -> None:
        """Keep the command connection up for publishing; retry after failures, backing off.

        Publishing itself happens in callbacks (:meth:`_kick`, :meth:`_published`):
        a message accepted while no batch is out leaves at once, in the same
        loop iteration, and those accepted while one is out leave together
        when its replies are in. This task only steps in when there is no
        connection or the last batch failed.
        """
        delay = BACKOFF_FIRST
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._buffer or self._in_flight:
                continue
            if not self._failing:
                delay = BACKOFF_FIRST
            elif not self.closing:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_backoff.wait(), delay)
                if not self.closing:
                    self._stop_backoff.clear()  # set by a failover's announcement
                delay = min(delay * 2, BACKOFF_CAP)
            if self.closing and self._failing:
                if self._tried_at_close:
                    continue  # close() takes what is left
                self._tried_at_close = True
            try:
                await self._commands.get()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_failure(exc)
                self._wakeup.set()
                continue
            self._kick(retry=True)

    def _kick(self, *, retry: bool = False) -> None:
        """Send what is buffered now, unless a batch is out (its replies send the rest).

        Without a usable connection, or after a failure (unless this is the
        publisher's ``retry``), the publisher task is woken instead.
        """
        if self._in_flight or not self._buffer or self._commands.refused is not None:
            # Refused: a script that stops half-way (after its XADD and mark,
            # before its PUBLISH) would count as published on the retry. Held
            # until the check passes (Commands._note_refused).
            return
        conn = self._commands.conn
        if conn is None or conn.is_closed or (self._failing and not retry):
            self._wakeup.set()
            return
        buffer = self._buffer
        if len(buffer) == 1:  # the usual batch: the post just accepted
            batch = [buffer.popleft()]
            size = len(batch[0][4])
        else:
            batch = [buffer.popleft() for _ in range(min(PUBLISH_BATCH, len(buffer)))]
            size = sum(len(item[4]) for item in batch)
        self._in_flight = batch
        self._in_flight_bytes = size
        self._buffer_bytes -= size
        try:
            conn.send_batch(self._commands_for(batch), self._published)
        except Exception as exc:  # a closed transport raises RuntimeError in uvloop
            self._in_flight = []
            conn.close()
            self._publish_failed(batch, exc)
            return
        # The deadline is noted, not armed: a timer per batch (created, then
        # cancelled by the reply) cost more than the batch's own Python on
        # the posting node. The one timer is armed when none is.
        self._in_flight_sent = time.monotonic()
        self._in_flight_conn = conn
        if self._in_flight_timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._in_flight_timer = loop.call_later(self._node.timeout, self._check_in_flight)

    def _commands_for(self, batch: list[Item]) -> list[tuple[Any, ...]]:
        """The EVALSHA of each message; "maintain" at most once a second per instance."""
        now = time.monotonic()
        maintained = self._maintained
        names = self._names
        limit, window, channel = self._script_tail
        commands = []
        for origin, seq, instance, at, payload, _ in batch:
            maintain = now - maintained.get(instance, -MAINTAIN_INTERVAL) >= MAINTAIN_INTERVAL
            if maintain:
                maintained[instance] = now
            named = names.get(instance)
            if named is None:
                named = names[instance] = (wire.key(instance), wire.encode_name(instance))
            commands.append(
                (
                    "EVALSHA",
                    PUBLISH_SHA,
                    3,
                    named[0],
                    INSTANCES_KEY,
                    f"{PREFIX}seq:{origin}:{seq}",
                    named[1],
                    origin,
                    seq,
                    repr(at),
                    payload,
                    limit,
                    window,
                    channel,
                    "1" if maintain else "0",
                    MARK_TTL_MS,
                )
            )
        if len(maintained) > 4 * self._events.instances_read() + 1024:
            horizon = now - 2 * MAINTAIN_INTERVAL
            for instance in [i for i, at in maintained.items() if at < horizon]:
                del maintained[instance]
                names.pop(instance, None)
        return commands

    def _check_in_flight(self) -> None:
        """The timer: a batch out for ``timeout`` without its replies closes the connection.

        The batch out may be a later one than when the timer was armed: it
        gets the rest of its own time.
        """
        self._in_flight_timer = None
        conn = self._in_flight_conn
        if not self._in_flight or conn is None:
            return
        left = self._in_flight_sent + self._node.timeout - time.monotonic()
        if left > 0:
            assert self._loop is not None  # set when the timer was first armed
            self._in_flight_timer = self._loop.call_later(left, self._check_in_flight)
            return
        # No replies within ``timeout``: the connection's order is lost.
        self._timed_out = True
        conn.close()  # tells _published, with ConnectionLost

    def _published(self, replies: list[Any] | None, error: Exception | None) -> None:
        """The replies of the batch out (or why there are none)."""
        batch, self._in_flight = self._in_flight, []
        if not batch:
            return  # abandoned meanwhile
        if error is None:
            for reply in replies or ():
                if isinstance(reply, hiredis.ReplyError):
                    # NOSCRIPT (the cache was flushed) included: a new connection loads it.
                    error = RedisError(str(reply))
                    self._commands.drop()
                    break
        if error is not None:
            if self._timed_out:
                error = TimeoutError(f"no reply from Redis within {self._node.timeout:g}s")
            self._timed_out = False
            for instance in {item[2] for item in batch}:
                self._maintained.pop(instance, None)
            self._publish_failed(batch, error)
            return
        self._failing = False
        self._failing_since = None
        self._events.batch_published()
        acked = time.monotonic()
        observe = self._stats.latency.observe
        for item in batch:
            observe(acked - item[5])
        self._stats.published += len(batch)
        if self._restored_left:
            self._restored_done(sum(item[0] != self._node.fingerprint for item in batch))
        self._keep(batch)
        if self._dropping and len(self._buffer) <= self._node.buffer_limit // 2:
            self._dropping = False
            log.info("broker buffer below half again (%d messages)", len(self._buffer))
        self._kick()

    def _keep(self, batch: list[Item]) -> None:
        """Keep an acknowledged batch until it leaves the history window (or the bounds)."""
        kept = self._kept
        kept.extend(batch)
        self._kept_bytes += self._in_flight_bytes
        horizon = wire.now_ms() - HISTORY_TTL_MS
        while kept and (
            kept[0][3] < horizon
            or len(kept) > self._node.buffer_limit
            or self._kept_bytes > self._node.buffer_bytes
        ):
            self._kept_bytes -= len(kept.popleft()[4])

    def _publish_failed(self, batch: list[Item], error: Exception) -> None:
        """Put the batch back at the front, in order; the publisher retries after a pause."""
        self._buffer.extendleft(reversed(batch))
        self._buffer_bytes += sum(len(item[4]) for item in batch)
        self._bound()
        self._note_failure(error)
        self._wakeup.set()

    def _note_failure(self, error: BaseException) -> None:
        self._stats.publish_failures += 1
        self._failing = True
        self.error = wire.reason(error)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        log.debug("broker publish failed: %s", self.error)
