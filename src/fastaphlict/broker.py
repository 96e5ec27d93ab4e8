"""The Redis broker: every node given the same Redis is one cluster.

What it owns: the connection to Redis, the buffer of messages waiting for
it, the subscription other nodes' messages arrive on, and the record of how
far this node has read each instance's shared history. What it must never
do: block or fail a post. :meth:`Broker.relay` runs on the publish path (the
posting node's own tabs already have the message); it appends to a bounded
buffer and, when no batch is out, writes it to Redis in the same loop
iteration; what comes meanwhile leaves with the reply (:meth:`Broker._kick`).

Redis holds, per instance, a stream ``fastaphlict:history:<instance>``
(trimmed to the history's 4096 entries and 60 s by Redis' clock, expiring
with its instance), a sorted set of instances by last publish, and a short-
lived mark per published message. One Lua script writes the stream entry
and publishes it on the cluster's channel, so a node never sees a message
the history lacks or the reverse, and refuses a message whose mark is
there, so a publish retried after a timeout lands once. The connection
layer is :mod:`fastaphlict.resp`.

Receiving, this node takes nothing on trust from the channel alone
(Centrifugo's way): after every (re)connection it subscribes first, then
reads each instance's stream from where it stopped (or the whole window, the
first time), and only then reads the channel, skipping what the streams
already gave by stream position. So a node cut off for a while gets every
message of the window it missed, once. Its own messages are recognised by
their origin and skipped: they reached its tabs when they were posted.

A subscription can stay connected and stop delivering (a failover behind a
proxy, a paused Redis): every node publishes a probe to itself each
``probe_interval``; three intervals without its own probe back and the link
is torn down and rebuilt, catch-up included. The probes double as the
cluster's membership list, which the hub's loopback rule and the mesh relay
use in mixed clusters.

Through Sentinel (``redis+sentinel://``) every connection asks the
sentinels where the primary is (:mod:`fastaphlict.sentinel`) and checks
``ROLE`` on it; a lost connection, a ``READONLY`` reply and a sentinel's
``+switch-master`` all lead to asking again, and a new primary moves every
connection over (:meth:`Broker._note_primary`).

Redis replicates asynchronously: a message the old primary acknowledged may
never reach the new one, and seeing it come back on the old primary's
channel proves nothing about the replica. So every acknowledged message is
kept (for the history window, within the buffer's bounds) with the
``run_id`` of the server that took it; when the command connection lands on
another server, the kept messages go back in front of the buffer and are
published again. The mark refuses those the new server has (it replicates
with the entry: one script), and the receivers drop a repeated (origin,
sequence), so a failover loses nothing and repeats nothing.

The password stays in the connection settings: logs, errors and metrics
name the broker by :attr:`BrokerConfig.display`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import hiredis

from fastaphlict import resp
from fastaphlict.config import address
from fastaphlict.protocol import HISTORY_LIMIT, HISTORY_TTL_MS
from fastaphlict.ratelimit import Throttle
from fastaphlict.resp import RedisError, RespConnection
from fastaphlict.sentinel import Sentinels
from fastaphlict.stats import BROKER_LATENCY_BUCKETS, BrokerStats

if TYPE_CHECKING:
    from fastaphlict.config import BrokerConfig
    from fastaphlict.hub import Hub
    from fastaphlict.state import Pending

__all__ = ["LATENCY_BUCKETS", "Broker", "BrokerStats", "StreamId", "parse_stream_id"]

log = logging.getLogger("fastaphlict.broker")

#: Key prefix of everything fastaphlict keeps in Redis.
PREFIX = "fastaphlict:"
#: Probes missed in a row before a quiet subscription counts as stalled.
PROBES_MISSED = 3
#: Messages published in one pipeline (each still its own atomic script).
PUBLISH_BATCH = 256
#: Reconnection delays: the first retry is quick, then doubling up to the cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
#: Seconds a fingerprint stays a cluster member after its last probe or
#: message: longer than a history window, so a late relay of its messages
#: by a mesh peer is still recognised.
MEMBER_TTL = 2 * HISTORY_TTL_MS / 1000
#: Sequence numbers remembered per other node, against duplicates (see _seen_before).
SEEN_PER_ORIGIN = 2 * HISTORY_LIMIT
#: Seconds between two prunings of the per-instance and per-node records.
PRUNE_INTERVAL = 60.0
#: An instance whose last entry is older than this (ms) is forgotten: its
#: stream has expired in Redis long before.
READ_TTL_MS = 10 * HISTORY_TTL_MS
#: Entries read per XRANGE call during catch-up, and instances whose first
#: page is asked for in one round trip: at Phorge's ~1 KB a message, a few
#: MB a round trip at most, well inside one ``timeout``.
CATCH_UP_PAGE = 256
CATCH_UP_INSTANCES = 16
#: The smallest page after repeated timeouts, and a catch-up read's deadline
#: in ``timeout``\ s (a page of big messages over a slow link takes a while).
CATCH_UP_PAGE_MIN = 16
CATCH_UP_TIMEOUTS = 4
#: Channel messages held during a catch-up before the link is rebuilt
#: instead (a catch-up that long is better begun again than buffered).
HELD_LIMIT = 100_000

#: Upper bounds (seconds) of the publish latency histogram (kept under this name).
LATENCY_BUCKETS = BROKER_LATENCY_BUCKETS

# KEYS: 1 the instance's stream, 2 the instance set, 3 this message's mark
#       (fastaphlict:seq:<origin>:<sequence>).
# ARGV: 1 instance, 2 origin, 3 sequence, 4 accepted at (ms), 5 payload,
#       6 history limit, 7 history window (ms), 8 channel, 9 "1" to maintain,
#       10 how long the mark is kept (ms).
# Returns the new entry's id, or false when the mark is there: this message
# was published already (a retry after a lost reply). The mark is set after
# the XADD, so a message whose XADD failed (OOM, say) is not marked and its
# retry goes through. The count trim is approximate (whole radix nodes,
# cheap) and on every message; the age trim, the expiries and the instance
# set are kept up to date when the node asks ("maintain": at most once a
# second per instance), which keeps the script at a few microseconds.
_PUBLISH_LUA = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*',
  'o', ARGV[2], 's', ARGV[3], 'a', ARGV[4], 'p', ARGV[5])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[10])
if ARGV[9] == '1' then
  local window = tonumber(ARGV[7])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', KEYS[1], 'MINID', tostring(now - window))
  redis.call('PEXPIRE', KEYS[1], 2 * window)
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 2 * window)
  redis.call('PEXPIRE', KEYS[2], 2 * window)
end
redis.call('PUBLISH', ARGV[8], 'M\\n' .. ARGV[2] .. '\\n' .. ARGV[3] .. '\\n' .. id .. '\\n'
  .. ARGV[4] .. '\\n' .. #ARGV[1] .. '\\n' .. ARGV[1] .. ARGV[5])
return id
"""
#: Milliseconds a published message's mark stays in Redis: a retry after a
#: lost reply, even one saved to the state directory and sent after a
#: restart, comes well within it. About 100 to 150 bytes of Redis memory a
#: message: some 10 MB at 100 messages/s.
MARK_TTL_MS = 10 * 60 * 1000
_PUBLISH_SHA = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()

