# cython: language_level=3
"""C-level face of :mod:`fastaphlict._outbox`, for the modules that queue and write."""

cimport cython


cdef class Outlet:
    # What the outbox queues frames for: a Subscriber (its one kind). Frames
    # published to it and not yet written: None, one bytes, or a list of them.
    # Only _queue fills it; the outlet's own sends and the flush empty it.
    cdef object _pending

    # Write (or queue behind a paced replay) what the flush took from
    # _pending; return the bytes handed to the socket.
    cdef Py_ssize_t _flush(self, object pending) except -1


@cython.final
cdef class Outbox:
    cdef list _dirty        # Outlets with pending frames, first-queued first
    cdef bint _scheduled
    cdef object _loop       # the loop the last flush was scheduled on, or None
    cdef readonly Py_ssize_t coalesced  # frames that shared a write with another
    cdef public unsigned long long bytes_sent  # frame bytes handed to sockets
    cdef public Py_ssize_t max_buffered
    cdef public Py_ssize_t max_backlog
    cdef public object on_overflow

    cdef void _schedule(self) except *


cdef inline void _queue(Outbox outbox, Outlet sub, bytes frame) except *:
    # Hold ``frame`` for ``sub`` until the end of the loop iteration. Inline:
    # this is the per-target step of every publish.
    pending = sub._pending
    if pending is None:
        sub._pending = frame
        outbox._dirty.append(sub)
        if not outbox._scheduled:
            outbox._schedule()
    elif type(pending) is bytes:
        sub._pending = [pending, frame]
        outbox.coalesced += 1
    else:
        (<list>pending).append(frame)
        outbox.coalesced += 1


cdef inline void _queue_list(Outbox outbox, Outlet sub, list frames) except *:
    # Hold ``frames`` (a list the outlet now owns and may extend) for ``sub``,
    # which holds nothing yet, until the end of the loop iteration: one write
    # with whatever else it gets in this iteration. Not counted as coalesced:
    # they were one write anyway.
    sub._pending = frames
    outbox._dirty.append(sub)
    if not outbox._scheduled:
        outbox._schedule()
