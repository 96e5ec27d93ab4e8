"""The broker's wire, pure: what Redis hands over, read; what is sent, written.

No I/O and no state beyond the values given: the channel's two formats, a
stream entry's fields, the stream ids, the window of sequence numbers
against duplicates, the rule that says when a channel message was already
taken in by the catch-up, and what a refused permission looks like. The
rest of the package (:mod:`.link`, :mod:`.publisher`) does the talking and
keeps the state; this module is table-tested without Redis.

The channel (``fastaphlict:<db>:messages``) carries:

- ``M\\n<origin>\\n<sequence>\\n<stream id>\\n<accepted at ms>\\n<n>\\n<instance><payload>``,
  written by the publish script (``publish.lua``) once the entry is in the
  instance's stream; ``<n>`` is the instance name's length in bytes, so
  neither it nor the payload needs escaping;
- ``P\\n<fingerprint>``: a node's probe (to itself, and its membership);
- anything else (the permission check's ``C``) is ignored.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import hiredis

from fastaphlict.protocol import HISTORY_LIMIT
from fastaphlict.resp import RedisError, RespConnection

__all__ = [
    "PREFIX",
    "ChannelMessage",
    "Events",
    "Node",
    "Probe",
    "SeenWindow",
    "StreamId",
    "decode",
    "encode_message",
    "encode_probe",
    "entry_fields",
    "own_position",
    "parse_stream_id",
    "refusals",
    "taken_in",
]

#: Key prefix of everything fastaphlict keeps in Redis.
PREFIX = "fastaphlict:"
#: Reconnection delays: the first retry is quick, then doubling up to the cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
#: Sequence numbers remembered per other node, against duplicates (see SeenWindow).
SEEN_PER_ORIGIN = 2 * HISTORY_LIMIT
#: What an error from a refused permission says (Redis 6.2 to 7.x, in a script or not).
PERMISSION_WORDS = ("noperm", "permission", "can't run this command", "acl ")

#: A stream entry id as (milliseconds, sequence): ordered like Redis orders them.
StreamId = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Node:
    """What every part of the broker is told about this node and its Redis."""

    #: This process's fingerprint: the origin of what it publishes.
    fingerprint: str
    #: The broker's URL without its password, for logs.
    display: str
    #: The cluster's channel (``fastaphlict:<db>:messages``).
    channel: str
    #: Seconds a command's reply may take.
    timeout: float
    #: Seconds between two probes of the link.
    probe_interval: float = 1.0
    #: The publisher's buffer bounds: messages, and payload bytes.
    buffer_limit: int = 16384
    buffer_bytes: int = 64 * 1024 * 1024
    #: The CA file that verifies a ``rediss://`` server (None: the system's).
    ca_file: str | None = None


class Events(Protocol):
    """What the parts ask of, and tell, the broker that composes them (:class:`Broker`)."""

    async def connect_primary(self, role: str) -> RespConnection:
        """A new connection to the primary, named after its ``role``."""

    async def command_reply(self, command: tuple[Any, ...]) -> Any:
        """One command on the command connection."""

    def link_up(self, caught_up: int) -> None:
        """Subscribed, caught up (``caught_up`` messages new to this node), probe answered."""

    def link_down(self, reason: str) -> None:
        """The subscription failed or could not be made."""

    def batch_published(self) -> None:
        """Redis acknowledged a batch: publishing works."""

    def primary_moved(self, why: str) -> None:
        """A connection found the primary elsewhere: the others must follow."""

    def primary_announced(self, where: str) -> None:
        """A sentinel announced a new primary at ``where``."""

    def server_changed(self, run_id: str | None) -> None:
        """The command connection reached the Redis process ``run_id`` (maybe another one)."""

    def publishing_allowed(self) -> None:
        """What the Redis user was refused is granted now."""

    def instances_read(self) -> int:
        """How many instances' streams this node follows."""


class ChannelMessage(NamedTuple):
    """Another node's message, as the publish script put it on the channel."""

    origin: str
    seq: int
    sid: StreamId
    at: float
    instance: str
    payload: bytes


class Probe(NamedTuple):
    """A node's probe: ``origin`` is alive and subscribed."""

    origin: str


#: ``tuple.__new__``, called directly: a named tuple's own ``__new__`` is Python code.
_tuple_new: Any = tuple.__new__


