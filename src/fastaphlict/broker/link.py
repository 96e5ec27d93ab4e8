"""The link to Redis: where the primary is, the subscription, the catch-up, the probes.

Receiving, this node takes nothing on trust from the channel alone
(Centrifugo's way): after every (re)connection it subscribes first, then
reads each instance's stream from where it stopped (or the whole window, the
first time), and only then reads the channel, skipping what the streams
already gave by stream position (:func:`.wire.taken_in`). So a node cut off
for a while gets every message of the window it missed, once. Its own
messages are recognised by their origin and skipped: they reached its tabs
when they were posted.

A subscription can stay connected and stop delivering (a failover behind a
proxy, a paused Redis): every node publishes a probe to itself each
``probe_interval``; three intervals without its own probe back and the link
is torn down and rebuilt, catch-up included (:meth:`Link.watch`). The probes
double as the cluster's membership list.

Through Sentinel (``redis+sentinel://``) every connection asks the
sentinels where the primary is (:mod:`.sentinel`) and checks ``ROLE`` on
it (:class:`Primary`); a new primary moves every connection over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import hiredis

from fastaphlict import resp
from fastaphlict.broker import wire
from fastaphlict.broker.sentinel import Sentinels
from fastaphlict.broker.wire import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    PREFIX,
    ChannelMessage,
    Probe,
    SeenWindow,
    StreamId,
)
from fastaphlict.config import address
from fastaphlict.protocol import HISTORY_TTL_MS
from fastaphlict.ratelimit import Throttle
from fastaphlict.resp import RedisError, RespConnection
from fastaphlict.stats import BrokerStats

if TYPE_CHECKING:
    from fastaphlict.config import BrokerConfig
    from fastaphlict.hub import Hub

__all__ = ["MEMBER_TTL", "Link", "Primary"]

log = logging.getLogger("fastaphlict.broker")

#: Probes missed in a row before a quiet subscription counts as stalled.
PROBES_MISSED = 3
#: Seconds a fingerprint stays a cluster member after its last probe or
#: message: longer than a history window, so a late relay of its messages
#: by a mesh peer is still recognised.
MEMBER_TTL = 2 * HISTORY_TTL_MS / 1000
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


class Stalled(Exception):
    """The subscription is connected but our own probes stopped coming back."""


class Primary:
    """Connections to the primary: the configured one, or the one the sentinels name."""

    def __init__(self, config: BrokerConfig, node: wire.Node, events: wire.Events) -> None:
        self._config = config
        self._node = node
        self._events = events
        #: The primary's ``host:port`` (or socket path) last connected to.
        self.where: str | None = None
        #: Through Sentinel: who to ask for the primary.
        self.sentinels: Sentinels | None = None
        if config.sentinel:
            self.sentinels = Sentinels(
                config,
                timeout=node.timeout,
                on_switch=self._switched,
                ca_file=node.ca_file,
                name=f"fastaphlict-{node.fingerprint}-sentinel",
            )

    async def connect(self, role: str) -> RespConnection:
        """A connection to the primary, named after its ``role``."""
        config = self._config
        if self.sentinels is not None:
            host, port = await self.sentinels.primary()
            config = config.primary_at(host, port)
            where = address(host, port)
        else:
            where = config.path or address(config.host, config.port)
        conn = await resp.connect(
            config,
            timeout=self._node.timeout,
            ca_file=self._node.ca_file,
            name=f"fastaphlict-{self._node.fingerprint}-{role}",
        )
        if self.sentinels is not None:
            try:
                # A sentinel's answer lags a failover by seconds: it may name
                # a dead primary (the connect fails) or a demoted one.
                role_reply = await conn.execute(("ROLE",), self._node.timeout)
                if not (isinstance(role_reply, list) and role_reply[:1] == [b"master"]):
                    kind = role_reply[0].decode() if isinstance(role_reply, list) else "?"
                    raise RedisError(f"{where}, named by the sentinels, is a {kind}, not a primary")
            except BaseException:
                conn.close()
                raise
        self._note(where)
        return conn

    def _note(self, where: str) -> None:
        """A connection reached the primary at ``where``: a new one moves every connection."""
        was = self.where
        if where == was:
            return
        self.where = where
        if was is None:
            if self.sentinels is not None:
                log.info(
                    "broker primary is %s (service %s, named by the sentinels)",
                    where,
                    self._config.service,
                )
            return
        log.warning("broker primary is now %s (was %s)", where, was)
        # The connections still on the old primary follow (a new connection
        # is not yet either of these).
        self._events.primary_moved(f"the primary moved to {where}")

    def _switched(self, host: str, port: int) -> None:
        """A sentinel announced a failover: move now, not at the next failure."""
        where = address(host, port)
        if where == self.where:
            return
        log.info("broker: the sentinels announce %s as the new primary", where)
        self._events.primary_announced(where)


class Link:
    """The subscription and what it brings: other nodes' messages, probes, members."""

    def __init__(self, hub: Hub, stats: BrokerStats, node: wire.Node, events: wire.Events) -> None:
        self._hub = hub
        self._stats = stats
        self._node = node
        self._events = events
        #: Origins whose messages this node delivered when they were posted:
        #: itself, and the previous process whose unpublished messages it took over.
        self._own = {node.fingerprint}
        self._probe = wire.encode_probe(node.fingerprint)
        #: How this node's own messages begin on the channel.
        self._echo = f"M\n{node.fingerprint}\n".encode()
        self.stall_after = PROBES_MISSED * node.probe_interval
        self.closing = False
        #: Per instance, the last stream id this node has taken in.
        self.read: dict[str, StreamId] = {}
        self._seen = SeenWindow()
        self._members: dict[str, float] = {}
        #: The subscription's connection, from its SUBSCRIBE until it closes.
        self._subscription: RespConnection | None = None
        #: Channel messages held while a catch-up reads the streams (None: not catching up).
        self._held: list[Any] | None = None
        #: Subscribed and caught up, and when our last probe came back.
        self.linked = False
        self.last_probe = 0.0
        #: Linked, but our first probe has not come back yet; what the catch-up brought.
        self.awaiting_probe = False
        self._caught_up = 0
        #: The last catch-up: messages it brought, seconds it took, when it ended (monotonic).
        self.last_catch_up: tuple[int, float, float] | None = None
        #: Why the subscription was closed on purpose (a stall, a new primary), for the log line.
        self._stall: Exception | None = None
        #: Redis' run_id when last linked: another one means another server.
        self._run_id: str | None = None
        #: Set when a sentinel announces a new primary: cuts the backoff.
        self.switched = asyncio.Event()
        #: What a catch-up asks for at a time (halved after a read timed out).
        self._catch_up_page = CATCH_UP_PAGE
        self._catch_up_instances = CATCH_UP_INSTANCES
        #: The listeners are open: tabs can miss what comes late (see deliver_from).
        self.serving = False
        #: Wall-clock ms from which a first sync delivers to tabs.
        self.deliver_from = wire.now_ms()
        self._malformed_log = Throttle("malformed entry from Redis", logger=log)

    # -- what the broker asks ---------------------------------------------------

    @property
    def up(self) -> bool:
        """Subscribed and caught up, and our own probe comes back."""
        return (
            self.linked
            and not self.awaiting_probe
            and time.monotonic() - self.last_probe <= self.stall_after
        )

    @property
    def catching_up(self) -> bool:
        return self._held is not None

    def adopt(self, origin: str) -> None:
        """``origin``'s messages count as this node's own (a previous process's, restored)."""
        self._own.add(origin)

    def is_member(self, fingerprint: str) -> bool:
        seen = self._members.get(fingerprint)
        return seen is not None and time.monotonic() - seen <= MEMBER_TTL

    def members(self) -> list[str]:
        horizon = time.monotonic() - MEMBER_TTL
        for fp in [fp for fp, seen in self._members.items() if seen < horizon]:
            del self._members[fp]
        return list(self._members)

    def prune(self) -> list[str]:
        """Forget departed nodes and instances nobody published to for long; return those."""
        horizon_ms = wire.now_ms() - READ_TTL_MS
        forgotten = [i for i, sid in self.read.items() if sid[0] < horizon_ms]
        for instance in forgotten:
            del self.read[instance]
        self._seen.keep_only(self.members())
        return forgotten

    def drop(self, why: Exception) -> None:
        """Close the subscription on purpose; ``why`` is what the reconnection logs."""
        if self._subscription is not None:
            self._stall = why
            self._subscription.close()

    def stop(self) -> None:
        self.closing = True
        if self._subscription is not None:
            self._subscription.close()

    def watch(self, now: float) -> None:
        """Each probe interval: give up a link whose probes stopped, or probe it."""
        if not self.linked:
            return
        if now - self.last_probe > self.stall_after:
            self.drop(
                Stalled(f"no probe came back for {self.stall_after:g}s: subscription stalled")
            )
            return
        self._send_probe()

    def _send_probe(self) -> None:
        """Publish a probe to ourselves now; the subscriber watches for it."""
        probe = ("PUBLISH", self._node.channel, self._probe)
        task = asyncio.ensure_future(self._events.command_reply(probe))
        task.add_done_callback(_probe_sent)

    # -- subscribe, catch up ----------------------------------------------------

    async def run(self) -> None:
        """Keep the subscription up; after each (re)connection, catch up first."""
        delay = BACKOFF_FIRST
        while not self.closing:
            conn: RespConnection | None = None
            try:
                conn = await self._events.connect_primary("subscription")
                # From the SUBSCRIBE on, channel messages are held until the
                # streams have been read (see the module docstring).
                self._held = []
                self._subscription = conn
                conn.on_push = self._on_push
                reply = await conn.execute(("SUBSCRIBE", self._node.channel), self._node.timeout)
                if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                    raise RedisError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                # The catch-up reads on a connection of their own: a slow read
                # times out there without closing the one publishes use.
                reads = await self._events.connect_primary("catch-up")
                try:
                    await self._check_identity(reads)
                    began = time.monotonic()
                    caught_up = await self.catch_up(reads)
                    ended = time.monotonic()
                    self.last_catch_up = (caught_up, ended - began, ended)
                finally:
                    reads.close()
                held, self._held = self._held, None
                for message in held:
                    self.on_message(message)
                self.last_probe = time.monotonic()
                self.linked = True
                delay = BACKOFF_FIRST
                # Up once our own probe has made the round trip (see on_message).
                self._caught_up = caught_up
                self.awaiting_probe = True
                self._send_probe()
                await conn.closed
                raise self._stall or RedisError("subscription connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._events.link_down(wire.reason(exc))
            finally:
                self.linked = False
                self.awaiting_probe = False
                self._held = None
                self._stall = None
                self._subscription = None
                if conn is not None:
                    conn.close()
            if self.closing:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.switched.wait(), delay)
            self.switched.clear()
            delay = min(delay * 2, BACKOFF_CAP)

    async def _check_identity(self, reads: RespConnection) -> None:
        """A Redis that is not the one of before (restarted empty, failed over): read all again.

        Stream ids come from the server's clock; after a failover to a
        server whose clock is behind, new ids could sort before the ones
        this node has read, and it would skip them. Payloads already held
        are recognised by the merge instead.
        """
        run_id = wire.run_id(await reads.execute(("INFO", "server"), self._node.timeout))
        if run_id and self._run_id and run_id != self._run_id and self.read:
            log.info(
                "broker %s is another Redis process than before (restarted or failed over):"
                " reading every instance's window again",
                self._node.display,
            )
            self.read.clear()
        self._run_id = run_id

    async def catch_up(self, reads: RespConnection) -> int:
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
        deadline = CATCH_UP_TIMEOUTS * self._node.timeout
        try:
            names = await reads.execute(("ZRANGE", f"{PREFIX}instances", 0, -1), deadline)
            instances = []
            for raw in names:
                try:
                    instances.append(wire.decode_name(raw))
                except (ValueError, AttributeError) as exc:
                    self._malformed(f"member {raw!r:.80} of {PREFIX}instances", exc)
            new = 0
            step = self._catch_up_instances
            for first in range(0, len(instances), step):
                chunk = instances[first : first + step]
                commands = [self._page_command(i, self.read.get(i)) for i in chunk]
                pages = await reads.execute_many(commands, deadline)
                for instance, page in zip(chunk, pages, strict=True):
                    if isinstance(page, hiredis.ReplyError):
                        raise RedisError(f"XRANGE refused: {page}")
                    new += await self.catch_up_instance(reads, instance, page, deadline)
        except TimeoutError:
            self._catch_up_page = max(CATCH_UP_PAGE_MIN, self._catch_up_page // 2)
            self._catch_up_instances = max(1, self._catch_up_instances // 2)
            raise
        self._catch_up_page, self._catch_up_instances = CATCH_UP_PAGE, CATCH_UP_INSTANCES
        return new

    def _page_command(self, instance: str, after: StreamId | None) -> tuple[Any, ...]:
        start = "-" if after is None else f"({wire.format_id(after)}"
        return ("XRANGE", wire.key(instance), start, "+", "COUNT", self._catch_up_page)

    async def catch_up_instance(
        self, reads: RespConnection, instance: str, page: list[Any], deadline: float
    ) -> int:
        """Take in one instance's entries past its position, from ``page`` on."""
        horizon = wire.now_ms() - HISTORY_TTL_MS
        last = self.read.get(instance)
        cursor = last
        fresh: list[tuple[float, bytes, bool]] = []
        taken: list[tuple[str, int]] = []
        while True:
            for entry in page:
                try:
                    sid_raw, flat = entry
                    sid = wire.parse_stream_id(sid_raw)
                except (TypeError, ValueError, AttributeError) as exc:
                    # Not an entry Redis could return; nothing to resume from.
                    self._malformed(f"entry {entry!r:.80} of {wire.key(instance)}", exc)
                    continue
                cursor = sid
                try:
                    origin, seq, at, payload = wire.entry_fields(flat)
                except (KeyError, TypeError, ValueError) as exc:
                    # One bad entry (written by hand, another program) must
                    # not stop the catch-up of every other: skipped, counted.
                    self._malformed(f"entry {wire.format_id(sid)} of {wire.key(instance)}", exc)
                    continue
                own = origin in self._own
                if own and last is not None:
                    continue  # delivered when it was posted here, and in the history
                if not own:
                    self._members[origin] = time.monotonic()
                    if (origin, seq) in self._seen:
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
        elif self.serving:
            deliver_from = self.deliver_from
        else:
            # Warming before the listeners open: no tab to deliver to, and
            # nothing to count as taken in (a restarted node has received nothing).
            deliver_from = float("inf")
        new, delivered = self._hub.merge(instance, fresh, deliver_from=deliver_from)
        self._stats.received += delivered
        for origin, seq in taken:
            self._seen.add(origin, seq)
        if cursor is not None:
            self.read[instance] = cursor
        return new

    # -- the channel ------------------------------------------------------------

    def _on_push(self, reply: Any) -> None:
        """A reply nobody waited for on the subscription: hold it, or take it in now."""
        if self._held is not None:
            self._held.append(reply)
            if len(self._held) > HELD_LIMIT:
                self.drop(RedisError("catch-up too long: too many messages held"))
        else:
            try:
                self.on_message(reply)
            except Exception:  # a boundary: one bad message must not end the link
                log.exception("broker: message from the channel failed")

    def on_message(self, reply: Any) -> None:
        """One message from the channel: another node's message, or a probe."""
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
            return
        data: bytes = reply[2]
        if data.startswith(self._echo):
            # Our own message back: only its position counts (it reached
            # our tabs when it was posted), so its payload is not copied out.
            try:
                instance, sid = wire.own_position(data, len(self._echo))
            except ValueError as exc:
                self._malformed(f"message on {self._node.channel} {data[:80]!r}", exc)
                return
            last = self.read.get(instance)
            if last is None or sid > last:
                self.read[instance] = sid
            return
        try:
            message = wire.decode(data)
        except ValueError as exc:
            self._malformed(f"message on {self._node.channel} {data[:80]!r}", exc)
            return
        if type(message) is ChannelMessage:
            self._take_in(message)
        elif type(message) is Probe:
            self._probed(message.origin)

    def _probed(self, origin: str) -> None:
        if origin == self._node.fingerprint:
            self.last_probe = time.monotonic()
            if self.awaiting_probe and self.linked:
                self.awaiting_probe = False
                self._events.link_up(self._caught_up)
        else:
            self._members[origin] = time.monotonic()

    def _take_in(self, message: ChannelMessage) -> None:
        origin, seq, sid, at, instance, payload = message
        own = origin in self._own
        last = self.read.get(instance)
        # Only a message at or below the position can have been taken in:
        # the rule and its dedup lookup are paid on that rare path alone.
        if (
            last is not None
            and sid <= last
            and wire.taken_in(last, sid, own or (origin, seq) in self._seen)
        ):
            return
        # Not taken in: the position follows it, even below (a new primary
        # whose clock is behind).
        self.read[instance] = sid
        if own or self._seen.add(origin, seq):
            return
        self._members[origin] = time.monotonic()
        self._stats.received += 1
        self._hub.receive(instance, payload, at)

    def _malformed(self, what: str, problem: BaseException) -> None:
        """Count an entry or message that cannot be read; log it, rate-limited."""
        self._stats.malformed += 1
        if self._malformed_log.allow():
            log.warning("broker: skipped unreadable %s: %s", what, wire.reason(problem))


def _probe_sent(task: asyncio.Future[Any]) -> None:
    """A probe that failed is only a debug line: the missing answer is what counts."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("broker probe failed: %s", wire.reason(task.exception()))  # type: ignore[arg-type]
