# cython: language_level=3
"""Fan-out: the PHID index of one instance, matching, framing and writing.

This is the hot path of every publish. It owns nothing but the index: which
open socket listens to which PHID. It never parses JSON, never logs and never
raises into the publisher.

* :class:`Channel` indexes the sockets of one instance by PHID. Matching a
  message costs O(len(subscribers) + matched sockets): it looks up each
  subscriber PHID in a dict and never scans the sockets.
* :func:`build_frame` turns a payload into one unmasked server text frame. The
  publisher builds it once and the very same bytes go to every target.
* :class:`Outbox` holds the frames published during one event-loop iteration
  and writes them when the iteration's callbacks are done: one ``send()`` per
  socket however many messages it got (a bulk edit posts many at once), each
  through picows' own write path.
* A socket that is closing or gone is skipped and dropped from the index.

.. DANGER::
   A frame is shared by every target of a publish and by the history. It is an
   immutable ``bytes`` object so no writer can alter what another one sends.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from sys import intern as _intern
from picows.picows cimport MemoryBuffer, WSTransport
from picows import __version__ as _picows_installed

__all__ = [
    "COMPILED",
    "PICOWS_VERSION",
    "Channel",
    "Outbox",
    "Subscriber",
    "build_frame",
    "check_picows_version",
]

#: The picows this module was compiled against (setup.py bakes it in).
PICOWS_VERSION = PICOWS_BUILD_VERSION


def check_picows_version(str installed, str built=PICOWS_VERSION):
    """Refuse to run against another picows than the one compiled against.

    This module reads picows' ``WSTransport`` struct directly: with another
    picows the layout may differ and a write would corrupt memory instead of
    failing. (A changed struct size is caught earlier by Cython's own import
    check; a reshuffled one only here.)
    """
    if installed != built:
        raise ImportError(
            f"fastaphlict._fanout was built against picows {built} but picows "
            f"{installed} is installed: reinstall fastaphlict so it is compiled "
            f"against picows {installed} (pip install --force-reinstall fastaphlict; "
            f"in a checkout, python setup.py build_ext --inplace), or install "
            f"picows=={built}"
        )


check_picows_version(_picows_installed)

#: True in the compiled module; tests assert it so a broken build can't hide.
COMPILED = cython.compiled


def build_frame(bytes payload not None):
    """Return ``payload`` as one final, unmasked WebSocket text frame (RFC 6455 §5.2).

    Server-to-client frames are never masked, so the frame is the same for
    every socket: build it once per message.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t header
    if size < 126:
        header = 2
    elif size < 65536:
        header = 4
    else:
        header = 10
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, header + size)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(frame)
    cdef uint64_t n = <uint64_t>size
    cdef int i
    out[0] = 0x81  # FIN + opcode 1 (text)
    if header == 2:
        out[1] = <uint8_t>size
    elif header == 4:
        out[1] = 126
        out[2] = <uint8_t>(n >> 8)
        out[3] = <uint8_t>(n & 0xFF)
    else:
        out[1] = 127
        for i in range(8):
            out[2 + i] = <uint8_t>((n >> (8 * (7 - i))) & 0xFF)
    memcpy(out + header, PyBytes_AS_STRING(payload), size)
    return frame


cdef enum:
    # Past this many PHIDs a socket's subscriptions move from a list to a set.
    SMALL = 16