def parse_stream_id(raw: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` as ``(1700000000000, 3)``."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def key(instance: str) -> str:
    """The Redis key of ``instance``'s stream."""
    return f"{PREFIX}history:{instance}"


def encode_name(instance: str) -> bytes:
    return instance.encode("utf-8", "surrogatepass")


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def encode_probe(fingerprint: str) -> bytes:
    return b"P\n" + fingerprint.encode()


def encode_message(
    origin: str, seq: int, sid: StreamId, at: float, instance: str, payload: bytes
) -> bytes:
    """What the publish script puts on the channel (it writes it in Lua; this is its mirror)."""
    name = encode_name(instance)
    head = f"M\n{origin}\n{seq}\n{format_id(sid)}\n{at!r}\n{len(name)}\n".encode()
    return head + name + payload


def decode(data: bytes) -> ChannelMessage | Probe | None:
    """One channel message read: a message, a probe, or None for what is neither.

    Raises ValueError for a message (``M``) that cannot be read.
    """
    if data.startswith(b"P\n"):
        return Probe(data[2:].decode("ascii", "replace"))
    if not data.startswith(b"M\n"):
        return None
    _, origin_raw, seq_raw, sid_raw, at_raw, size_raw, rest = data.split(b"\n", 6)
    size = int(size_raw)
    if not 0 <= size <= len(rest):
        raise ValueError(f"instance name of {size} bytes in {len(rest)}")
    # Numbers straight from bytes (``int`` and ``float`` read them), and the
    # tuple built without the named tuple's Python-level ``__new__``: this
    # runs for every message of every other node.
    ms, _, sid_seq = sid_raw.partition(b"-")
    return _tuple_new(
        ChannelMessage,
        (
            origin_raw.decode("ascii", "replace"),
            int(seq_raw),
            (int(ms), int(sid_seq or 0)),
            float(at_raw),
            rest[:size].decode("utf-8", "surrogatepass"),
            rest[size:],
        ),
    )


def own_position(data: bytes, start: int) -> tuple[str, StreamId]:
    """The instance and stream id of a message whose origin ends at ``start``.

    For this node's own messages, which come back on the channel: every
    field is read as :func:`decode` reads it (the same ValueError for one
    that cannot be read), but the payload is not copied out: the position
    is all that such a message changes.
    """
    seq_end = data.index(b"\n", start)
    sid_end = data.index(b"\n", seq_end + 1)
    at_end = data.index(b"\n", sid_end + 1)
    size_end = data.index(b"\n", at_end + 1)
    int(data[start:seq_end])
    float(data[sid_end + 1 : at_end])
    size = int(data[at_end + 1 : size_end])
    name_end = size_end + 1 + size
    if size < 0 or name_end > len(data):
        raise ValueError(f"instance name of {size} bytes in {len(data) - size_end - 1}")
    ms, _, sid_seq = data[seq_end + 1 : sid_end].partition(b"-")
    sid = (int(ms), int(sid_seq or 0))
    return data[size_end + 1 : name_end].decode("utf-8", "surrogatepass"), sid


def entry_fields(flat: list[Any]) -> tuple[str, int, float, bytes]:
    """A stream entry's origin, sequence number, acceptance time and payload.

    Raises KeyError, TypeError or ValueError for an entry the publish
    script did not write.
    """
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    payload = fields[b"p"]
    if not isinstance(payload, bytes):
        raise TypeError("the payload is not a string")
    return decode_name(fields[b"o"]), int(fields[b"s"]), float(fields[b"a"]), payload


class SeenWindow:
    """Per other node, the sequence numbers of its messages taken in lately.

    The stream position catches what the catch-up and the channel both
    bring. This catches a message Redis took twice: published, its reply
    lost, then retried on a new primary that had not replicated its mark
    yet. The most recent ``size`` numbers per node are kept.
    """

    __slots__ = ("_origins", "_size")

    def __init__(self, size: int = SEEN_PER_ORIGIN) -> None:
        self._size = size
        self._origins: dict[str, tuple[set[int], collections.deque[int]]] = {}

    def __contains__(self, message: tuple[str, int]) -> bool:
        origin, seq = message
        seen = self._origins.get(origin)
        return seen is not None and seq in seen[0]

    def add(self, origin: str, seq: int) -> bool:
        """Note ``origin``'s message ``seq``; whether it was noted already."""
        seen = self._origins.get(origin)
        if seen is None:
            seen = self._origins[origin] = (set(), collections.deque())
        numbers, order = seen
        if seq in numbers:
            return True
        numbers.add(seq)
        order.append(seq)
        if len(order) > self._size:
            numbers.discard(order.popleft())
        return False

    def keep_only(self, origins: Iterable[str]) -> None:
        """Forget every node but ``origins`` (the departed ones)."""
        keep = set(origins)
        for origin in [o for o in self._origins if o not in keep]:
            del self._origins[origin]

    def __len__(self) -> int:
        return len(self._origins)


def taken_in(last: StreamId | None, sid: StreamId, known: bool) -> bool:
    """Whether a channel message at ``sid`` was already taken in by the catch-up.

    ``last`` is the instance's position, ``known`` whether the message is
    this node's own or a (origin, sequence) already seen. An id at or below
    the position that is not known is a new primary whose clock is behind:
    not taken in, and the position follows it.
    """
    return last is not None and sid <= last and known


def refusals(load: Any, check: Any) -> str | None:
    """What the permission check found refused, in words (None: nothing).

    ``load`` is the reply to the publish script's SCRIPT LOAD, ``check`` the
    check script's. Errors that are not about permissions (a replica's
    READONLY, say) are the publish path's business, not the check's.
    """
    if isinstance(load, hiredis.ReplyError):
        if is_permission(str(load)):
            return f"script|load ({load})"
        raise RedisError(f"SCRIPT LOAD refused: {load}")
    if isinstance(check, hiredis.ReplyError):
        return f"evalsha ({check})" if is_permission(str(check)) else None
    names: list[str] = []
    errors: list[str] = []
    for pair in check if isinstance(check, list) else ():
        if len(pair) != 2 or not is_permission(decode_name(pair[1])):
            continue
        name = decode_name(pair[0])
        if name not in names:
            names.append(name)
            errors.append(decode_name(pair[1]))
    if not names:
        return None
    return f"{', '.join(names)} ({errors[0]})"


def is_permission(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in PERMISSION_WORDS)


def run_id(info: bytes) -> str | None:
    """The ``run_id`` of an ``INFO server`` reply: another one is another server process."""
    for line in decode_name(info).splitlines():
        if line.startswith("run_id:"):
            return line[7:].strip()
    return None


def now_ms() -> float:
    """Wall-clock milliseconds, as acceptance times and stream ids count them."""
    return time.time() * 1000.0


def reason(exc: BaseException) -> str:
    """A failure in words for one log line (never the connection settings)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
