# cython: language_level=3
"""C-level face of :mod:`fastaphlict._subscriber`, for the channel that indexes sockets."""

cimport cython
from libc.stdint cimport uint64_t
from picows.picows cimport WSTransport

from fastaphlict._outbox cimport Outbox, Outlet


cdef class Subscriber


cdef class Index:
    # What a Subscriber belongs to: the Channel (its one kind), seen from
    # below so this module needs nothing of it but its outbox and its drop.
    cdef readonly Outbox outbox

    # Take ``sub`` out of the index and mark it detached.
    cdef int _drop(self, Subscriber sub) except -1


@cython.final
cdef class Subscriber(Outlet):
    cdef readonly WSTransport transport
    cdef readonly Index channel
    cdef readonly bint attached
    # Whether the loop's transport may hold bytes of this socket's (written
    # through it, not by our own send()): frames then go through it, in order,
    # until its buffer is found empty. See _put.
    cdef bint _queued
    # A Phorge tab listens to a handful of PHIDs: a short list costs a tenth
    # of a set's memory, and memory per idle tab is what limits a node. Past
    # SMALL entries it becomes a set so membership stays O(1).
    cdef object _phids
    cdef uint64_t _mark  # the publish epoch that last matched this socket
    # Liveness for server pings: heard is set by any frame from the client,
    # awaiting once a ping went out unanswered. See Channel.sweep.
    cdef public bint heard
    cdef bint _awaiting
    # The backlog of a paced replay: history frames not yet written (a list
    # and a read position), then the frames that arrived behind them, with
    # their size. None/0 when no replay is in progress. Once the backlog is
    # written the replay stays on (an empty list) until the transport is down
    # to its low-water mark: see _drain.
    cdef list _replay
    cdef Py_ssize_t _replay_pos
    cdef list _later
    cdef Py_ssize_t _later_bytes
    # Progress behind a replay: the transport's drains (resume_writing) during
    # it, the count _defer last saw, and the size of _later at which it looks
    # again. See _defer.
    cdef Py_ssize_t _drains
    cdef Py_ssize_t _drains_seen
    cdef Py_ssize_t _later_check
    cdef bint _paused     # the transport asked us to stop writing
    cdef bint _stalled    # paused through a whole sweep round
    #: Set once the socket was closed as too slow, so it is closed and counted once.
    cdef public bint slow

    cpdef object subscriptions(self)
    cpdef bint send(self, bytes frame)
    cdef bint _put(self, bytes data) except -1
    cdef int _overflow(self) except -1
    cdef int _paced(self) except -1
    cdef bint _small(self, list frames) except -1
    cdef int _defer(self, bytes data) except -1
    cdef int _drain(self) except -1
    cdef void _end_replay(self) noexcept
    cdef int _add(self, str phid) except -1
    cdef int _remove(self, str phid) except -1