@cython.final
cdef class Subscriber:
    """One open client socket as the index sees it: its transport and PHIDs.

    Created by :meth:`Channel.attach`; the client side keeps it for the
    socket's lifetime and hands it back on every command.
    """

    cdef readonly WSTransport transport
    cdef readonly Channel channel
    cdef readonly bint attached
    # A Phorge tab listens to a handful of PHIDs: a short list costs a tenth
    # of a set's memory, and memory per idle tab is what limits a node. Past
    # SMALL entries it becomes a set so membership stays O(1).
    cdef object _phids
    cdef uint64_t _mark  # the publish epoch that last matched this socket
    # Frames published to this socket and not yet written: None, one bytes, or
    # a list of them. Only the Outbox fills it; send() and flush() empty it.
    cdef object _pending
    # Liveness for server pings: heard is set by any frame from the client,
    # awaiting once a ping went out unanswered. See Channel.sweep.
    cdef public bint heard
    cdef bint _awaiting

    def __cinit__(self, WSTransport transport not None, Channel channel not None):
        self.transport = transport
        self.channel = channel
        self._phids = []
        self.attached = True
        self._mark = 0
        self._pending = None
        self.heard = True
        self._awaiting = False

    @property
    def phids(self):
        """The PHIDs this socket listens to (a snapshot)."""
        return frozenset(self._phids)

    cpdef bint listens_to_any(self, phids):
        """Whether any of ``phids`` (a container) is one of this socket's subscriptions."""
        for phid in self._phids:
            if phid in phids:
                return True
        return False

    cpdef bint send(self, bytes frame):
        """Write a prebuilt frame to this socket now; False if the socket is closing.

        Used for replies (pong) and replays. Frames the outbox still holds for
        this socket go first, so a pong never overtakes an earlier message.
        """
        if self._pending is not None:
            frame = _join(self._pending, frame)
            self._pending = None
        if _write(self.transport, frame):
            self.channel.outbox.bytes_sent += PyBytes_GET_SIZE(frame)
            return True
        return False

    cdef inline bint _add(self, str phid):
        if phid in self._phids:
            return False
        if type(self._phids) is list:
            (<list>self._phids).append(phid)
            if len(<list>self._phids) > SMALL:
                self._phids = set(self._phids)
        else:
            (<set>self._phids).add(phid)
        return True

    cdef inline bint _remove(self, str phid):
        if phid not in self._phids:
            return False
        if type(self._phids) is list:
            (<list>self._phids).remove(phid)
        else:
            (<set>self._phids).discard(phid)
        return True


cdef bytes _join(object pending, bytes last):
    if type(pending) is bytes:
        return <bytes>pending + last if last is not None else <bytes>pending
    if last is not None:
        (<list>pending).append(last)
    return b"".join(<list>pending)


@cython.final
cdef class Outbox:
    """Frames published in this event-loop iteration, written when it ends.

    The first frame queued in an iteration schedules :meth:`flush` with
    ``call_soon``; every socket then gets all its frames in one write, in
    publish order. Without a running loop (unit tests) call :meth:`flush`.
    """

    cdef list _dirty        # Subscribers with pending frames, first-queued first
    cdef bint _scheduled
    cdef object _call_soon
    cdef readonly Py_ssize_t coalesced  # frames that shared a write with another
    cdef public unsigned long long bytes_sent  # frame bytes handed to sockets

    def __cinit__(self):
        self._dirty = []
        self._scheduled = False
        self._call_soon = None
        self.coalesced = 0
        self.bytes_sent = 0

    @property
    def pending(self):
        """Sockets with frames waiting for the end of the iteration."""
        return len(self._dirty)

    cdef inline void _queue(self, Subscriber sub, bytes frame) except *:
        pending = sub._pending
        if pending is None:
            sub._pending = frame
            self._dirty.append(sub)
            if not self._scheduled:
                self._schedule()
        elif type(pending) is bytes:
            sub._pending = [pending, frame]
            self.coalesced += 1
        else:
            (<list>pending).append(frame)
            self.coalesced += 1

    cdef void _schedule(self) except *:
        if self._call_soon is None:
            import asyncio
            try:
                self._call_soon = asyncio.get_running_loop().call_soon
            except RuntimeError:
                return  # no loop: the caller flushes
        self._scheduled = True
        self._call_soon(self.flush)

    def flush(self):
        """Write every pending frame: one write per socket. Never raises."""
        cdef list dirty = self._dirty
        cdef Subscriber sub
        self._dirty = []
        self._scheduled = False
        for sub in dirty:
            pending = sub._pending
            if pending is None:  # send() already wrote it
                continue
            sub._pending = None
            data = _join(pending, None) if type(pending) is list else <bytes>pending
            if _write(sub.transport, data):
                self.bytes_sent += PyBytes_GET_SIZE(data)
            elif sub.attached:
                sub.channel._drop(sub)


