# cython: language_level=3
"""Frames on picows' transport: the helpers every fan-out module writes through.

They are ``cdef inline`` so each module that cimports them gets them compiled
in: a write stays a C call, not a call into another module. They read picows'
``WSTransport`` struct directly; importing ``fastaphlict._wire`` refuses a
picows other than the one compiled against (see ``check_picows_version``).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from picows.picows cimport MemoryBuffer, WSTransport


cdef inline void _trim(WSTransport t):
    # The parsed upgrade request and our response (header multidicts) are kept
    # by picows for the socket's lifetime; nothing reads them after the
    # handshake. picows' write buffer (1 KiB) only serves its own sends (close,
    # auto-pong), which regrow it on demand; our frames never touch it.
    t.request = None
    t.response = None
    t._write_buffer = MemoryBuffer(32)


cdef inline Py_ssize_t _buffered(WSTransport t) except -1:
    # What the event loop's transport holds unsent (not the kernel's buffer).
    return t.underlying_transport.get_write_buffer_size()


cdef inline bint _usable(WSTransport t):
    return not (t.is_disconnected or t.is_close_frame_sent)


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


cdef enum:
    # How _put may write (what the caller knows of the loop's transport):
    DIRECT = 0  # nothing of this socket's is held by the loop: send() straight away
    ASK = 1     # it may hold bytes: send() only if its buffer is found empty
    # What _put did:
    FAILED = 0  # closing or failed: nothing written
    SENT = 1    # all of it is in the kernel's buffer
    QUEUED = 2  # (some of) it is held by the loop's transport


cdef inline int _put(WSTransport t, bytes frame, int how):
    # One frame to one socket, in order with everything written before it.
    # The kernel takes it straight from our bytes with one send() when the
    # loop's transport holds nothing of the socket's (bytes it holds must go
    # first); what send() leaves (a partial write, EAGAIN, any error) goes to
    # the loop's transport as picows' own fast path does, where back-pressure
    # (pause_writing at the high-water mark) and errors (closing the socket)
    # are handled as for any write. Never over TLS (is_secure). DIRECT saves
    # what picows' path pays per target: a Python-level call into the loop's
    # transport, reaching three more objects (cache misses at 10000 tabs).
    # A socket uvloop closed (an error, abort()) keeps its descriptor until
    # picows has heard of the loss (is_disconnected): a send() never reaches
    # a descriptor number reused by a newer connection.
    if not _usable(t):
        return FAILED
    cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
    cdef Py_ssize_t sent = 0
    try:
        if not t.is_secure and (how == DIRECT or _buffered(t) == 0):
            sent = send(t._socket, PyBytes_AS_STRING(frame), <size_t>size, MSG_DONTWAIT | MSG_NOSIGNAL)
            if sent == size:
                return SENT
            if sent < 0:
                sent = 0  # EAGAIN or an error: the loop's transport retries or reports it
        t.underlying_transport.write(frame[sent:] if sent else frame)
    except Exception:
        # The socket failed under us (reset between our check and the write).
        # Never raise into the publisher: abort it; on_ws_disconnected detaches.
        try:
            t.underlying_transport.abort()
        except Exception:
            pass
        return FAILED
    return QUEUED


cdef inline bytes _join(object pending, bytes last):
    # Frames queued for one socket (one bytes or a list of them), plus ``last``
    # if given, as one write.
    if type(pending) is bytes:
        return <bytes>pending + last if last is not None else <bytes>pending
    if last is not None:
        (<list>pending).append(last)
    return b"".join(<list>pending)
