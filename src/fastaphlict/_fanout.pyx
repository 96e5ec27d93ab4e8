# cython: language_level=3
"""Fan-out: the PHID index of one instance, matching, framing and writing.

This is the hot path of every publish. It owns nothing but the index: which
open socket listens to which PHID. It never parses JSON, never logs and never
raises into the publisher.

* :class:`Channel` indexes the sockets of one instance by PHID. Matching a
  message costs O(len(subscribers) + matched sockets): it looks up each
  subscriber PHID in a dict and never scans the sockets.
* :func:`build_frame` turns a payload into one unmasked server text frame. The
  publisher builds it once and :meth:`Channel.publish` writes the very same
  bytes to every target through picows' own zero-copy write path.
* A socket that is closing or gone is skipped and dropped from the index.

.. DANGER::
   A frame is shared by every target of a publish and by the history. It is an
   immutable ``bytes`` object so no writer can alter what another one sends.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from picows.picows cimport WSTransport

__all__ = ["Channel", "Subscriber", "build_frame", "COMPILED"]

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


@cython.final
cdef class Subscriber:
    """One open client socket as the index sees it: its transport and PHIDs.

    Created by :meth:`Channel.attach`; the client side keeps it for the
    socket's lifetime and hands it back on every command.
    """

    cdef readonly WSTransport transport
    cdef readonly Channel channel
    cdef readonly set phids
    cdef readonly bint attached
    cdef uint64_t _mark  # the publish epoch that last matched this socket

    def __cinit__(self, WSTransport transport not None, Channel channel not None):
        self.transport = transport
        self.channel = channel
        self.phids = set()
        self.attached = True
        self._mark = 0

    cpdef bint send(self, bytes frame):
        """Write a prebuilt frame to this socket; False if the socket is closing.

        Used for replies (pong) and replays; live fan-out goes through
        :meth:`Channel.publish`, which has the same semantics.
        """
        return _write(self.transport, frame)


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
    """The PHID index of one instance: PHID -> the set of its subscribed sockets."""

    cdef dict _by_phid    # str -> set[Subscriber]
    cdef set _members     # every attached Subscriber
    cdef uint64_t _epoch

    def __cinit__(self):
        self._by_phid = {}
        self._members = set()
        self._epoch = 0

    @property
    def size(self):
        """Number of attached sockets."""
        return len(self._members)

    @property
    def phid_count(self):
        """Number of distinct PHIDs some socket listens to."""
        return len(self._by_phid)

    def attach(self, WSTransport transport not None):
        """Register a new socket (subscribed to nothing yet) and return its Subscriber."""
        cdef Subscriber sub = Subscriber(transport, self)
        self._members.add(sub)
        return sub

    def detach(self, Subscriber sub not None):
        """Remove a socket and all its subscriptions. Idempotent."""
        if not sub.attached or sub.channel is not self:
            return
        self._drop(sub)

    cdef void _drop(self, Subscriber sub):
        cdef object phid
        cdef set members
        for phid in sub.phids:
            members = self._by_phid.get(phid)
            if members is not None:
                members.discard(sub)
                if not members:
                    del self._by_phid[phid]
        sub.phids.clear()
        sub.attached = False
        self._members.discard(sub)

    def subscribe(self, Subscriber sub not None, phids):
        """Add each ``str`` in ``phids`` to the socket's subscriptions; skip the rest."""
        if not sub.attached or sub.channel is not self:
            return
        cdef set members
        for phid in phids:
            if type(phid) is not str or phid in sub.phids:
                continue
            sub.phids.add(phid)
            members = self._by_phid.get(phid)
            if members is None:
                self._by_phid[phid] = {sub}
            else:
                members.add(sub)

    def unsubscribe(self, Subscriber sub not None, phids):
        """Remove each ``str`` in ``phids`` from the socket's subscriptions."""
        if not sub.attached or sub.channel is not self:
            return
        cdef set members
        for phid in phids:
            if type(phid) is not str or phid not in sub.phids:
                continue
            sub.phids.discard(phid)
            members = self._by_phid.get(phid)
            if members is not None:
                members.discard(sub)
                if not members:
                    del self._by_phid[phid]

    cdef list _match(self, subscribers):
        # The one matching walk: a dict lookup per subscriber PHID, then each
        # listener of that PHID; the epoch mark keeps a socket from being
        # listed twice without building a set per publish.
        cdef list out = []
        if type(subscribers) is not list:
            return out
        cdef Subscriber sub
        cdef set members
        self._epoch += 1
        cdef uint64_t epoch = self._epoch
        for phid in <list>subscribers:
            if type(phid) is not str:
                continue
            members = self._by_phid.get(phid)
            if members is None:
                continue
            for sub in members:
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
        """Write ``frame`` once to every open socket matching ``subscribers``.

        Returns the number of sockets written to. Sockets found closing are
        dropped from the index after the walk (sets must not change while they
        are iterated). Never raises for a socket's sake.
        """
        cdef Subscriber sub
        cdef Py_ssize_t sent = 0
        for sub in self._match(subscribers):
            if _write(sub.transport, frame):
                sent += 1
            elif sub.attached:
                self._drop(sub)
        return sent

    def subscribers(self):
        """Every attached Subscriber (a copy), for status, replay-free walks and shutdown."""
        return list(self._members)
