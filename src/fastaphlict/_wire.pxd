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


cdef inline bytes _join(object pending, bytes last):
    # Frames queued for one socket (one bytes or a list of them), plus ``last``
    # if given, as one write.
    if type(pending) is bytes:
        return <bytes>pending + last if last is not None else <bytes>pending
    if last is not None:
        (<list>pending).append(last)
    return b"".join(<list>pending)
