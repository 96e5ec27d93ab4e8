"""The hub: the one piece of state every listener shares.

The hub owns the instances (each a PHID index plus a history), the process
counters that ``/status/`` reports, the fingerprint, and the relays to other
nodes. The admin side calls :meth:`Hub.publish`; the client side calls
:meth:`Hub.attach`, :meth:`Hub.replay` and friends. Neither side reaches into
the other: everything they share goes through here.

Publishing serialises a message once (orjson), frames it once, stores that
frame in the history, hands it to the Cython fan-out, and passes the same
payload bytes to every relay. Relays (cluster peers, the Redis broker) sit
behind the small :class:`Relay` protocol and must never block. A message
another node already published (from the broker) enters through
:meth:`Hub.receive` or :meth:`Hub.merge` and no relay at all, so it is never
sent back where it came from. Whichever way a message comes, it reaches the
sockets through one delivery step (fan-out and counters, in one place);
only where it goes in the history differs.

Everything a browser chooses is bounded here: an instance exists while it has
sockets or live history and is dropped with the last of them, and histories
expire by time even when nothing is posted (:meth:`Hub.housekeeping`, which
the server runs in slices so no callback holds the loop for long). Replays
use the history's PHID index (:mod:`fastaphlict._history`) and the socket's
paced send, so a replay costs what it sends and arrives whole. A read
(``/status/``, a scrape) changes nothing: it reports the hub as expiry would
leave it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fastaphlict._fanout import Channel, Outbox, Subscriber, build_frame
from fastaphlict._history import History
from fastaphlict.address import describe
from fastaphlict.address import format_address as format_address  # importable here as before
from fastaphlict.protocol import DEFAULT_INSTANCE, HISTORY_LIMIT, HISTORY_TTL_MS, dumps, loads
from fastaphlict.ratelimit import Throttle
from fastaphlict.stats import Stats

if TYPE_CHECKING:
    from picows import WSTransport

__all__ = [
    "DEFAULT_INSTANCE",
    "HISTORY_LIMIT",
    "HISTORY_TTL_MS",
    "History",
    "Hub",
    "Relay",
    "Stats",
    "TimeCap",
]

log = logging.getLogger("fastaphlict.hub")

STATUS_VERSION = 8
#: Milliseconds a message from another node may be older than the newest in
#: the history and still be appended (taking the newest's time).
LATE_MS = 1000.0
#: Milliseconds an acceptance time from elsewhere may lie ahead of this
#: node's clock: NTP keeps nodes far closer. One further ahead would keep
#: its message in the history (and in every replay) for as long as the skew.
FUTURE_TOLERANCE_MS = 1000.0
#: A protocol-level ping (opcode 9, no payload): browsers answer it themselves.
_PING_FRAME = b"\x89\x00"


def now_ms() -> float:
    """Wall-clock milliseconds: history timestamps and ages, as Aphlict keeps them."""
    return time.time() * 1000.0


class Relay(Protocol):
    """Something that carries published messages to other nodes.

    ``relay`` is called on the publish path: it must return at once and never
    raise. ``message`` is the published object, its ``touched`` already holding
    this node's fingerprint, and ``body`` its serialisation, ready to post.
    Neither may be modified: the history and the sockets share them.
    """

    def relay(self, instance: str, message: dict[str, Any], body: bytes) -> None: ...


@dataclass(slots=True)
class Instance:
    """One Phorge instance: its sockets' PHID index, its history, its client counters."""

    name: str
    channel: Channel
    history: History = field(default_factory=lambda: History(HISTORY_LIMIT, HISTORY_TTL_MS))
    clients_total: int = 0

    @property
    def idle(self) -> bool:
        """No socket and no history: nothing left worth keeping."""
        return self.channel.size == 0 and len(self.history) == 0

    def saved(self, now: float) -> list[tuple[float, Any, bytes]]:
        """The live entries as ``(at, subscribers, payload)``, oldest first; drops none."""
        horizon = now - self.history.ttl_ms
        return [
            (at, subscribers, _frame_payload(frame))
            for at, subscribers, frame in self.history.entries()
            if at >= horizon
        ]

    def insert(self, added: list[tuple[float, Any, bytes]]) -> None:
        """Add entries to the history in time order: appended when none is older, else rebuilt."""
        if not added:
            return
        added.sort(key=_entry_time)
        history = self.history
        newest = history.newest()
        if newest is None or added[0][0] >= newest:
            for at, subscribers, frame in added:
                history.add(at, subscribers, frame)
        else:
            merged = sorted([*history.entries(), *added], key=_entry_time)
            history.clear()
            for at, subscribers, frame in merged:
                history.add(at, subscribers, frame)
        history.purge(now_ms())


