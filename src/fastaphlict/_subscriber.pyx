# cython: language_level=3
"""One open client socket as the fan-out sees it: its PHIDs, its writes, its replay.

The :class:`Subscriber` is what the client side holds for a socket and what
the channel indexes. It writes what the outbox batched for it, and paces
replays.

* A socket that is closing or gone is skipped and dropped from the index.
* A replay is paced: :meth:`Subscriber.replay` writes history frames while
  the socket's transport accepts them and keeps the rest (references to the
  history's frames, no copies) until the socket drains. Live frames, pongs and
  pings that arrive meanwhile queue behind the replay, so a tab sees its
  frames in order. Slowness there is judged by progress, not by the size of
  that queue (the replay itself holds it back): a tab that keeps draining its
  socket gets a replay of any size whole with every live frame behind it; one
  that stops reading is closed once live frames pass the slow-client cap
  without a drain, or after a sweep round without progress. A hard cap of
  ``LATER_LIMIT`` times the slow-client cap bounds what any tab can hold.
  A replay too small to need pacing (a tab's usual one) waits for the
  outbox's flush instead, so the pong asked for behind it shares its write.

The channel sits above this module; a subscriber reaches it through
:class:`Index`, its base declared here (its outbox, and its drop).
"""

from cpython.bytes cimport PyBytes_GET_SIZE
from picows.picows cimport WSTransport

from fastaphlict._outbox cimport Outbox, Outlet, _queue_list
from fastaphlict._wire cimport ASK, DIRECT, FAILED, SENT, _buffered, _join, _put, _usable

# Importing _wire refuses a picows other than the one this was compiled against.
import fastaphlict._wire  # noqa: F401

__all__ = ["Subscriber"]


cdef enum:
    # Past this many PHIDs a socket's subscriptions move from a list to a set.
    SMALL = 16
    # A paced replay joins frames into writes of about this many bytes.
    REPLAY_CHUNK = 65536
    # Live frames behind a paced replay may reach this many slow-client caps
    # (max_buffered) while the tab keeps draining, and no more. They are
    # references to frames every target and the history share.
    LATER_LIMIT = 16


cdef class Index:
    """What a subscriber belongs to: the base of ``Channel``, never made on its own."""

    def __cinit__(self, *args, **kwargs):
        # Made on its own, its subclass's fields would be read unset (None).
        if type(self) is Index:
            raise TypeError("Index is a base class: make a Channel")

    cdef int _drop(self, Subscriber sub) except -1:
        raise NotImplementedError


