"""The hub: the one piece of state every listener shares.

The hub owns the instances (each a PHID index plus a history), the process
counters that ``/status/`` reports, the fingerprint, and the relays to other
nodes. The admin side calls :meth:`Hub.publish`; the client side calls
:meth:`Hub.attach`, :meth:`Hub.replay` and friends. Neither side reaches into
the other: everything they share goes through here.

Publishing serialises a message once (orjson), frames it once, stores that
frame in the history, hands it to the Cython fan-out, and passes the same
payload bytes to every relay. Relays (cluster peers today, a broker tomorrow)
sit behind the small :class:`Relay` protocol and must never block.

Everything a browser chooses is bounded here: an instance exists while it has
sockets or live history and is dropped with the last of them, and histories
expire by time even when nothing is posted (:meth:`Hub.housekeeping`, which
the server runs in slices so no callback holds the loop for long). Replays
use the history's PHID index (:mod:`fastaphlict._history`) and the socket's
paced send, so a replay costs what it sends and arrives whole.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from fastaphlict._fanout import Channel, Outbox, Subscriber, build_frame
from fastaphlict._history import History

if TYPE_CHECKING:
    from picows import WSTransport

__all__ = [
    "DEFAULT_INSTANCE",
    "HISTORY_LIMIT",
    "HISTORY_TTL_MS",
    "MAX_DEPTH",
    "History",
    "Hub",
    "NestingTooDeep",
    "Relay",
    "describe",
    "dumps",
    "format_address",
    "loads",
    "replay_age",
]

log = logging.getLogger("fastaphlict.hub")

DEFAULT_INSTANCE = "default"
HISTORY_LIMIT = 4096
HISTORY_TTL_MS = 60_000
STATUS_VERSION = 8
#: A protocol-level ping (opcode 9, no payload): browsers answer it themselves.
_PING_FRAME = b"\x89\x00"


def now_ms() -> float:
    """Wall-clock milliseconds: history timestamps and ages, as Aphlict keeps them."""
    return time.time() * 1000.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_or_null(text: str) -> float | None:
    # JSON.parse reads 1e400 as Infinity and JSON.stringify writes it as null;
    # keeping inf would let a frame carry "Infinity", which no browser parses.
    value = float(text)
    return value if math.isfinite(value) else None


#: Deepest nesting of arrays and objects a message may have (``[]`` is 1 deep).
#: orjson writes at most this deep (it reads up to 1024), so every value that
#: :func:`loads` returns goes out on orjson's fast path, and the admin and
#: client ports refuse exactly the same inputs. A Phorge message is 2 deep.
MAX_DEPTH = 254


class NestingTooDeep(ValueError):
    """JSON nested deeper than :data:`MAX_DEPTH`: refused like invalid JSON."""

    def __init__(self) -> None:
        super().__init__(f"JSON nested deeper than {MAX_DEPTH}")


#: A body this short can't hold more than MAX_DEPTH levels: each costs 2 bytes.
_SHALLOW_BODY = 2 * MAX_DEPTH + 1


def _deeper_than(value: Any, limit: int, source: bytes | str | None = None) -> bool:
    """Whether ``value`` nests lists and dicts more than ``limit`` deep.

    Each container of ``value`` came from one ``[`` or ``{`` of ``source``:
    when the text holds at most ``limit`` of them, the answer is no without
    touching the value. Finding them is memchr, a few hundred ns for a post
    of any size, far less than counting bytes or walking the value, so the
    walk is left to unusual bodies. The walk is iterative (no depth can
    overflow the stack) and stops at the first container past the limit.
    """
    if not isinstance(value, (list, dict)):
        return False
    if source is not None:
        found = 0
        for opener in ("[", "{") if isinstance(source, str) else (b"[", b"{"):
            at = source.find(opener)  # type: ignore[arg-type]
            while at >= 0 and found <= limit:
                found += 1
                at = source.find(opener, at + 1)  # type: ignore[arg-type]
        if found <= limit:
            return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


def loads(body: bytes | str) -> Any:
    """Decode JSON as JavaScript's ``JSON.parse`` would, up to :data:`MAX_DEPTH` deep.

    orjson is the fast path. It refuses lone UTF-16 surrogates in ``\\u``
    escapes and numbers beyond a double, which JavaScript accepts, so those
    fall back to the standard library (told to refuse ``NaN`` and
    ``Infinity``, and to read an overflowing number as null, as a browser
    would after its own round trip).
    Raises ``ValueError`` on invalid JSON and :class:`NestingTooDeep` (a
    ``ValueError``) past :data:`MAX_DEPTH`; never ``RecursionError``.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_or_null)
        except RecursionError:
            raise NestingTooDeep() from None
    if len(body) > _SHALLOW_BODY and _deeper_than(value, MAX_DEPTH, body):
        raise NestingTooDeep()
    return value


def dumps(value: Any) -> bytes:
    """Encode compactly as UTF-8, key order kept, without ``\\u`` escapes.

    A lone surrogate (see :func:`loads`) can't be UTF-8: it goes out as its
    ``\\uXXXX`` escape, as ``JSON.stringify`` writes it, so the frame stays
    valid UTF-8 and no browser drops the connection over it. A value nested
    past :data:`MAX_DEPTH` raises :class:`NestingTooDeep`, whichever encoder
    would have taken it: what :func:`loads` refuses, this never writes.
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a surrogate, a huge int, or depth
        if _deeper_than(value, MAX_DEPTH):
            raise NestingTooDeep() from None
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


def replay_age(data: Any) -> float | None:
    """The replay window in ms for a ``replay`` command's ``data``, or None to ignore it.

    Aphlict's rule: a missing, zero or non-numeric age means the default
    (60 s); a negative age means nothing; the window never exceeds the
    history's retention. ``data`` itself must be an object, or null/missing.
    """
    if data is None:
        return float(HISTORY_TTL_MS)
    if not isinstance(data, dict):
        return None
    age = data.get("age")
    if isinstance(age, bool) or not isinstance(age, (int, float)) or age == 0:
        return float(HISTORY_TTL_MS)
    if isinstance(age, float) and math.isnan(age):  # a huge int is no float
        return float(HISTORY_TTL_MS)
    if age < 0:
        return -1.0
    return float(min(age, HISTORY_TTL_MS))


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
    ) -> None:
        self.fingerprint = fingerprint
        self.started = time.monotonic()
        self.messages_in = 0
        self.messages_out = 0
        self.clients_active = 0  # every instance's open sockets, for the connection cap
        self._channel_limits = (max_subscriptions, max_phid_length)
        self.max_instance_length = max_instance_length
        # Counters for /metrics (read at scrape time only).
        self.replays = 0
        self.replayed = 0
        self.frames_rejected = 0
        self.posts_rejected = 0
        self.slow_disconnects = 0
        self.dead_disconnects = 0
        self.relays: list[Relay] = []
        self._instances: dict[str, Instance] = {}
        # One outbox for every instance: a socket's frames of one loop
        # iteration leave in one write whichever instance published them.
        self.outbox = Outbox(max_buffered)
        self._debug = debug
        self._receipt = dumps({"fingerprint": fingerprint})

    # -- shared -----------------------------------------------------------

    @property
    def receipt(self) -> bytes:
        """The body of every accepted post: ``{"fingerprint":"..."}``."""
        return self._receipt

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

    def on_slow_client(self, handler: Callable[[Subscriber], None]) -> None:
        """Who closes a socket that falls behind a paced replay (the client side)."""
        self.outbox.on_overflow = handler

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
        if self.fingerprint in touched:
            if self._debug:
                log.debug("loopback dropped: instance=%s touched=%s", instance, touched)
            return None
        touched = [*touched, self.fingerprint]
        message["touched"] = touched

        payload = dumps(message)
        frame = build_frame(payload)
        subscribers = message.get("subscribers")
        inst = self.instance(instance)
        inst.history.add(now_ms(), subscribers, frame)
        self.messages_in += 1

        if self._debug:
            self._trace_delivery(inst, subscribers, payload)
        sent = inst.channel.publish(subscribers, frame)
        self.messages_out += sent

        for relay in self.relays:
            try:
                relay.relay(instance, message, payload)
            except Exception:  # a relay must not fail a publish; see Relay
                log.exception("relay %r raised; message still delivered locally", relay)
        return sent

    def _trace_delivery(self, inst: Instance, subscribers: Any, payload: bytes) -> None:
        targets = inst.channel.match(subscribers)
        log.debug(
            "publish instance=%s to %d socket(s): %s",
            inst.name,
            len(targets),
            payload[:200].decode("utf-8", "replace"),
        )
        for sub in targets:
            log.debug("deliver to %s", describe(sub.transport))

    def sweep(self) -> int:
        """One whole round of server pings at once; returns how many were dead."""
        return sum(self.housekeeping(batch=1 << 62, expire=False))

    def housekeeping(
        self, batch: int = 500, *, sweep: bool = True, expire: bool = True
    ) -> Iterator[int]:
        """One round of periodic work, in slices of at most ``batch`` items.

        With ``sweep``, pings quiet sockets and drops dead ones (see
        ``Channel.sweep``); with ``expire``, purges every history by time and drops instances
        left with nothing, so an idle instance's stale history never shows in
        ``/status/`` or ``/metrics``. Yields after each slice, the sockets found
        dead in it: the server awaits between slices, so with 15000 sockets
        or 20000 instances no single callback holds the loop for long.
        """
        for inst in list(self._instances.values()) if sweep else ():
            subs = inst.channel.subscribers()
            for start in range(0, len(subs), batch):
                dead = inst.channel.sweep(_PING_FRAME, subs[start : start + batch])
                self.dead_disconnects += dead
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

    def status(self, instance: str) -> dict[str, Any]:
        """The ``/status/`` object for one instance, keys in Aphlict's order.

        An instance never seen answers with zeros; it is not created.
        """
        inst = self._instances.get(instance)
        now = now_ms()
        if inst is not None:
            inst.history.purge(now)
            oldest = inst.history.oldest()
            self._release(inst)
            active, total, size = inst.channel.size, inst.clients_total, len(inst.history)
        else:
            oldest, active, total, size = None, 0, 0, 0
        return {
            "instance": instance,
            "uptime": int((time.monotonic() - self.started) * 1000),
            "clients.active": active,
            "clients.total": total,
            "messages.in": self.messages_in,
            "messages.out": self.messages_out,
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
        self.replays += 1
        inst = self._instances.get(instance)
        if inst is None:
            return 0
        frames = inst.history.select(sub.subscriptions(), now_ms(), age_ms)
        sent = sub.replay(frames) if frames else 0
        self.replayed += sent
        return sent


def format_address(host: object, port: object = None) -> str:
    """The one address format of log lines: ``127.0.0.1:44846``, ``[::1]:44846``.

    Also takes a socket name tuple as ``host`` (IPv6 ones have four fields).
    """
    if isinstance(host, (tuple, list)) and host:
        host, port = host[0], host[1] if len(host) > 1 else None
    text = str(host)
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"
    return text if port is None else f"{text}:{port}"


def describe(transport: WSTransport) -> str:
    """The remote address of a socket, for log lines."""
    try:
        peername = transport.underlying_transport.get_extra_info("peername")
    except Exception:
        return "?"
    return format_address(peername) if peername else "?"