class TimeCap:
    """Acceptance times from elsewhere, capped at now plus :data:`FUTURE_TOLERANCE_MS`.

    Every acceptance time that was not taken on this node's clock passes
    here: a message from another node, a history read from Redis or the
    state directory, a saved unpublished message. A node whose clock runs
    ahead, or a file from the future, would otherwise make its messages
    outlive the window by the skew and be resent by every replay. The cap
    keeps the order of times (it never moves one before another) and is
    counted (in the hub's ``times_capped``) and logged, rate-limited.
    """

    __slots__ = ("_log", "_stats")

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._log = Throttle("acceptance time in the future", logger=log)

    def __call__(self, at: float, source: str) -> float:
        """``at`` (wall-clock ms, from ``source``), or the cap; not a number counts as ahead."""
        limit = now_ms() + FUTURE_TOLERANCE_MS
        if at <= limit:
            return at
        self._stats.times_capped += 1
        if self._log.allow():
            log.warning(
                "acceptance time from %s lies %.0f ms ahead of this clock: capped at now"
                " (is that node's clock ahead?)",
                source,
                at - limit + FUTURE_TOLERANCE_MS,
            )
        return limit


class Hub:
    """Instances, counters, fingerprint and relays: the only shared state."""

    def __init__(
        self,
        fingerprint: str,
        *,
        debug: bool = False,
        max_subscriptions: int = 4096,
        max_phid_length: int = 512,
        max_instance_length: int = 128,
        max_buffered: int = 1024 * 1024,
        max_subscribers: int = 16384,
    ) -> None:
        self.fingerprint = fingerprint
        self.started = time.monotonic()
        self.stats = Stats()
        self.clients_active = 0  # every instance's open sockets, for the connection cap
        self._channel_limits = (max_subscriptions, max_phid_length)
        self.max_instance_length = max_instance_length
        #: Checked where a post enters (``admin.accept_post``), not in :meth:`receive`.
        self.max_subscribers = max_subscribers
        self._relays: list[Relay] = []
        self._instances: dict[str, Instance] = {}
        # One outbox for every instance: a socket's frames of one loop
        # iteration leave in one write whichever instance published them.
        # A socket may hold two full histories of unread replays, no more.
        self.outbox = Outbox(max_buffered, 2 * HISTORY_LIMIT)
        self._debug = debug
        self._receipt = dumps({"fingerprint": fingerprint})
        self._is_member: Callable[[str], bool] | None = None
        #: Late messages from the broker waiting to be put into their history in order.
        self._late: dict[str, list[tuple[float, Any, bytes]]] = {}
        #: ``accepted_at(at, source)``: every time taken on another clock passes here.
        self.accepted_at = TimeCap(self.stats)

    # -- shared -----------------------------------------------------------

    @property
    def receipt(self) -> bytes:
        """The body of every accepted post: ``{"fingerprint":"..."}``."""
        return self._receipt

    def add_relay(self, relay: Relay) -> None:
        """Carry every message published from now on to other nodes too (see :class:`Relay`)."""
        self._relays.append(relay)

    def join_cluster(self, is_member: Callable[[str], bool]) -> None:
        """Tell the hub which fingerprints belong to this node's broker cluster.

        A post whose ``touched`` names one of them already went through the
        broker, which brings it here too: the post is a loopback, like one
        naming our own fingerprint (a mesh peer bouncing a cluster message).
        """
        self._is_member = is_member

    def instance(self, name: str) -> Instance:
        """The named instance, created on first use."""
        inst = self._instances.get(name)
        if inst is None:
            inst = self._instances[name] = Instance(
                name, Channel(self.outbox, *self._channel_limits)
            )
        return inst

    def instances(self) -> list[Instance]:
        """Every live instance (one with sockets or history)."""
        return list(self._instances.values())

    def _release(self, inst: Instance) -> None:
        """Drop an instance left with nothing: browsers choose instance names freely.

        ``default`` stays: it is one name, and it keeps its ``clients.total``
        counting from the start, as Aphlict's does. A named instance that
        comes back starts its counters again.
        """
        if inst.idle and inst.name != DEFAULT_INSTANCE and self._instances.get(inst.name) is inst:
            del self._instances[inst.name]

    def export_state(self) -> dict[str, list[tuple[float, Any, bytes]]]:
        """Every instance's history as ``(at, subscribers, payload)``, oldest first.

        For the state directory at a graceful stop: payloads, not frames, so
        the file holds the messages' JSON as it was sent.
        """
        now = now_ms()
        saved = ((name, inst.saved(now)) for name, inst in self._instances.items())
        return {name: entries for name, entries in saved if entries}

    def import_state(self, instance: str, entries: Iterable[tuple[float, Any, bytes]]) -> int:
        """Restore saved entries of ``instance`` with their original times; return how many.

        Only entries still inside the history window are kept (the window
        counts from when each was first accepted, not from the restart).
        Call before any listener accepts: entries must arrive oldest first.
        """
        horizon = now_ms() - HISTORY_TTL_MS
        inst = self.instance(instance)
        loaded = 0
        for saved_at, subscribers, payload in entries:
            at = self.accepted_at(saved_at, "the state directory")
            if at >= horizon:
                inst.history.add(at, subscribers, build_frame(payload))
                loaded += 1
        self._release(inst)
        return loaded

    def on_slow_client(self, handler: Callable[[Subscriber], None]) -> None:
        """Who closes a socket that falls behind a paced replay (the client side)."""
        self.outbox.on_overflow = handler

    # -- what the listeners report (the counters are the hub's to write) ---

    def reject_post(self) -> None:
        """An admin post was refused (not a JSON object, too large, over a limit)."""
        self.stats.posts_rejected += 1

    def reject_frame(self) -> None:
        """A client frame was refused (malformed, a protocol error, too large)."""
        self.stats.frames_rejected += 1

    def slow_client_closed(self) -> None:
        """A socket was closed for not reading what it was sent."""
        self.stats.slow_disconnects += 1

    # -- admin side -------------------------------------------------------

    def publish(self, instance: str, message: dict[str, Any]) -> int | None:
        """Store, deliver and relay one posted message; return the sockets reached.

        A message whose ``touched`` already holds our fingerprint is a loopback
        from a peer ring: it was handled when it first arrived, so it is
        dropped here and None is returned (the poster still gets its receipt).
        """
        touched = message.get("touched")
        if not isinstance(touched, list):
            touched = []
        if self.fingerprint in touched or (
            self._is_member is not None
            and any(isinstance(fp, str) and self._is_member(fp) for fp in touched)
        ):
            if self._debug:
                log.debug("loopback dropped: instance=%s touched=%s", instance, touched)
            return None
        touched = [*touched, self.fingerprint]
        message["touched"] = touched

        payload = dumps(message)
        subscribers, frame = message.get("subscribers"), build_frame(payload)
        inst = self.instance(instance)
        inst.history.add(now_ms(), subscribers, frame)
        sent = self._deliver(inst, subscribers, frame)
        for relay in self._relays:
            try:
                relay.relay(instance, message, payload)
            except Exception:  # a relay must not fail a publish; see Relay
                log.exception("relay %r raised; message still delivered locally", relay)
        return sent

    def receive(self, instance: str, payload: bytes, at: float) -> int:
        """Store and deliver a message another node published; return the sockets reached.

        ``payload`` is the message as its first node serialised it (its
        ``touched`` included) and ``at`` when that node accepted it, so ages
        count from then. Nothing is relayed: the broker already carried it
        to every node, and a mesh peer must not get it from two nodes.

        A message more than :data:`LATE_MS` older than the history's newest
        (one published late, after its node was cut off from Redis) is
        delivered at once and put into the history in time order once the
        burst it came in has been read. One only a little older (nodes
        accepting posts at the same moment, clocks a little apart) takes the
        newest's time: a rebuild of the history per message would cost a
        hundred times the message.

        The limits on posts (``max_subscribers``) are not checked again: the
        node that took the post checked them, and a node dropping what the
        others deliver would give tabs and replays a different history on
        each node. Nodes of one cluster are meant to share their limits.
        """
        at = self.accepted_at(at, "another node")
        subscribers, frame = _subscribers(payload), build_frame(payload)
        inst = self.instance(instance)
        newest = inst.history.newest()
        if newest is None or at >= newest - LATE_MS:
            inst.history.add(at, subscribers, frame)
        else:
            late = self._late.setdefault(instance, [])
            if not late:
                asyncio.get_running_loop().call_soon(self._settle, instance)
            late.append((at, subscribers, frame))
        return self._deliver(inst, subscribers, frame)

    def _settle(self, instance: str) -> None:
        """Put the late messages of ``instance`` into its history, in time order."""
        late = self._late.pop(instance, [])
        if late:
            inst = self.instance(instance)
            inst.insert(late)
            self._release(inst)

    def merge(
        self,
        instance: str,
        entries: Iterable[tuple[float, bytes, bool]],
        *,
        deliver_from: float = 0.0,
    ) -> tuple[int, int]:
        """Merge ``(at, payload, deliver)`` entries of ``instance`` read from the broker.

        Entries whose payload the history already holds (loaded from the
        state directory, say) are skipped. The new ones with ``deliver`` set
        and accepted at or after ``deliver_from`` go to the sockets and count
        in ``messages.in``; all new ones go into the history in time order,
        so each keeps its true age (a node warming its history at start has
        received nothing yet, as a restarted Aphlict). Returns how many
        entries were new, and how many of them were delivered.
        """
        entries = list(entries)
        if not entries:
            return 0, 0
        inst = self.instance(instance)
        known = {_frame_payload(frame) for _, _, frame in inst.history.entries()}
        added: list[tuple[float, Any, bytes]] = []
        delivered = 0
        for read_at, payload, deliver in entries:
            if payload in known:
                continue
            known.add(payload)
            at = self.accepted_at(read_at, "Redis")
            subscribers = _subscribers(payload)
            frame = build_frame(payload)
            if deliver and at >= deliver_from:
                delivered += 1
                self._deliver(inst, subscribers, frame)
            added.append((at, subscribers, frame))
        inst.insert(added)
        self._release(inst)
        return len(added), delivered

    def _deliver(self, inst: Instance, subscribers: Any, frame: bytes) -> int:
        """The one delivery step of every message, posted or from another node.

        Fan-out to the sockets and the counters ``/status/`` reports, in one
        place. Where the message goes in the history is the caller's: at the
        end (:meth:`publish`), or in time order (:meth:`merge`, a late one in
        :meth:`receive`).
        """
        self.stats.messages_in += 1
        if self._debug:
            _trace(inst, subscribers, frame)
        sent = inst.channel.publish(subscribers, frame)
        self.stats.messages_out += sent
        return sent

    def sweep(self) -> int:
        """One whole round of server pings at once; returns how many were dead."""
        return sum(self.housekeeping(batch=1 << 62, expire=False))

    def housekeeping(
        self, batch: int = 500, *, sweep: bool = True, expire: bool = True
    ) -> Iterator[int]:
        """One round of periodic work, in slices of at most ``batch`` items.

        With ``sweep``, pings quiet sockets and drops dead ones (see
        ``Channel.sweep``); with ``expire``, purges every history by time and drops instances
        left with nothing, so an idle instance's stale history is freed (the
        reads, ``/status/`` and ``/metrics``, never expire: they count only
        live entries, see :meth:`held`). Yields after each slice, the sockets found
        dead in it: the server awaits between slices, so with 15000 sockets
        or 20000 instances no single callback holds the loop for long.
        """
        for inst in list(self._instances.values()) if sweep else ():
            subs = inst.channel.subscribers()
            for start in range(0, len(subs), batch):
                dead = inst.channel.sweep(_PING_FRAME, subs[start : start + batch])
                self.stats.dead_disconnects += dead
                yield dead
            self._release(inst)
        if not expire:
            return
        names = list(self._instances)
        for start in range(0, len(names), batch):
            now = now_ms()
            for name in names[start : start + batch]:
                inst = self._instances.get(name)
                if inst is not None:
                    inst.history.purge(now)
                    self._release(inst)
            yield 0

    def held(self) -> list[tuple[Instance, int]]:
        """Every instance expiry would keep, with its live history size; changes nothing.

        What a scrape reports: the hub as :meth:`housekeeping` would leave it
        (no expired entry, no instance left with nothing), read without
        running it, so a read never writes.
        """
        now = now_ms()
        out = []
        for inst in self._instances.values():
            size = inst.history.live(now)[0]
            if size or inst.channel.size or inst.name == DEFAULT_INSTANCE:
                out.append((inst, size))
        return out

    def status(self, instance: str) -> dict[str, Any]:
        """The ``/status/`` object for one instance, keys in Aphlict's order.

        The history counts as purged (Aphlict purges it when read) but is
        not: only live entries count, and nothing is dropped or created (an
        instance never seen answers with zeros).
        """
        inst = self._instances.get(instance)
        now = now_ms()
        if inst is not None:
            size, oldest = inst.history.live(now)
            active, total = inst.channel.size, inst.clients_total
        else:
            oldest, active, total, size = None, 0, 0, 0
        return {
            "instance": instance,
            "uptime": int((time.monotonic() - self.started) * 1000),
            "clients.active": active,
            "clients.total": total,
            "messages.in": self.stats.messages_in,
            "messages.out": self.stats.messages_out,
            "history.size": size,
            # The wall clock can step back (NTP): an age is never negative.
            "history.age": None if oldest is None else max(0, int(now - oldest)),
            "version": STATUS_VERSION,
        }

    # -- client side ------------------------------------------------------

    def attach(self, instance: str, transport: WSTransport) -> Subscriber:
        """Register a newly opened socket of ``instance``."""
        inst = self.instance(instance)
        inst.clients_total += 1
        self.clients_active += 1
        return inst.channel.attach(transport)

    def detach(self, instance: str, sub: Subscriber) -> None:
        """Forget a closed socket and all its subscriptions (once per attach).

        The instance goes too when this was its last socket and it holds no
        history.
        """
        self.clients_active -= 1
        sub.channel.detach(sub)
        inst = self._instances.get(instance)
        if inst is not None and inst.channel is sub.channel:
            inst.history.purge(now_ms())
            self._release(inst)

    @staticmethod
    def subscribe(sub: Subscriber, phids: list[Any]) -> bool:
        """Add PHIDs to a socket's subscriptions; False once past its limit."""
        return sub.channel.subscribe(sub, phids)

    @staticmethod
    def unsubscribe(sub: Subscriber, phids: list[Any]) -> None:
        """Remove PHIDs from a socket's subscriptions."""
        sub.channel.unsubscribe(sub, phids)

    def replay(self, instance: str, sub: Subscriber, age_ms: float) -> int:
        """Resend this instance's recent messages that ``sub`` listens to, oldest first.

        The history's PHID index picks the frames (cost: the socket's PHIDs
        plus the matched entries); the socket sends them paced by its drain,
        ahead of anything published later. Returns how many were queued.
        Replays are not counted in ``messages.out``.
        """
        self.stats.replays += 1
        inst = self._instances.get(instance)
        if inst is None:
            return 0
        frames = inst.history.select(sub.subscriptions(), now_ms(), age_ms)
        sent = sub.replay(frames) if frames else 0
        self.stats.replayed += sent
        return sent


