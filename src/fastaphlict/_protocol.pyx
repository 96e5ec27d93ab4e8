# cython: language_level=3
"""The client port's picows protocol, with a connection set-up that makes no system call.

picows' ``WSProtocol.connection_made`` serves both sides and debugging: for
every accepted socket it asks for the peer and local address, sets
``TCP_NODELAY`` again (uvloop already did) and ``TCP_QUICKACK`` (a one-shot flag
the kernel clears by itself), and reads four socket options as arguments of an
info line that is not logged: eight system calls and a Python socket object. In
a reconnect storm that was 15 % of the server's CPU (issue 19's profile).

:class:`ServerProtocol` is picows' protocol with only that step replaced: it
makes the ``WSTransport`` and arms the handshake deadline, as picows does for a
server, and nothing else. Everything after (the upgrade, the parser, frames,
close) is picows' own code.

picows does not declare its protocol's fields for other Cython modules, so
this module reads the head of the object through a C struct of its own.
:func:`protocol_factory` proves that struct against a real protocol before the
first connection (the fields it reads must hold the values the protocol was
made with) and refuses to start otherwise; picows is pinned, and ``_wire``
checks its version at import.
"""

from cpython.mem cimport PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.string cimport memcpy
from picows.picows cimport MemoryBuffer, WSTransport

from fastaphlict import _wire  # noqa: F401  (refuses another picows at import)

import asyncio
import collections
import functools

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol

__all__ = [
    "Port",
    "ServerProtocol",
    "head_matches",
    "owns_read_buffer",
    "protocol_factory",
    "shares_read_buffer",
]


cdef extern from *:
    """
    /* The head of picows 2.3.1's WSProtocol object, up to the last field used
       here (the parser's write position), in the order of its declaration (Cython keeps that order). */
    typedef struct {
        PyObject_HEAD
        void *vtab;
        PyObject *transport;
        PyObject *listener;
        PyObject *listener_factory;
        PyObject *host_port;
        PyObject *ws_path;
        PyObject *logger;
        int log_debug_enabled;
        int is_client_side;
        int disconnect_on_exception;
        PyObject *disconnect_exception;
        PyObject *loop;
        PyObject *handshake_timeout;
        PyObject *handshake_timeout_handle;
        PyObject *handshake_complete_future;
        Py_ssize_t http_max_size;
        PyObject *websocket_key_b64;
        Py_ssize_t max_frame_size;
        int enable_auto_pong;
        int enable_auto_ping;
        PyObject *auto_ping_idle_timeout;
        PyObject *auto_ping_reply_timeout;
        int auto_ping_strategy;
        PyObject *auto_ping_loop_task;
        double last_data_time;
        PyObject *extra_headers;
        int state;
        PyObject *read_buffer;
        Py_ssize_t new_data_start_pos;
    } fastaphlict_protocol_head;
    """
    ctypedef struct ProtocolHead "fastaphlict_protocol_head":
        PyObject* transport
        PyObject* listener_factory
        PyObject* host_port
        PyObject* ws_path
        PyObject* logger
        int log_debug_enabled
        int is_client_side
        int disconnect_on_exception
        PyObject* loop
        PyObject* handshake_timeout
        PyObject* handshake_timeout_handle
        PyObject* handshake_complete_future
        Py_ssize_t http_max_size
        PyObject* websocket_key_b64
        Py_ssize_t max_frame_size
        int enable_auto_pong
        int enable_auto_ping
        PyObject* auto_ping_idle_timeout
        PyObject* auto_ping_reply_timeout
        PyObject* extra_headers
        int state
        PyObject* read_buffer
        Py_ssize_t new_data_start_pos


cdef inline Port _port(ProtocolHead* head):
    # The port a protocol belongs to, kept in picows' handshake-timeout field
    # (read by picows only in the connection_made ServerProtocol replaces).
    return <Port>head.handshake_timeout


cdef inline void _store(PyObject** field, object value):
    # Replace an object field: the new value gains a reference, the old loses one.
    cdef PyObject* old = field[0]
    Py_INCREF(value)
    field[0] = <PyObject*>value
    Py_XDECREF(old)


