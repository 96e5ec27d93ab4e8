# cython: language_level=3
"""The outbox: frames published during one event-loop iteration, written at its end.

One ``send()`` per socket however many messages it got (a bulk edit posts
many at once), each through picows' own write path. The outbox only batches:
how a socket writes what it holds (straight away, or behind a paced replay)
is the socket's own business (``Subscriber._flush``), reached through the
:class:`Outlet` it derives from.
"""

from asyncio import get_running_loop as _get_running_loop

__all__ = ["Outbox"]


cdef class Outlet:
    """What the outbox writes to: the base of ``Subscriber``, never made on its own."""

    def __cinit__(self, *args, **kwargs):
        # Made on its own, its subclass's fields would be read unset (None).
        if type(self) is Outlet:
            raise TypeError("Outlet is a base class: make a Subscriber")

    cdef Py_ssize_t _flush(self, object pending) except -1:
        raise NotImplementedError


cdef class Outbox:
    """Frames published in this event-loop iteration, written when it ends.

    The first frame queued in an iteration schedules :meth:`flush` with
    ``call_soon``; every socket then gets all its frames in one write, in
    publish order. Without a running loop (unit tests) call :meth:`flush`.

    ``max_backlog`` caps the frames a socket's unread replays may hold (two
    full histories by default). ``max_buffered`` is the slow-client cap for
    frames held behind a paced replay. Past either, ``on_overflow(subscriber)``
    is called (the client side closes the socket with 1013); without a
    handler the socket is dropped.
    """

    def __cinit__(self, Py_ssize_t max_buffered=1024 * 1024, Py_ssize_t max_backlog=8192):
        self._dirty = []
        self._scheduled = False
        self._loop = None
        self.coalesced = 0
        self.bytes_sent = 0
        self.max_buffered = max_buffered
        self.max_backlog = max_backlog
        self.on_overflow = None

    @property
    def pending(self):
        """Sockets with frames waiting for the end of the iteration."""
        return len(self._dirty)

    cdef void _schedule(self) except *:
        # The loop is remembered, and looked up again only when it no longer
        # runs: asyncio.get_running_loop() makes a getpid() system call each
        # time (its fork check), 3 % of py-spy's samples of the server on the
        # targeted mix when it ran once a post (a gain inside the benchmark's
        # noise). One outbox outlives a loop in
        # tests (a stopped loop is not running, so the next one is found) and
        # a closed loop's call_soon raises. The flag is set only once the
        # call is scheduled, so a failure here never leaves the outbox
        # believing a flush is coming.
        loop = self._loop
        if loop is None or not loop.is_running():
            try:
                loop = _get_running_loop()
            except RuntimeError:
                self._loop = None
                return  # no running loop: the caller flushes
            self._loop = loop
        loop.call_soon(self.flush)
        self._scheduled = True

    def flush(self):
        """Write every pending frame: one write per socket.

        Writes never raise; should anything else (an overflow handler, a
        failed allocation), the sockets not reached yet go back to the front
        of the queue with a flush scheduled before the exception propagates:
        none is left holding frames that no flush would ever write (a socket
        with pending frames is not queued again by later publishes).
        """
        cdef list dirty = self._dirty
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t n = len(dirty)
        cdef Outlet sub
        self._dirty = []
        self._scheduled = False
        try:
            while i < n:
                sub = <Outlet>dirty[i]
                i += 1
                pending = sub._pending
                if pending is None:  # send() already wrote it
                    continue
                sub._pending = None
                self.bytes_sent += sub._flush(pending)
        finally:
            if i < n:
                self._dirty = dirty[i:] + self._dirty
                if not self._scheduled:
                    self._schedule()