#: Messages from other nodes that are not JSON: logged, rate-limited.
_UNREADABLE = Throttle("unreadable message from another node", logger=log)


def _entry_time(entry: tuple[float, Any, bytes]) -> float:
    return entry[0]


def _subscribers(payload: bytes) -> Any:
    """The ``subscribers`` of a serialised message (None when it has none or is unreadable)."""
    try:
        message = loads(payload)
    except ValueError:
        if _UNREADABLE.allow():
            log.warning("unreadable message from another node: %r", payload[:120])
        return None
    return message.get("subscribers") if isinstance(message, dict) else None


def _frame_payload(frame: bytes) -> bytes:
    """The payload of a frame from ``build_frame`` (unmasked, 2, 4 or 10 header bytes)."""
    size = frame[1] & 0x7F
    return frame[2 if size < 126 else 4 if size == 126 else 10 :]


def _trace(inst: Instance, subscribers: Any, frame: bytes) -> None:
    """Debug lines of one delivery: the message, then each socket it reaches."""
    targets = inst.channel.match(subscribers)
    log.debug(
        "publish instance=%s to %d socket(s): %s",
        inst.name,
        len(targets),
        _frame_payload(frame)[:200].decode("utf-8", "replace"),
    )
    for sub in targets:
        log.debug("deliver to %s", describe(sub.transport))