cdef class Subscriber(Outlet):
    """One open client socket as the index sees it: its transport and PHIDs.

    Created by :meth:`Channel.attach`; the client side keeps it for the
    socket's lifetime and hands it back on every command.
    """

    def __cinit__(self, WSTransport transport not None, Index channel not None):
        self.transport = transport
        self.channel = channel
        self._phids = []
        self.attached = True
        self._queued = True  # picows wrote the handshake's answer through it
        self._mark = 0
        self._pending = None
        self.heard = True
        self._awaiting = False
        self._end_replay()
        self.slow = False

    @property
    def phids(self):
        """The PHIDs this socket listens to (a snapshot)."""
        return frozenset(self._phids)

    cpdef object subscriptions(self):
        """The socket's PHIDs, as held (a list or a set): read it, never change it."""
        return self._phids

    @property
    def replaying(self):
        """Whether a paced replay still has frames to write."""
        return self._replay is not None and (
            self._replay_pos < len(self._replay) or self._later is not None
        )

    cpdef bint send(self, bytes frame):
        """Write a prebuilt frame to this socket now; False if the socket is closing.

        Used for replies (pong) and server pings. Frames the outbox still
        holds for this socket go first, and during a paced replay the frame
        queues behind it, so a pong never overtakes an earlier message.
        """
        if self._pending is not None:
            frame = _join(self._pending, frame)
            self._pending = None
        if self._replay is not None and self._paced():
            if not self._defer(frame):
                return False
            if not self._paused:
                self._drain()  # the replay's tail: nothing waits ahead of it
            return True
        if self._put(frame):
            self.channel.outbox.bytes_sent += PyBytes_GET_SIZE(frame)
            return True
        return False

    def wrote_around(self):
        """picows wrote to this socket itself (a pong): its loop transport may hold bytes now.

        Frames then go through that transport until its buffer is found
        empty, so none overtakes what it holds.
        """
        self._queued = True

    cdef bint _put(self, bytes data) except -1:
        # Every write of ours goes through here; False if the socket is closing.
        cdef int done = _put(self.transport, data, ASK if self._queued else DIRECT)
        if done == FAILED:
            return False
        self._queued = done != SENT
        return True

    cdef Py_ssize_t _flush(self, object pending) except -1:
        # The outbox's write of the frames it held for this socket; returns
        # the bytes written here (a paced replay's writes count themselves).
        cdef bytes data
        if self._replay is not None and self._paced():
            # Behind the paced replay, in order, as the shared frames
            # themselves: a tab that waits holds references, not copies.
            if type(pending) is list:
                for frame in <list>pending:
                    if not self._defer(<bytes>frame):
                        break
            else:
                self._defer(<bytes>pending)
            if self._replay is not None and not self._paused:
                self._drain()  # the replay's tail: nothing waits ahead
            return 0
        data = _join(pending, None) if type(pending) is list else <bytes>pending
        if self._put(data):
            return PyBytes_GET_SIZE(data)
        if self.attached:
            self.channel._drop(self)
        return 0

    cdef int _overflow(self) except -1:
        # Too slow (a replay backlog or live frames behind it past their cap,
        # or a stalled replay): the outbox's handler closes it, or without one
        # it is dropped here. Once only.
        if self.slow:
            return 0
        handler = self.channel.outbox.on_overflow
        if handler is not None:
            handler(self)
        else:
            self.slow = True
            if self.attached:
                self.channel._drop(self)
            self.transport.disconnect(False)
        return 0

    def replay(self, list frames not None):
        """Send history frames in order, paced by the socket's drain; return how many.

        Writes while the transport takes them; what is left waits, as
        references to the history's own frames, for :meth:`resume`. A replay
        an empty transport takes whole without passing its low-water mark
        (a tab's usual one) is not paced: it waits, like a publish, for the
        outbox's flush at the end of the loop iteration, so the ``pong`` a tab
        asks for right behind it (``JX.Aphlict`` sends subscribe, replay and
        ping together) goes out in the same write. ``frames`` becomes the
        socket's (it may be extended). Frames
        the outbox holds for this socket go first. Returns 0 if the socket
        is closing, or if the replays it has not read yet would pass the
        outbox's ``max_backlog`` frames: a tab that asks again and again
        without reading is closed as too slow instead of piling up
        references (8 bytes each, but a replay command costs the tab 40).
        """
        if not frames or not _usable(self.transport):
            return 0
        cdef Py_ssize_t waiting = 0
        if self._replay is not None:
            waiting = len(self._replay) - self._replay_pos
            if self._later is not None:
                waiting += len(self._later)
        cdef Outbox outbox = self.channel.outbox
        if waiting + len(frames) > outbox.max_backlog:
            self._overflow()
            return 0
        if self._replay is None and self._pending is None and self._small(frames):
            # Nothing to pace: it goes out with this iteration's flush, so the
            # pong a tab sends right behind its replay shares its write.
            _queue_list(outbox, self, frames)
            return len(frames)
        if self._pending is not None:
            frames = [_join(self._pending, None), *frames]
            self._pending = None
            # The outbox still lists this socket as dirty; it finds nothing.
            n = len(frames) - 1
        else:
            n = len(frames)
        if self._replay is None:
            self._replay = frames
            self._replay_pos = 0
        else:
            # A second replay while one is paced: it follows the first, in
            # order with whatever queued behind that one.
            if self._later is None:
                self._replay.extend(frames)
            else:
                self._later.extend(frames)
        self._drain()
        return n

    cdef bint _small(self, list frames) except -1:
        # A replay that one write carries whole into an empty transport and
        # leaves it at most at its low-water mark (a quarter of the slow-client
        # cap): a paced replay of it would be written at once and over at once.
        if _buffered(self.transport):
            return 0
        cdef Py_ssize_t limit = min(<Py_ssize_t>REPLAY_CHUNK, self.channel.outbox.max_buffered // 4)
        cdef Py_ssize_t size = 0
        for frame in frames:
            size += PyBytes_GET_SIZE(<bytes>frame)
            if size > limit:
                return 0
        return 1

    def pause(self):
        """The transport's buffer is full. True if a replay (or its tail) now waits for it to drain.

        False means no replay is in progress: the socket is not reading what
        live fan-out sends it, and the caller closes it as too slow.
        """
        if self._replay is None:
            return False
        self._paused = True
        return True

    def resume(self):
        """The transport drained: continue a paced replay."""
        self._paused = False
        self._stalled = False
        if self._replay is not None:
            self._drains += 1
            # A tab that drains is alive, though the sweep's ping waits behind
            # the replay and can't be answered: don't take it for a dead one.
            self.heard = True
            self._drain()

    cdef int _paced(self) except -1:
        # Whether a frame for this socket must go through the replay's backlog
        # (called only while a replay is on). Once everything is written, the
        # replay's tail lasts until the transport is found down to its
        # low-water mark: from then on frames are written straight away.
        if self._paused or self._later is not None or self._replay_pos < len(self._replay):
            return 1
        if _buffered(self.transport) <= self.channel.outbox.max_buffered // 4:
            self._end_replay()
            return 0
        return 1

    cdef int _defer(self, bytes data) except -1:
        # A frame that must wait behind a paced replay; 0 if the tab is (now)
        # closed as too slow. Live traffic piles up here for as long as the
        # replay takes, however fast the tab reads, so the size alone says
        # nothing: past each further max_buffered bytes the tab must have
        # drained its socket at least once since the last look (a tab that
        # reads drains every few hundred KiB). The hard cap bounds what a
        # tab that drains, but slower than live traffic comes, can hold.
        if self.slow:
            return 0  # closing: nothing more is written to it
        cdef Outbox outbox = self.channel.outbox
        if self._later is None:
            self._later = [data]
            self._later_bytes = 0
            self._drains_seen = self._drains
            self._later_check = outbox.max_buffered
        else:
            self._later.append(data)
        self._later_bytes += PyBytes_GET_SIZE(data)
        if self._later_bytes > self._later_check:
            if (
                self._drains == self._drains_seen
                or self._later_bytes > LATER_LIMIT * outbox.max_buffered
            ):
                self._overflow()
                return 0
            self._drains_seen = self._drains
            self._later_check = self._later_bytes + outbox.max_buffered
        return 1

    cdef int _drain(self) except -1:
        # Write chunks of the backlog until the transport pushes back (its
        # pause_writing runs inside our write and calls pause()) or it is empty.
        cdef list frames
        cdef Py_ssize_t pos, end, size
        cdef bytes data
        cdef Outbox outbox = self.channel.outbox
        while not self._paused:
            frames = self._replay
            if frames is None:
                return 0
            pos = self._replay_pos
            if pos >= len(frames):
                if self._later is not None:
                    # Replayed frames are out: what queued behind them comes next.
                    self._replay = self._later
                    self._replay_pos = 0
                    self._later = None
                    self._later_bytes = 0
                    continue
                # All written, but the transport may still hold up to the cap
                # of it: a live frame written straight after could pass the cap
                # and read as a slow tab. Stay paced (frames keep going through
                # _defer and _drain, so a pause only paces) until the transport
                # is down to its low-water mark, a quarter of the cap (asyncio's
                # and uvloop's default), where it would have resumed us.
                if _buffered(self.transport) <= outbox.max_buffered // 4:
                    self._end_replay()
                elif pos:
                    self._replay = []  # let go of the written frames
                    self._replay_pos = 0
                return 0
            end = pos
            size = 0
            while end < len(frames) and size < REPLAY_CHUNK:
                size += PyBytes_GET_SIZE(<bytes>frames[end])
                end += 1
            data = <bytes>frames[pos] if end == pos + 1 else b"".join(frames[pos:end])
            self._replay_pos = end
            if not self._put(data):
                self._end_replay()
                return 0
            outbox.bytes_sent += size
        return 0

    cdef void _end_replay(self) noexcept:
        self._replay = None
        self._replay_pos = 0
        self._later = None
        self._later_bytes = 0
        self._drains = 0
        self._paused = False
        self._stalled = False

    # The index's helpers return -1 with an exception set (MemoryError is all
    # they can meet) so it reaches the caller instead of being printed and
    # swallowed; each changes state only after its last step that can fail.

    cdef int _add(self, str phid) except -1:
        if phid in self._phids:
            return 0
        if type(self._phids) is list:
            if len(<list>self._phids) >= SMALL:
                self._phids = set(self._phids) | {phid}
            else:
                (<list>self._phids).append(phid)
        else:
            (<set>self._phids).add(phid)
        return 1

    cdef int _remove(self, str phid) except -1:
        if phid not in self._phids:
            return 0
        if type(self._phids) is list:
            (<list>self._phids).remove(phid)
        else:
            (<set>self._phids).discard(phid)
        return 1