# The permission check: every command the publish script runs, each in a
# pcall on scratch keys, so a Redis user whose ACL lacks one is told by name
# when the command connection is made, not by the first post failing. Redis
# 7 checks the commands a script runs against the caller's ACL, and its
# error inside a script does not say which command it was.
# KEYS: 1 a scratch stream, 2 a scratch sorted set, 3 a scratch mark.
# ARGV: 1 a scratch channel. Returns {command, error} pairs for each refusal.
# The scratch keys are shared by every node and kept small and short-lived.
# Until the check passes nothing is published: the script would stop half-way.
_CHECK_LUA = """
local refused = {}
local function try(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    refused[#refused + 1] = {string.lower((...)), reply.err}
  end
end
try('EXISTS', KEYS[3])
try('XADD', KEYS[1], 'MAXLEN', '~', '1', '*', 'check', '1')
try('SET', KEYS[3], '1', 'PX', '1000')
try('TIME')
try('XTRIM', KEYS[1], 'MINID', '0')
try('PEXPIRE', KEYS[1], '1000')
try('ZADD', KEYS[2], '0', 'check')
try('ZREMRANGEBYSCORE', KEYS[2], '-inf', '-1')
try('PEXPIRE', KEYS[2], '1000')
try('PUBLISH', ARGV[1], 'C')
return refused
"""
_CHECK_SHA = hashlib.sha1(_CHECK_LUA.encode()).hexdigest()
#: Under the marks' prefix, so an ACL narrower than the README's (one pattern
#: per kind of key) allows them as it allows the marks; never a real mark
#: (fingerprints are hex). The check publishes on the cluster's own channel,
#: where receivers ignore what is neither a message nor a probe.
_CHECK_KEYS = tuple(f"{PREFIX}seq:check:{name}" for name in ("stream", "set", "mark"))
#: What an error from a refused permission says (Redis 6.2 to 7.x, in a script or not).
_PERMISSION_WORDS = ("noperm", "permission", "can't run this command", "acl ")

#: Seconds between two "maintain" publishes of one instance (see the script).
MAINTAIN_INTERVAL = 1.0

#: A stream entry id as (milliseconds, sequence): ordered like Redis orders them.
StreamId = tuple[int, int]