#: picows' parser state before the upgrade request is complete.
cdef int _UPGRADING = 0
#: picows' own debug level (PICOWS_DEBUG_LL): frames are logged below DEBUG.
cdef int _PICOWS_DEBUG = 9
#: picows never reads into less than 2048 bytes and keeps 256 spare for its SIMD parsers.
cdef Py_ssize_t _BUFFER = 2048
cdef Py_ssize_t _SPARE = 256
#: Past this capacity the shared buffer (grown by reads that filled it) shrinks back.
cdef Py_ssize_t _SHARED_MAX = 64 * 1024

_base_buffer_updated = WSProtocol.buffer_updated
_base_connection_lost = WSProtocol.connection_lost


cdef MemoryBuffer _shared_buffer(Port port):
    # Shrunk in place, never replaced: idle sockets keep the object they were
    # given, and _settle tells a shared buffer from a socket's own by identity.
    # A replaced one would stay with them, and one of them keeping a partial
    # frame there as its own would have it overwritten by the next's read.
    cdef MemoryBuffer shared = port.shared
    cdef char* data
    if shared.capacity > _SHARED_MAX:
        # No socket has bytes pending in it (each copies them out), so none moves.
        data = <char*>PyMem_Realloc(shared.data, _BUFFER)
        if data != NULL:
            shared.data = data
            shared.capacity = _BUFFER
            shared.size = _BUFFER - _SPARE
    return shared


cdef inline void _settle(ProtocolHead* head):
    # After picows parsed a read: a socket with nothing pending reads into the
    # shared buffer; one with a partial frame or request gets its own copy.
    cdef MemoryBuffer current = <MemoryBuffer>head.read_buffer
    cdef MemoryBuffer shared
    cdef MemoryBuffer own
    cdef Py_ssize_t pending = head.new_data_start_pos
    if pending == 0:
        shared = _shared_buffer(_port(head))
        if current is not shared:
            _store(&head.read_buffer, shared)
        return
    shared = _port(head).shared
    if current is shared or current.capacity > _BUFFER and pending < _BUFFER - _SPARE:
        # Its own buffer, sized as picows sizes a new one, holding what is pending.
        own = MemoryBuffer(max(_BUFFER, pending + _SPARE + _SPARE))
        own.size = own.capacity - _SPARE
        memcpy(own.data, current.data, pending)
        _store(&head.read_buffer, own)


cdef class Port:
    """What the sockets of one client port share: handshake deadlines, a read buffer, a future.

    The handshake deadlines of new sockets are kept by one timer instead of
    one per socket: picows arms a timer per connection and cancels it after the upgrade: two
    timer operations and a closed libuv handle per tab of a storm. Here the
    sockets wait in buckets, one per tenth of the timeout, in arrival (so
    deadline) order; a socket leaves its bucket when it upgrades or closes,
    and one timer, armed while any bucket is left, drops the sockets still
    waiting when their bucket's time is up: at most a tenth of the timeout
    late. A waiting socket costs one set entry; nothing once upgraded.

    The read buffer and the finished future are the port's, on its loop only:
    a server on another thread's loop reads (without the GIL) at the same time.
    """

    cdef object _loop
    cdef double _timeout
    cdef double _slack
    cdef object _buckets
    cdef object _timer
    # The one read buffer of every socket that has no partial frame pending; the
    # loop reads one socket at a time and picows parses what it read before the
    # next read, so an idle socket needs no buffer of its own (2 KiB each).
    cdef MemoryBuffer shared
    # One finished future stands for every socket's finished handshake, and every
    # transport's "disconnected" future until it is awaited.
    cdef object done

    def __init__(self, loop, double timeout):
        self._loop = loop
        self._timeout = timeout
        self._slack = timeout / 10
        self._buckets = collections.deque()
        self._timer = None
        self.shared = MemoryBuffer(_BUFFER)
        self.shared.size = _BUFFER - _SPARE
        self.done = loop.create_future()
        self.done.set_result(None)

    cdef void add(self, protocol):
        cdef double deadline = self._loop.time() + self._timeout
        buckets = self._buckets
        # (Not buckets[-1]: this module is compiled without wraparound.)
        cdef Py_ssize_t count = len(buckets)
        if count and deadline <= (<tuple>buckets[count - 1])[0]:
            (<set>(<tuple>buckets[count - 1])[1]).add(protocol)
            return
        # The bucket's deadline is its last member's at the latest.
        buckets.append((deadline + self._slack, {protocol}))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline + self._slack, self._sweep)

    cdef void discard(self, protocol):
        # Newest first: a socket upgrades within milliseconds of its arrival.
        for bucket in reversed(self._buckets):
            members = <set>(<tuple>bucket)[1]
            if protocol in members:
                members.discard(protocol)
                return

    def _sweep(self):
        cdef double now = self._loop.time()
        cdef ProtocolHead* head
        buckets = self._buckets
        self._timer = None
        while buckets and (<tuple>buckets[0])[0] <= now:
            for protocol in (<tuple>buckets.popleft())[1]:
                head = <ProtocolHead*><PyObject*>protocol
                if head.state == _UPGRADING and not (<WSTransport>head.transport).is_disconnected:
                    protocol._handshake_timeout_callback()
        if buckets:
            self._timer = self._loop.call_at((<tuple>buckets[0])[0], self._sweep)

    def __len__(self):
        """Sockets waiting for their upgrade."""
        return sum(len((<tuple>bucket)[1]) for bucket in self._buckets)