cdef void _trim(WSTransport t):
    # The parsed upgrade request and our response (header multidicts) are kept
    # by picows for the socket's lifetime; nothing reads them after the
    # handshake. picows' write buffer (1 KiB) only serves its own sends (close,
    # auto-pong), which regrow it on demand; our frames never touch it.
    t.request = None
    t.response = None
    t._write_buffer = MemoryBuffer(32)


cdef inline bint _usable(WSTransport t):
    return not (t.is_disconnected or t.is_close_frame_sent)


cdef inline bint _write(WSTransport t, bytes frame):
    if not _usable(t):
        return False
    try:
        # picows' own write path: a direct send() when the transport has nothing
        # queued, otherwise a copy handed to the event loop's transport.
        t._fast_write(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
    except Exception:
        # The socket failed under us (reset between our check and the write).
        # Never raise into the publisher: abort it; on_ws_disconnected detaches.
        try:
            t.underlying_transport.abort()
        except Exception:
            pass
        return False
    return True


@cython.final
cdef class Channel:
    """The PHID index of one instance: PHID -> the sockets listening to it."""

    # str -> Subscriber, or set[Subscriber] once two sockets share the PHID:
    # most PHIDs (a user's own) have one listener, and a set costs ~200 bytes.
    cdef dict _by_phid
    cdef set _members     # every attached Subscriber
    cdef uint64_t _epoch
    cdef readonly Outbox outbox
    cdef Py_ssize_t _max_subscriptions
    cdef Py_ssize_t _max_phid_length

    def __cinit__(
        self, Outbox outbox=None, Py_ssize_t max_subscriptions=4096, Py_ssize_t max_phid_length=512
    ):
        self._by_phid = {}
        self._members = set()
        self._epoch = 0
        self.outbox = outbox if outbox is not None else Outbox()
        self._max_subscriptions = max_subscriptions
        self._max_phid_length = max_phid_length

    @property
    def size(self):
        """Number of attached sockets."""
        return len(self._members)

    @property
    def phid_count(self):
        """Number of distinct PHIDs some socket listens to."""
        return len(self._by_phid)

    def attach(self, WSTransport transport not None):
        """Register a new socket (subscribed to nothing yet) and return its Subscriber.

        Also trims what picows keeps per socket that this server never reads
        again: memory per idle tab is what limits a node's capacity.
        """
        _trim(transport)
        cdef Subscriber sub = Subscriber(transport, self)
        self._members.add(sub)
        return sub

    def detach(self, Subscriber sub not None):
        """Remove a socket and all its subscriptions. Idempotent."""
        if not sub.attached or sub.channel is not self:
            return
        self._drop(sub)

    cdef void _drop(self, Subscriber sub):
        for phid in sub._phids:
            self._unindex(phid, sub)
        sub._phids = []
        sub.attached = False
        self._members.discard(sub)

    cdef inline void _index(self, str phid, Subscriber sub):
        members = self._by_phid.get(phid)
        if members is None:
            self._by_phid[phid] = sub
        elif type(members) is Subscriber:
            self._by_phid[phid] = {members, sub}
        else:
            (<set>members).add(sub)

    cdef inline void _unindex(self, str phid, Subscriber sub):
        members = self._by_phid.get(phid)
        if members is None:
            return
        if members is sub:
            del self._by_phid[phid]
        elif type(members) is set:
            (<set>members).discard(sub)
            if not members:
                del self._by_phid[phid]

    def subscribe(self, Subscriber sub not None, phids):
        """Add each ``str`` in ``phids`` to the socket's subscriptions; skip the rest.

        Non-strings and PHIDs longer than the limit (in UTF-8 bytes) are
        skipped. Returns False, having added what fitted, when the socket
        would pass its subscription limit; the caller closes it.

        PHIDs are interned: the tabs that watch the same task then share one
        string instead of holding a copy each.
        """
        if not sub.attached or sub.channel is not self:
            return True
        cdef Py_ssize_t limit = self._max_phid_length
        for phid in phids:
            if type(phid) is not str:
                continue
            if len(<str>phid) > limit // 4 and len((<str>phid).encode("utf-8", "surrogatepass")) > limit:
                continue
            if len(sub._phids) >= self._max_subscriptions and phid not in sub._phids:
                return False
            phid = _intern(phid)
            if sub._add(phid):
                self._index(phid, sub)
        return True

    def unsubscribe(self, Subscriber sub not None, phids):
        """Remove each ``str`` in ``phids`` from the socket's subscriptions."""
        if not sub.attached or sub.channel is not self:
            return
        for phid in phids:
            if type(phid) is str and sub._remove(phid):
                self._unindex(phid, sub)

    cdef list _match(self, subscribers):
        # The one matching walk: a dict lookup per subscriber PHID, then each
        # listener of that PHID; the epoch mark keeps a socket from being
        # listed twice without building a set per publish.
        cdef list out = []
        if type(subscribers) is not list:
            return out
        cdef Subscriber sub
        self._epoch += 1
        cdef uint64_t epoch = self._epoch
        for phid in <list>subscribers:
            if type(phid) is not str:
                continue
            members = self._by_phid.get(phid)
            if members is None:
                continue
            if type(members) is Subscriber:
                sub = <Subscriber>members
                if sub._mark != epoch:
                    sub._mark = epoch
                    out.append(sub)
                continue
            for sub in <set>members:
                if sub._mark != epoch:
                    sub._mark = epoch
                    out.append(sub)
        return out

    def match(self, subscribers):
        """Return the sockets a message with these ``subscribers`` reaches, each once.

        Only ``str`` entries of a ``list`` match; anything else reaches nobody.
        Closing sockets are included: this is the pure index question.
        """
        return self._match(subscribers)

    def publish(self, subscribers, bytes frame not None):
        """Queue ``frame`` once for every open socket matching ``subscribers``.

        The outbox writes it when this loop iteration's callbacks are done.
        Returns the number of sockets it was queued for. Sockets found closing
        are dropped from the index after the walk (sets must not change while
        they are iterated). Never raises for a socket's sake.
        """
        cdef Subscriber sub
        cdef Py_ssize_t sent = 0
        cdef Outbox outbox = self.outbox
        for sub in self._match(subscribers):
            if _usable(sub.transport):
                outbox._queue(sub, frame)
                sent += 1
            elif sub.attached:
                self._drop(sub)
        return sent

    def subscribers(self):
        """Every attached Subscriber (a copy), for status, replay-free walks and shutdown."""
        return list(self._members)

    def sweep(self, bytes ping_frame not None):
        """One round of server pings; returns the sockets found dead (closed here).

        A socket heard from since the last round is fine. One that was quiet
        gets a protocol ping (browsers answer by themselves); one still quiet
        a round after its ping is half-open or gone and is dropped, so dead
        TCP connections don't pile up. Called every ``ping_interval``.
        """
        cdef Subscriber sub
        cdef list dead = []
        for sub in self._members:
            if sub.heard:
                sub.heard = False
                sub._awaiting = False
            elif sub._awaiting:
                dead.append(sub)
            else:
                sub._awaiting = True
                sub.send(ping_frame)
        for sub in dead:
            self._drop(sub)
            sub.transport.disconnect(False)
        return len(dead)