def parse_stream_id(raw: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` as ``(1700000000000, 3)``."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _key(instance: str) -> str:
    return f"{PREFIX}history:{instance}"


def _encode(instance: str) -> bytes:
    return instance.encode("utf-8", "surrogatepass")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


class _Stalled(Exception):
    """The subscription is connected but our own probes stopped coming back."""


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
        self._timeout = timeout
        self._buffer_limit = buffer_limit
        self._buffer_bytes_limit = buffer_bytes
        #: Payload bytes in the buffer (a batch out is counted again if it comes back).
        self._buffer_bytes = 0
        self._probe_interval = probe_interval
        self._stall_after = PROBES_MISSED * probe_interval
        self._ca_file = ca_file
        self._channel = f"{PREFIX}{config.db}:messages"
        self._probe = b"P\n" + self.fingerprint.encode()
        self._script_tail = (HISTORY_LIMIT, int(HISTORY_TTL_MS), self._channel)
        #: (origin, seq, instance, at, payload, accepted monotonic), oldest first.
        self._buffer: collections.deque[tuple[str, int, str, float, bytes, float]] = (
            collections.deque()
        )
        #: The batch being published: out of the buffer, not yet acknowledged.
        self._in_flight: list[tuple[str, int, str, float, bytes, float]] = []
        self._in_flight_bytes = 0
        #: Messages Redis acknowledged lately (the history window, within the
        #: buffer's bounds), in order, and the run_id of the server that did:
        #: published again on another server (see the module docstring).
        self._kept: collections.deque[tuple[str, int, str, float, bytes, float]] = (
            collections.deque()
        )
        self._kept_bytes = 0
        self._kept_on: str | None = None
        self._in_flight_timer: asyncio.TimerHandle | None = None
        self._seq = 0
        self._wakeup = asyncio.Event()
        #: Set by close(): a publisher backing off tries once more at once.
        self._stop_backoff = asyncio.Event()
        self._tried_at_close = False
        #: Origins whose messages this node delivered when they were posted:
        #: itself, and the previous process whose unpublished messages it took over.
        self._own = {self.fingerprint}
        #: Per instance, the last stream id this node has taken in.
        self._read: dict[str, StreamId] = {}
        #: Per other node, the sequence numbers of its messages taken in lately.
        self._seen: dict[str, tuple[set[int], collections.deque[int]]] = {}
        self._members: dict[str, float] = {}
        #: The connection for publishes and probes (made on demand); catch-up
        #: reads have one of their own, per catch-up.
        self._command: RespConnection | None = None
        self._command_lock = asyncio.Lock()
        #: The subscription's connection, from its SUBSCRIBE until it closes.
        self._subscription: RespConnection | None = None
        #: Channel messages held while a catch-up reads the streams (None: not catching up).
        self._held: list[Any] | None = None
        #: Per instance, when this node last asked the script to maintain it.
        self._maintained: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: Link state: subscribed and caught up, and when our last probe came back.
        self._linked = False
        self._last_probe = 0.0
        self._down_since: float | None = None
        self._ever_up = False
        self._dropping = False
        #: Why the subscription was closed on purpose (a stall, a new primary), for the log line.
        self._stall: Exception | None = None
        #: The last publish attempt failed (Redis unreachable, or timing out).
        self._publish_failing = False
        #: The batch out was given up for its timeout (for the log line).
        self._timed_out = False
        #: Since when publishing fails, and why (None: it works).
        self._publish_failing_since: float | None = None
        self._publish_error = ""
        #: Linked, but our first probe has not come back yet; what the catch-up brought.
        self._awaiting_probe = False
        self._caught_up = 0
        #: Redis' run_id when last linked: another one means another server.
        self._run_id: str | None = None
        #: Through Sentinel: who to ask for the primary; its address in use.
        self._sentinels: Sentinels | None = None
        if config.sentinel:
            self._sentinels = Sentinels(
                config,
                timeout=timeout,
                on_switch=self._on_switch,
                ca_file=ca_file,
                name=f"fastaphlict-{self.fingerprint}-sentinel",
            )
        #: The primary's ``host:port`` (or socket path) last connected to.
        self.primary: str | None = None
        #: Set when a sentinel announces a new primary: cuts the subscriber's backoff.
        self._switched = asyncio.Event()
        #: What a catch-up asks for at a time (halved after a read timed out).
        self._catch_up_page = CATCH_UP_PAGE
        self._catch_up_instances = CATCH_UP_INSTANCES
        self._synced = asyncio.Event()
        self._attempted = asyncio.Event()
        self._start_reason = "timed out"
        self._down_logged = False
        #: Wall-clock ms from which a first sync delivers to tabs (see deliver_from).
        self._deliver_from = _now_ms()
        #: Restored messages not yet acknowledged by Redis (nor dropped), and
        #: who is told when none is left (the server removes the saved file).
        self._restored_left = 0
        self.on_restored: Callable[[], None] | None = None
        #: start() has returned: the listeners open, tabs can miss what comes late.
        self._serving = False
        #: ``stats.published`` when the outage began: the "back" line says
        #: how many of the messages that waited went out since.
        self._published_at_down = self._republished_at_down = 0
        self._malformed_log = Throttle("malformed entry from Redis", logger=log)
        #: What the Redis user may not run of what publishing needs (None: all of it).
        self._refused: str | None = None

    def deliver_from(self, at_ms: float) -> None:
        """Deliver to tabs, on an instance's first sync, what was accepted from ``at_ms`` on.

        The default is this node's start: older messages were never its to
        deliver, and its tabs replayed what it had. A node with a state
        directory gives the time its previous process was last known alive:
        what other nodes accepted after that, and is not in the saved history,
        reached none of its tabs (the merge skips payloads the history holds).
        """
        self._deliver_from = at_ms

    # -- state for metrics and the hub ------------------------------------

    @property
    def up(self) -> bool:
        """Subscribed and caught up, our own probe comes back, and publishing works."""
        return (
            self._linked
            and not self._awaiting_probe
            and time.monotonic() - self._last_probe <= self._stall_after
            and not self._publish_stuck()
            and self._refused is None
        )

    def _publish_stuck(self) -> bool:
        """Publishing has failed for longer than one ``timeout`` (OOM, READONLY, an ACL...)."""
        since = self._publish_failing_since
        return since is not None and time.monotonic() - since > self._timeout

    @property
    def buffered(self) -> int:
        """Messages accepted here and not yet acknowledged by Redis."""
        return len(self._buffer) + len(self._in_flight)

    def is_member(self, fingerprint: str) -> bool:
        """Whether ``fingerprint`` is another node of this cluster (seen recently)."""
        seen = self._members.get(fingerprint)
        return seen is not None and time.monotonic() - seen <= MEMBER_TTL

    def members(self) -> list[str]:
        """The other nodes of this cluster seen recently (for the mesh relay's ``touched``)."""
        horizon = time.monotonic() - MEMBER_TTL
        for fp in [fp for fp, seen in self._members.items() if seen < horizon]:
            del self._members[fp]
        return list(self._members)

    # -- the publish path -------------------------------------------------

    def relay(self, instance: str, message: Mapping[str, Any], body: bytes) -> None:
        """Queue a message this node accepted for Redis. Never blocks, never raises."""
        if self._closing:
            self.stats.dropped += 1
            return
        self._seq += 1
        self._append((self.fingerprint, self._seq, instance, _now_ms(), body, time.monotonic()))

    def restore(self, pending: Iterable[Pending]) -> int:
        """Queue the unpublished messages a previous process left; return how many.

        They keep their origin and number (Redis refuses one it already has)
        and their acceptance time; those already out of the history window
        are dropped and counted. Their origin counts as our own: the tabs
        that replayed them from the saved history must not get them again.
        :attr:`on_restored` is called once every one is acknowledged by Redis
        (or dropped by the buffer's bound): until then the caller keeps them.
        """
        horizon = _now_ms() - HISTORY_TTL_MS
        queued = expired = 0
        for origin, seq, instance, saved_at, payload in pending:
            at = self._hub.accepted_at(saved_at, "the state directory's unpublished messages")
            if at < horizon:
                expired += 1
                continue
            self._own.add(origin)
            self._restored_left += 1
            self._append((origin, seq, instance, at, payload, time.monotonic()))
            queued += 1
        self.stats.dropped += expired
        if queued or expired:
            log.info(
                "broker: %d saved message(s) to publish, %d past the history window dropped",
                queued,
                expired,
            )
        return queued

    def _append(self, item: tuple[str, int, str, float, bytes, float]) -> None:
        self._buffer.append(item)
        self._buffer_bytes += len(item[4])
        self._bound()
        self._kick()

    def _bound(self) -> None:
        """Drop the oldest past ``buffer_limit`` messages or ``buffer_bytes`` (never the newest)."""
        buffer = self._buffer
        while len(buffer) > 1 and (
            len(buffer) > self._buffer_limit or self._buffer_bytes > self._buffer_bytes_limit
        ):
            item = buffer.popleft()
            self._buffer_bytes -= len(item[4])
            self._dropped_oldest()
            if item[0] != self.fingerprint:
                self._restored_done(1)

    def _dropped_oldest(self) -> None:
        """Count one message the bound pushed out; the first of a streak is logged."""
        self.stats.dropped += 1
        if not self._dropping:
            self._dropping = True
            log.warning(
                "broker buffer full (%d messages or %d MiB): dropping the oldest; other"
                " nodes' tabs will miss them",
                self._buffer_limit,
                self._buffer_bytes_limit >> 20,
            )

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        r"""Connect, warm the history from Redis, and start the tasks.

        Waits for the first attempt's outcome (at most a few ``timeout``\ s):
        an unreachable Redis is logged and retried in the background, and the
        node serves its own tabs meanwhile.
        """
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="fastaphlict-broker-subscriber"),
            asyncio.create_task(self._publisher(), name="fastaphlict-broker-publisher"),
            asyncio.create_task(self._prober(), name="fastaphlict-broker-probe"),
        ]
        if self._sentinels is not None:
            self._tasks.append(
                asyncio.create_task(self._sentinels.watch(), name="fastaphlict-broker-sentinels")
            )
        # A first catch-up that is reading (a big shared history) is waited
        # for, up to a minute: the listeners must not accept before it.
        started = time.monotonic()
        while not self._attempted.is_set():
            waited = time.monotonic() - started
            if waited > self._timeout * 4 and (self._held is None or waited > 60.0):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._attempted.wait(), 0.1)
        self._serving = True
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
        if not self._tasks:
            return self.abandon()  # never started: nothing could be published
        # Drain while publishing works. After a failure, one more attempt at
        # once (Redis may be back and the publisher only backing off); a new
        # failure, and the rest goes to the caller.
        failures = self.stats.publish_failures
        self._stop_backoff.set()
        self._wakeup.set()
        deadline = time.monotonic() + drain_timeout
        while (
            self.buffered
            and time.monotonic() < deadline
            and self.stats.publish_failures == failures
        ):
            await asyncio.sleep(0.01)
        return self.abandon()

    def abandon(self) -> list[Pending]:
        """Stop at once (also a forced shutdown); return what is still buffered."""
        self._closing = True
        left = [(o, s, i, at, p) for o, s, i, at, p, _ in [*self._in_flight, *self._buffer]]
        self._in_flight = []
        self._buffer.clear()
        self._buffer_bytes = 0
        if self._in_flight_timer is not None:
            self._in_flight_timer.cancel()
        for task in self._tasks:
            task.cancel()
        for conn in (self._command, self._subscription):
            if conn is not None:
                conn.close()
        return left

    async def _connect(self, role: str) -> RespConnection:
        """A connection to the primary: the configured one, or the one the sentinels name."""
        config = self.config
        if self._sentinels is not None:
            host, port = await self._sentinels.primary()
            config = config.primary_at(host, port)
            where = address(host, port)
        else:
            where = config.path or address(config.host, config.port)
        conn = await resp.connect(
            config,
            timeout=self._timeout,
            ca_file=self._ca_file,
            name=f"fastaphlict-{self.fingerprint}-{role}",
        )
        if self._sentinels is not None:
            try:
                # A sentinel's answer lags a failover by seconds: it may name
                # a dead primary (the connect fails) or a demoted one.
                role_reply = await conn.execute(("ROLE",), self._timeout)
                if not (isinstance(role_reply, list) and role_reply[:1] == [b"master"]):
                    kind = role_reply[0].decode() if isinstance(role_reply, list) else "?"
                    raise RedisError(f"{where}, named by the sentinels, is a {kind}, not a primary")
            except BaseException:
                conn.close()
                raise
        self._note_primary(where)
        return conn

    def _note_primary(self, where: str) -> None:
        """A connection reached the primary at ``where``: a new one moves every connection."""
        was = self.primary
        if where == was:
            return
        self.primary = where
        if was is None:
            if self._sentinels is not None:
                log.info(
                    "broker primary is %s (service %s, named by the sentinels)",
                    where,
                    self.config.service,
                )
            return
        self.stats.primary_changes += 1
        log.warning("broker primary is now %s (was %s)", where, was)
        # The connections still on the old primary follow (a new connection
        # is not yet either of these).
        self._leave_primary(f"the primary moved to {where}")

    def _leave_primary(self, why: str) -> None:
        """Close the command connection and the subscription: they reconnect to the primary."""
        if self._subscription is not None:
            self._stall = RedisError(why)  # the reason the subscriber logs
            self._subscription.close()
        if self._command is not None:
            self._command.close()

    def _on_switch(self, host: str, port: int) -> None:
        """A sentinel announced a failover: move now, not at the next failure."""
        where = address(host, port)
        if where == self.primary:
            return
        log.info("broker: the sentinels announce %s as the new primary", where)
        self._leave_primary(f"the sentinels announced {where} as the new primary")
        self._switched.set()
        self._stop_backoff.set()
        self._wakeup.set()

    async def _commands(self) -> RespConnection:
        """The command connection, (re)made on demand with the publish script loaded."""
        async with self._command_lock:
            conn = self._command
            if conn is None or conn.is_closed:
                conn = await self._connect("commands")
                try:
                    sha, _, check, info = await conn.execute_many(
                        [
                            ("SCRIPT", "LOAD", _PUBLISH_LUA),
                            ("SCRIPT", "LOAD", _CHECK_LUA),
                            ("EVALSHA", _CHECK_SHA, 3, *_CHECK_KEYS, self._channel),
                            ("INFO", "server"),
                        ],
                        self._timeout,
                    )
                    refused = _refusals(sha, check)
                    if refused is None and _decode(sha) != _PUBLISH_SHA:
                        raise RedisError(f"SCRIPT LOAD answered {sha!r}, expected {_PUBLISH_SHA}")
                    if isinstance(info, hiredis.ReplyError):
                        raise RedisError(f"INFO refused: {info}")
                    run_id = _run_id(info)
                except BaseException:
                    conn.close()
                    raise
                # Refused or not, the connection stays: probes need only PUBLISH,
                # and the link and the log say what is missing.
                self._note_refused(refused)
                # No await from here until the connection is in use: what the
                # previous server may have lost goes first.
                self._republish_on(run_id)
                self._command = conn
            return conn

    def _republish_on(self, run_id: str | None) -> None:
        """Publishing goes to server ``run_id`` now: another one gets the kept messages again."""
        if run_id == self._kept_on:
            return
        # Another server has not seen this node's "maintain" (the instance
        # set): the first publish of each instance there does it again.
        self._maintained.clear()
        kept = self._kept
        if kept:
            self.stats.republished += len(kept)
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

    def _note_refused(self, refused: str | None) -> None:
        """Say once, in one line, what the Redis user may not run; and when it may again."""
        if refused == self._refused:
            return
        if refused is not None:
            log.error(
                "broker %s: the Redis user may not run %s: no message can be published"
                " until it may; grant what the README's ACL line lists",
                self.display,
                refused,
            )
        elif self._refused is not None:
            log.info("broker %s: the Redis user may publish now", self.display)
            self._wakeup.set()  # what was held goes now
        self._refused = refused

    async def _command_reply(self, command: tuple[Any, ...]) -> Any:
        """One command on the command connection, bounded by ``timeout``."""
        return await (await self._commands()).execute(command, self._timeout)

    # -- the link: subscribe, catch up, read, watch the probes -------------

    async def _subscriber(self) -> None:
        """Keep the subscription up; after each (re)connection, catch up first."""
        delay = BACKOFF_FIRST
        while not self._closing:
            conn: RespConnection | None = None
            try:
                conn = await self._connect("subscription")
                # From the SUBSCRIBE on, channel messages are held until the
                # streams have been read (see the module docstring).
                self._held = []
                self._subscription = conn
                conn.on_push = self._on_push
                reply = await conn.execute(("SUBSCRIBE", self._channel), self._timeout)
                if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                    raise RedisError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                # The catch-up reads on a connection of their own: a slow read
                # times out there without closing the one publishes use.
                reads = await self._connect("catch-up")
                try:
                    await self._check_identity(reads)
                    caught_up = await self._catch_up(reads)
                finally:
                    reads.close()
                held, self._held = self._held, None
                for message in held:
                    self._on_message(message)
                self._last_probe = time.monotonic()
                self._linked = True
                delay = BACKOFF_FIRST
                # Up once our own probe has made the round trip (see _on_message).
                self._caught_up = caught_up
                self._awaiting_probe = True
                self._send_probe()
                await conn.closed
                raise self._stall or RedisError("subscription connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_down(_reason(exc))
            finally:
                self._linked = False
                self._awaiting_probe = False
                self._held = None
                self._stall = None
                self._subscription = None
                if conn is not None:
                    conn.close()
            if self._closing:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._switched.wait(), delay)
            self._switched.clear()
            delay = min(delay * 2, BACKOFF_CAP)

    async def _catch_up(self, reads: RespConnection) -> int:
        """Read every instance's stream past what this node has; return how many were new to it.

        An instance read for the first time (at start, Redis unreachable
        until now, or a Redis that is not the one of before) is merged whole
        with what the node already holds; later ones continue from the last
        id taken in. The position moves only once an instance's entries are
        all read and delivered: a read that fails midway is read again.
        Messages are merged in by acceptance time, so each keeps its age.
        The first page of many instances is asked for in one round trip;
        after a read that timed out (big messages, a slow link) the next
        catch-up asks for half as much at a time.
        """
        deadline = CATCH_UP_TIMEOUTS * self._timeout
        try:
            names = await reads.execute(("ZRANGE", f"{PREFIX}instances", 0, -1), deadline)
            instances = []
            for raw in names:
                try:
                    instances.append(_decode(raw))
                except (ValueError, AttributeError) as exc:
                    self._malformed(f"member {raw!r:.80} of {PREFIX}instances", exc)
            new = 0
            step = self._catch_up_instances
            for first in range(0, len(instances), step):
                chunk = instances[first : first + step]
                commands = [self._page_command(i, self._read.get(i)) for i in chunk]
                pages = await reads.execute_many(commands, deadline)
                for instance, page in zip(chunk, pages, strict=True):
                    if isinstance(page, hiredis.ReplyError):
                        raise RedisError(f"XRANGE refused: {page}")
                    new += await self._catch_up_instance(reads, instance, page, deadline)
        except TimeoutError:
            self._catch_up_page = max(CATCH_UP_PAGE_MIN, self._catch_up_page // 2)
            self._catch_up_instances = max(1, self._catch_up_instances // 2)
            raise
        self._catch_up_page, self._catch_up_instances = CATCH_UP_PAGE, CATCH_UP_INSTANCES
        return new

    def _page_command(self, instance: str, after: StreamId | None) -> tuple[Any, ...]:
        start = "-" if after is None else f"({_format_id(after)}"
        return ("XRANGE", _key(instance), start, "+", "COUNT", self._catch_up_page)

    async def _catch_up_instance(
        self, reads: RespConnection, instance: str, page: list[Any], deadline: float
    ) -> int:
        """Take in one instance's entries past its position, from ``page`` on."""
        horizon = _now_ms() - HISTORY_TTL_MS
        last = self._read.get(instance)
        cursor = last
        fresh: list[tuple[float, bytes, bool]] = []
        taken: list[tuple[str, int]] = []
        while True:
            for entry in page:
                try:
                    sid_raw, flat = entry
                    sid = parse_stream_id(sid_raw)
                except (TypeError, ValueError, AttributeError) as exc:
                    # Not an entry Redis could return; nothing to resume from.
                    self._malformed(f"entry {entry!r:.80} of {_key(instance)}", exc)
                    continue
                cursor = sid
                try:
                    origin, seq, at, payload = _entry_fields(flat)
                except (KeyError, TypeError, ValueError) as exc:
                    # One bad entry (written by hand, another program) must
                    # not stop the catch-up of every other: skipped, counted.
                    self._malformed(f"entry {_format_id(sid)} of {_key(instance)}", exc)
                    continue
                own = origin in self._own
                if own and last is not None:
                    continue  # delivered when it was posted here, and in the history
                if not own:
                    self._members[origin] = time.monotonic()
                    if self._seen_before(origin, seq, note=False):
                        continue
                    taken.append((origin, seq))
                if at >= horizon:
                    # Our own go into the history only: our tabs had them.
                    fresh.append((at, payload, not own))
            if len(page) < self._catch_up_page:
                break
            page = await reads.execute(self._page_command(instance, cursor), deadline)
        if last is not None:
            deliver_from = float("-inf")  # past the position: new to every tab here
        elif self._serving:
            deliver_from = self._deliver_from
        else:
            # Warming before the listeners open: no tab to deliver to, and
            # nothing to count as taken in (a restarted node has received nothing).
            deliver_from = float("inf")
        new, delivered = self._hub.merge(instance, fresh, deliver_from=deliver_from)
        self.stats.received += delivered
        for origin, seq in taken:
            self._seen_before(origin, seq)
        if cursor is not None:
            self._read[instance] = cursor
        return new

    def _on_push(self, reply: Any) -> None:
        """A reply nobody waited for on the subscription: hold it, or take it in now."""
        if self._held is not None:
            self._held.append(reply)
            if len(self._held) > HELD_LIMIT and self._subscription is not None:
                self._stall = RedisError("catch-up too long: too many messages held")
                self._subscription.close()
        else:
            try:
                self._on_message(reply)
            except Exception:  # a boundary: one bad message must not end the link
                log.exception("broker: message from the channel failed")

    def _on_message(self, reply: Any) -> None:
        """One message from the channel: another node's message, or a probe."""
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
            return
        data: bytes = reply[2]
        if data.startswith(b"P\n"):
            origin = data[2:].decode("ascii", "replace")
            if origin == self.fingerprint:
                self._last_probe = time.monotonic()
                if self._awaiting_probe and self._linked:
                    self._awaiting_probe = False
                    self._on_up(self._caught_up)
            else:
                self._members[origin] = time.monotonic()
            return
        if not data.startswith(b"M\n"):
            return
        try:
            _, origin_raw, seq_raw, sid_raw, at_raw, size_raw, rest = data.split(b"\n", 6)
            seq = int(seq_raw)
            size = int(size_raw)
            if not 0 <= size <= len(rest):
                raise ValueError(f"instance name of {size} bytes in {len(rest)}")
            instance = _decode(rest[:size])
            payload = rest[size:]
            sid = parse_stream_id(sid_raw)
            at = float(at_raw)
        except ValueError as exc:
            self._malformed(f"message on {self._channel} {data[:80]!r}", exc)
            return
        origin = origin_raw.decode("ascii", "replace")
        last = self._read.get(instance)
        if (
            last is not None
            and sid <= last
            and (origin in self._own or self._seen_before(origin, seq, note=False))
        ):
            return  # the catch-up already took it in
        # An id at or below the position that is not a repeat: a new primary
        # whose clock is behind. Taken in, and the position follows it.
        self._read[instance] = sid
        if origin in self._own or self._seen_before(origin, seq):
            return
        self._members[origin] = time.monotonic()
        self.stats.received += 1
        self._hub.receive(instance, payload, at)

    def _malformed(self, what: str, problem: BaseException) -> None:
        """Count an entry or message that cannot be read; log it, rate-limited."""
        self.stats.malformed += 1
        if self._malformed_log.allow():
            log.warning("broker: skipped unreadable %s: %s", what, _reason(problem))

    def _seen_before(self, origin: str, seq: int, *, note: bool = True) -> bool:
        """Whether ``origin``'s message ``seq`` reached this node already; notes it if not.

        The stream position catches what the catch-up and the channel both
        bring. This catches a message Redis took twice: published, its
        reply lost, then retried on a new primary that had not replicated
        its mark yet. The most recent SEEN_PER_ORIGIN numbers per node are kept.
        """
        seen = self._seen.get(origin)
        if seen is None:
            seen = self._seen[origin] = (set(), collections.deque())
        numbers, order = seen
        if seq in numbers:
            return True
        if not note:
            return False
        numbers.add(seq)
        order.append(seq)
        if len(order) > SEEN_PER_ORIGIN:
            numbers.discard(order.popleft())
        return False

    def _on_up(self, caught_up: int) -> None:
        """The link is up (subscribed, caught up, probe answered): say so once."""
        self._attempted.set()
        if not self._ever_up:
            self._ever_up = True
            self._synced.set()
            log.info(
                "broker %s connected: history in sync (%d message(s) from Redis)%s",
                self.display,
                caught_up,
                "" if self._refused is None else ", but publishing is refused (see above)",
            )
            self._down_logged = False
            self._down_since = None
            return
        self.stats.reconnects += 1
        if not self._publish_stuck():
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

    def _on_down(self, reason: str) -> None:
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
                self._buffer_limit,
            )
        else:
            log.debug("broker %s still down: %s", self.display, reason)

    # -- publishing ---------------------------------------------------------

    async def _publisher(self) -> None:
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
            if not self._publish_failing:
                delay = BACKOFF_FIRST
            elif not self._closing:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_backoff.wait(), delay)
                if not self._closing:
                    self._stop_backoff.clear()  # set by a failover's announcement
                delay = min(delay * 2, BACKOFF_CAP)
            if self._closing and self._publish_failing:
                if self._tried_at_close:
                    continue  # close() takes what is left
                self._tried_at_close = True
            try:
                await self._commands()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_publish_failure(exc)
                self._wakeup.set()
                continue
            self._kick(retry=True)

    def _kick(self, *, retry: bool = False) -> None:
        """Send what is buffered now, unless a batch is out (its replies send the rest).

        Without a usable connection, or after a failure (unless this is the
        publisher's ``retry``), the publisher task is woken instead.
        """
        if self._in_flight or not self._buffer or self._refused is not None:
            # Refused: a script that stops half-way (after its XADD and mark,
            # before its PUBLISH) would count as published on the retry. Held
            # until the check passes (_note_refused).
            return
        conn = self._command
        if conn is None or conn.is_closed or (self._publish_failing and not retry):
            self._wakeup.set()
            return
        buffer = self._buffer
        batch = [buffer.popleft() for _ in range(min(PUBLISH_BATCH, len(buffer)))]
        self._in_flight = batch
        size = sum(len(item[4]) for item in batch)
        self._in_flight_bytes = size
        self._buffer_bytes -= size
        try:
            conn.send_batch(self._commands_for(batch), self._published)
        except Exception as exc:  # a closed transport raises RuntimeError in uvloop
            self._in_flight = []
            conn.close()
            self._publish_failed(batch, exc)
            return
        self._in_flight_timer = asyncio.get_running_loop().call_later(
            self._timeout, self._publish_timed_out, conn
        )

    def _commands_for(
        self, batch: list[tuple[str, int, str, float, bytes, float]]
    ) -> list[tuple[Any, ...]]:
        """The EVALSHA of each message; "maintain" at most once a second per instance."""
        now = time.monotonic()
        maintained = self._maintained
        commands = []
        for origin, seq, instance, at, payload, _ in batch:
            maintain = now - maintained.get(instance, -MAINTAIN_INTERVAL) >= MAINTAIN_INTERVAL
            if maintain:
                maintained[instance] = now
            keys = (_key(instance), f"{PREFIX}instances", f"{PREFIX}seq:{origin}:{seq}")
            args = (_encode(instance), origin, seq, repr(at), payload, *self._script_tail)
            commands.append(
                ("EVALSHA", _PUBLISH_SHA, 3, *keys, *args, "1" if maintain else "0", MARK_TTL_MS)
            )
        if len(maintained) > 4 * len(self._read) + 1024:
            horizon = now - 2 * MAINTAIN_INTERVAL
            for instance in [i for i, at in maintained.items() if at < horizon]:
                del maintained[instance]
        return commands

    def _publish_timed_out(self, conn: RespConnection) -> None:
        """No replies within ``timeout``: the connection's order is lost; close it."""
        self._in_flight_timer = None
        self._timed_out = True
        conn.close()  # tells _published, with ConnectionLost

    def _published(self, replies: list[Any] | None, error: Exception | None) -> None:
        """The replies of the batch out (or why there are none)."""
        if self._in_flight_timer is not None:
            self._in_flight_timer.cancel()
            self._in_flight_timer = None
        batch, self._in_flight = self._in_flight, []
        if not batch:
            return  # abandoned meanwhile
        if error is None:
            for reply in replies or ():
                if isinstance(reply, hiredis.ReplyError):
                    # NOSCRIPT (the cache was flushed) included: a new connection loads it.
                    error = RedisError(str(reply))
                    if self._command is not None:
                        self._command.close()
                    break
        if error is not None:
            if self._timed_out:
                error = TimeoutError(f"no reply from Redis within {self._timeout:g}s")
            self._timed_out = False
            for instance in {item[2] for item in batch}:
                self._maintained.pop(instance, None)
            self._publish_failed(batch, error)
            return
        self._publish_failing = False
        self._publish_failing_since = None
        if self._down_logged and self.up:
            self._on_back()
        acked = time.monotonic()
        observe = self.stats.latency.observe
        for item in batch:
            observe(acked - item[5])
        self.stats.published += len(batch)
        if self._restored_left:
            self._restored_done(sum(item[0] != self.fingerprint for item in batch))
        self._keep(batch)
        if self._dropping and len(self._buffer) <= self._buffer_limit // 2:
            self._dropping = False
            log.info("broker buffer below half again (%d messages)", len(self._buffer))
        self._kick()

    def _restored_done(self, count: int) -> None:
        """``count`` restored messages are in Redis (or dropped); the last one tells."""
        if not count:
            return
        self._restored_left -= count
        if self._restored_left == 0 and self.on_restored is not None:
            self.on_restored()

    def _keep(self, batch: list[tuple[str, int, str, float, bytes, float]]) -> None:
        """Keep an acknowledged batch until it leaves the history window (or the bounds)."""
        kept = self._kept
        kept.extend(batch)
        self._kept_bytes += self._in_flight_bytes
        horizon = _now_ms() - HISTORY_TTL_MS
        while kept and (
            kept[0][3] < horizon
            or len(kept) > self._buffer_limit
            or self._kept_bytes > self._buffer_bytes_limit
        ):
            self._kept_bytes -= len(kept.popleft()[4])

    def _publish_failed(
        self, batch: list[tuple[str, int, str, float, bytes, float]], error: Exception
    ) -> None:
        """Put the batch back at the front, in order; the publisher retries after a pause."""
        self._buffer.extendleft(reversed(batch))
        self._buffer_bytes += sum(len(item[4]) for item in batch)
        self._bound()
        self._note_publish_failure(error)
        self._wakeup.set()

    def _note_publish_failure(self, error: BaseException) -> None:
        self.stats.publish_failures += 1
        self._publish_failing = True
        self._publish_error = _reason(error)
        if self._publish_failing_since is None:
            self._publish_failing_since = time.monotonic()
        log.debug("broker publish failed: %s", self._publish_error)

    def _send_probe(self) -> None:
        """Publish a probe to ourselves now; the subscriber watches for it."""
        task = asyncio.ensure_future(self._command_reply(("PUBLISH", self._channel, self._probe)))
        task.add_done_callback(_probe_sent)

    async def _prober(self) -> None:
        """Every interval: probe the link, give up one whose probes stopped, watch publishing."""
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(self._probe_interval)
            now = time.monotonic()
            if now - pruned > PRUNE_INTERVAL:
                pruned = now
                self._prune()
            if self._publish_stuck() and not self._down_logged:
                self._on_down(f"publishing fails: {self._publish_error}")
            elif self._down_logged and self._ever_up and self.up:
                self._on_back()
            if self._refused is not None and self._command is not None:
                # The operator may have granted it meanwhile: a new command
                # connection runs the check again.
                self._command.close()
            if not self._linked:
                continue
            if now - self._last_probe > self._stall_after:
                subscription = self._subscription
                if subscription is not None:
                    self._stall = _Stalled(
                        f"no probe came back for {self._stall_after:g}s: subscription stalled"
                    )
                    subscription.close()
                continue
            self._send_probe()

    def _prune(self) -> None:
        """Forget instances nobody published to for a long while, and departed nodes."""
        horizon_ms = _now_ms() - READ_TTL_MS
        for instance in [i for i, sid in self._read.items() if sid[0] < horizon_ms]:
            del self._read[instance]
            self._maintained.pop(instance, None)
        members = set(self.members())
        for origin in [o for o in self._seen if o not in members]:
            del self._seen[origin]

    async def _check_identity(self, reads: RespConnection) -> None:
        """A Redis that is not the one of before (restarted empty, failed over): read all again.

        Stream ids come from the server's clock; after a failover to a
        server whose clock is behind, new ids could sort before the ones
        this node has read, and it would skip them. Payloads already held
        are recognised by the merge instead.
        """
        run_id = _run_id(await reads.execute(("INFO", "server"), self._timeout))
        if run_id and self._run_id and run_id != self._run_id and self._read:
            log.info(
                "broker %s is another Redis process than before (restarted or failed over):"
                " reading every instance's window again",
                self.display,
            )
            self._read.clear()
        self._run_id = run_id


def _probe_sent(task: asyncio.Future[Any]) -> None:
    """A probe that failed is only a debug line: the missing answer is what counts."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("broker probe failed: %s", _reason(task.exception()))  # type: ignore[arg-type]


def _refusals(load: Any, check: Any) -> str | None:
    """What the permission check found refused, in words (None: nothing).

    ``load`` is the reply to the publish script's SCRIPT LOAD, ``check`` the
    check script's. Errors that are not about permissions (a replica's
    READONLY, say) are the publish path's business, not the check's.
    """
    if isinstance(load, hiredis.ReplyError):
        if _is_permission(str(load)):
            return f"script|load ({load})"
        raise RedisError(f"SCRIPT LOAD refused: {load}")
    if isinstance(check, hiredis.ReplyError):
        return f"evalsha ({check})" if _is_permission(str(check)) else None
    names: list[str] = []
    errors: list[str] = []
    for pair in check if isinstance(check, list) else ():
        if len(pair) != 2 or not _is_permission(_decode(pair[1])):
            continue
        name = _decode(pair[0])
        if name not in names:
            names.append(name)
            errors.append(_decode(pair[1]))
    if not names:
        return None
    return f"{', '.join(names)} ({errors[0]})"


def _is_permission(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _PERMISSION_WORDS)


def _entry_fields(flat: list[Any]) -> tuple[str, int, float, bytes]:
    """A stream entry's origin, sequence number, acceptance time and payload.

    Raises KeyError, TypeError or ValueError for an entry the publish
    script did not write.
    """
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    payload = fields[b"p"]
    if not isinstance(payload, bytes):
        raise TypeError("the payload is not a string")
    return _decode(fields[b"o"]), int(fields[b"s"]), float(fields[b"a"]), payload


def _run_id(info: bytes) -> str | None:
    """The ``run_id`` of an ``INFO server`` reply: another one is another server process."""
    for line in _decode(info).splitlines():
        if line.startswith("run_id:"):
            return line[7:].strip()
    return None


def _now_ms() -> float:
    return time.time() * 1000.0


def _reason(exc: BaseException) -> str:
    """A failure in words for one log line (never the connection settings)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