cdef class _ServerTransport(WSTransport):
    """picows' transport whose own "disconnected" future is made only when awaited.

    Until then it holds the shared finished future (no future per idle tab),
    which must not end a wait for a socket still connected.
    """

    async def wait_disconnected(self):
        self._check_thread("wait_disconnected")
        if not self.is_disconnected and self.disconnected_future.done():
            # picows' connection_lost sets the result of a future not done yet.
            self.disconnected_future = self._loop.create_future()
        await asyncio.shield(self.disconnected_future)


class ServerProtocol(WSProtocol):
    """picows' server protocol with a lean set-up and no read buffer while idle."""

    # No __dict__ or weak-reference slot: an idle tab pays for every byte.
    __slots__ = ()

    def __init__(self, listener_factory, logger, loop, Port port, Py_ssize_t max_frame_size):
        # picows' server-side values, set without its client-side work (a
        # random key, the loop looked up again, a read buffer of its own). The
        # allocation zeroed every C field and set every object field to None;
        # auto-ping and auto-pong stay off (the listener answers pings itself).
        cdef ProtocolHead* head = <ProtocolHead*><PyObject*>self
        _store(&head.listener_factory, listener_factory)
        _store(&head.ws_path, b"/")
        _store(&head.logger, logger)
        head.log_debug_enabled = logger.isEnabledFor(_PICOWS_DEBUG)
        head.disconnect_on_exception = 1
        _store(&head.loop, loop)
        # picows reads this field only in the connection_made replaced below,
        # so it holds the port (_port); no timer handle is ever set.
        _store(&head.handshake_timeout, port)
        _store(&head.handshake_complete_future, loop.create_future())
        head.http_max_size = 16 * 1024
        head.max_frame_size = max_frame_size
        _store(&head.read_buffer, port.shared)

    def connection_made(self, transport):
        cdef ProtocolHead* head = <ProtocolHead*><PyObject*>self
        loop = <object>head.loop
        cdef WSTransport t = _ServerTransport(False, transport, <object>head.logger, loop)
        t.disconnected_future = _port(head).done
        _store(&head.transport, t)
        _port(head).add(self)

    def connection_lost(self, exc):
        cdef ProtocolHead* head = <ProtocolHead*><PyObject*>self
        if head.state == _UPGRADING:
            # Closed before its upgrade: its deadline must not keep it alive.
            _port(head).discard(self)
        _base_connection_lost(self, exc)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef ProtocolHead* head = <ProtocolHead*><PyObject*>self
        cdef bint upgrading = head.state == _UPGRADING
        try:
            _base_buffer_updated(self, nbytes)
        finally:
            if upgrading and head.state != _UPGRADING:
                _upgraded(head)
                _port(head).discard(self)
            _settle(head)


cdef inline void _upgraded(ProtocolHead* head):
    # The handshake succeeded (picows set its future's result): the shared
    # finished future stands for it from now on.
    future = <object>head.handshake_complete_future
    if future.done() and not future.cancelled() and future.exception() is None:
        _store(&head.handshake_complete_future, _port(head).done)


def owns_read_buffer(protocol):
    """Whether ``protocol`` (a :class:`ServerProtocol`) holds a read buffer of its own.

    True while a partial frame (or upgrade request) is pending; an idle socket
    reads into the shared buffer.
    """
    if not isinstance(protocol, ServerProtocol):
        raise TypeError("not a ServerProtocol")
    cdef ProtocolHead* head = <ProtocolHead*><PyObject*>protocol
    cdef MemoryBuffer shared = _port(head).shared
    return head.read_buffer != <PyObject*>shared


def shares_read_buffer(protocol, other):
    """Whether two :class:`ServerProtocol` read into one buffer (idle, on one port)."""
    if not isinstance(protocol, ServerProtocol) or not isinstance(other, ServerProtocol):
        raise TypeError("not a ServerProtocol")
    cdef ProtocolHead* head = <ProtocolHead*><PyObject*>protocol
    return head.read_buffer == (<ProtocolHead*><PyObject*>other).read_buffer


def head_matches(protocol, listener_factory, logger, handshake_timeout, loop,
                 Py_ssize_t max_frame_size, Py_ssize_t read_buffer_size,
                 idle_timeout, reply_timeout):
    """Whether ``protocol``'s fields, read through our struct, hold what it was made with.

    The object fields are compared by address before any is dereferenced, so a
    wrong layout is refused, not followed.
    """
    if not isinstance(protocol, WSProtocol):
        return False
    cdef ProtocolHead* head = <ProtocolHead*><PyObject*>protocol
    if not (
        type(protocol).__basicsize__ >= sizeof(ProtocolHead)
        and head.transport == <PyObject*>None
        and head.handshake_timeout_handle == <PyObject*>None
        and head.listener_factory == <PyObject*>listener_factory
        and head.logger == <PyObject*>logger
        and head.handshake_timeout == <PyObject*>handshake_timeout
        and head.loop == <PyObject*>loop
        and head.is_client_side == 0
        and head.host_port == <PyObject*>None
        and head.disconnect_on_exception == 1
        and head.http_max_size == 16 * 1024
        and head.max_frame_size == max_frame_size
        and head.enable_auto_pong == 0
        and head.enable_auto_ping == 0
        and head.auto_ping_idle_timeout == <PyObject*>idle_timeout
        and head.auto_ping_reply_timeout == <PyObject*>reply_timeout
        and head.extra_headers == <PyObject*>None
        and head.state == _UPGRADING
        and head.new_data_start_pos == 0
    ):
        return False
    buffer = <object>head.read_buffer
    future = <object>head.handshake_complete_future
    return (
        type(buffer) is MemoryBuffer
        and (<MemoryBuffer>buffer).capacity == max(read_buffer_size, _BUFFER)
        and <object>head.ws_path == b"/"
        and head.log_debug_enabled == logger.isEnabledFor(_PICOWS_DEBUG)
        and isinstance(future, asyncio.Future)
        and type(<object>head.websocket_key_b64) is bytes
    )


def protocol_factory(listener_factory, logger, handshake_timeout, Py_ssize_t max_frame_size):
    """A factory of server protocols for ``loop.create_server``, on the running loop.

    Before the first connection it proves this module's picture of picows'
    object against one picows made itself with the same values, and raises
    ``RuntimeError`` when they differ.
    """
    loop = asyncio.get_running_loop()
    # Values of the check's own, compared by address: objects, not C doubles.
    cdef object idle_timeout = 20.5
    cdef object reply_timeout = 20.25
    cdef object probe_timeout = float(handshake_timeout or 0) + 0.5
    probe = WSProtocol(
        None,  # host and port: a client's
        None,  # path: a client's
        False,  # the server side
        listener_factory,
        logger,
        True,  # disconnect when a listener raises
        probe_timeout,
        False,  # no automatic ping
        idle_timeout,
        reply_timeout,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        False,  # no automatic pong
        max_frame_size,
        None,  # extra headers: a client's
        3 * _BUFFER,
    )
    if not head_matches(probe, listener_factory, logger, probe_timeout, loop,
                        max_frame_size, 3 * _BUFFER, idle_timeout, reply_timeout):
        raise RuntimeError(
            "fastaphlict._protocol does not match the installed picows' protocol "
            "layout; reinstall fastaphlict against the picows it pins"
        )
    port = Port(loop, handshake_timeout)
    return functools.partial(ServerProtocol, listener_factory, logger, loop, port, max_frame_size)
