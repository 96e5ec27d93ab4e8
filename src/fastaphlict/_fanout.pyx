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

.. DANGER::
   A frame is shared by every target of a publish and by the history. It is an
   immutable ``bytes`` object so no writer can alter what another one sends.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from asyncio import get_running_loop as _get_running_loop
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
    # A paced replay joins frames into writes of about this many bytes.
    REPLAY_CHUNK = 65536
    # Live frames behind a paced replay may reach this many slow-client caps
    # (max_buffered) while the tab keeps draining, and no more. They are
    # references to frames every target and the history share.
    LATER_LIMIT = 16


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

    def __cinit__(self, WSTransport transport not None, Channel channel not None):
        self.transport = transport
        self.channel = channel
        self._phids = []
        self.attached = True
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
        if _write(self.transport, frame):
            self.channel.outbox.bytes_sent += PyBytes_GET_SIZE(frame)
            return True
        return False

    def replay(self, list frames not None):
        """Send history frames in order, paced by the socket's drain; return how many.

        Writes while the transport takes them; what is left waits, as
        references to the history's own frames, for :meth:`resume`. Frames
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
        if waiting + len(frames) > self.channel.outbox.max_backlog:
            self.channel.outbox._overflow(self)
            return 0
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
                outbox._overflow(self)
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
            if not _write(self.transport, data):
                self._end_replay()
                return 0
            outbox.bytes_sent += size
        return 0

    cdef inline void _end_replay(self) noexcept:
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

    cdef inline int _add(self, str phid) except -1:
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

    cdef inline int _remove(self, str phid) except -1:
        if phid not in self._phids:
            return 0
        if type(self._phids) is list:
            (<list>self._phids).remove(phid)
        else:
            (<set>self._phids).discard(phid)
        return 1


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

    ``max_backlog`` caps the frames a socket's unread replays may hold (two
    full histories by default). ``max_buffered`` is the slow-client cap for
    frames held behind a paced replay. Past either, ``on_overflow(subscriber)``
    is called (the client side closes the socket with 1013); without a
    handler the socket is dropped.
    """

    cdef list _dirty        # Subscribers with pending frames, first-queued first
    cdef bint _scheduled
    cdef readonly Py_ssize_t coalesced  # frames that shared a write with another
    cdef public unsigned long long bytes_sent  # frame bytes handed to sockets
    cdef public Py_ssize_t max_buffered
    cdef public Py_ssize_t max_backlog
    cdef public object on_overflow

    def __cinit__(self, Py_ssize_t max_buffered=1024 * 1024, Py_ssize_t max_backlog=8192):
        self._dirty = []
        self._scheduled = False
        self.coalesced = 0
        self.bytes_sent = 0
        self.max_buffered = max_buffered
        self.max_backlog = max_backlog
        self.on_overflow = None

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
        # The running loop is looked up each time (it is cheap): one outbox
        # outlives a loop in tests, and a closed loop's call_soon raises. The
        # flag is set only once the call is scheduled, so a failure here never
        # leaves the outbox believing a flush is coming.
        try:
            _get_running_loop().call_soon(self.flush)
        except RuntimeError:
            return  # no running loop: the caller flushes
        self._scheduled = True

    cdef void _overflow(self, Subscriber sub) except *:
        if sub.slow:
            return
        handler = self.on_overflow
        if handler is not None:
            handler(sub)
        else:
            sub.slow = True
            if sub.attached:
                sub.channel._drop(sub)
            sub.transport.disconnect(False)

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
        cdef Subscriber sub
        self._dirty = []
        self._scheduled = False
        try:
            while i < n:
                sub = <Subscriber>dirty[i]
                i += 1
                pending = sub._pending
                if pending is None:  # send() already wrote it
                    continue
                sub._pending = None
                if sub._replay is not None and sub._paced():
                    # Behind the paced replay, in order, as the shared frames
                    # themselves: a tab that waits holds references, not copies.
                    if type(pending) is list:
                        for frame in <list>pending:
                            if not sub._defer(<bytes>frame):
                                break
                    else:
                        sub._defer(<bytes>pending)
                    if sub._replay is not None and not sub._paused:
                        sub._drain()  # the replay's tail: nothing waits ahead
                    continue
                data = _join(pending, None) if type(pending) is list else <bytes>pending
                if _write(sub.transport, data):
                    self.bytes_sent += PyBytes_GET_SIZE(data)
                elif sub.attached:
                    sub.channel._drop(sub)
        finally:
            if i < n:
                self._dirty = dirty[i:] + self._dirty
                if not self._scheduled:
                    self._schedule()


cdef void _trim(WSTransport t):
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


@cython.final
cdef class Channel:
    """The PHID index of one instance: PHID -> the sockets listening to it."""

    # str -> Subscriber, or set[Subscriber] once two sockets share the PHID:
    # most PHIDs (a user's own) have one listener, and a set costs ~200 bytes.
    cdef dict _by_phid
    # str -> the same str: the one copy of each PHID that every socket
    # listening to it shares (tabs watching a task don't each keep their own
    # string). Unlike sys.intern, an entry goes with the PHID's last listener,
    # so PHIDs browsers stop using are freed.
    cdef dict _strings
    cdef set _members     # every attached Subscriber
    cdef uint64_t _epoch
    cdef readonly Outbox outbox
    cdef Py_ssize_t _max_subscriptions
    cdef Py_ssize_t _max_phid_length

    def __cinit__(
        self, Outbox outbox=None, Py_ssize_t max_subscriptions=4096, Py_ssize_t max_phid_length=512
    ):
        self._by_phid = {}
        self._strings = {}
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

    cdef int _drop(self, Subscriber sub) except -1:
        # Nothing here allocates before the socket is out of the index and
        # detached (lists and sets are walked in place, entries only removed),
        # so a failure can't leave a detached socket in the index.
        phids = sub._phids
        if type(phids) is list:
            for phid in <list>phids:
                self._unindex(<str>phid, sub)
        else:
            for phid in <set>phids:
                self._unindex(<str>phid, sub)
        sub.attached = False
        self._members.discard(sub)
        sub._end_replay()  # let go of the frames a paced replay still held
        sub._phids = []
        return 0

    cdef inline int _index(self, str phid, Subscriber sub) except -1:
        members = self._by_phid.get(phid)
        if members is None:
            self._by_phid[phid] = sub
            try:
                self._strings[phid] = phid
            except BaseException:
                del self._by_phid[phid]
                raise
        elif type(members) is Subscriber:
            self._by_phid[phid] = {members, sub}
        else:
            (<set>members).add(sub)
        return 0

    cdef inline int _unindex(self, str phid, Subscriber sub) except -1:
        # Allocates nothing (a set is walked in place): it can't fail halfway.
        cdef Subscriber other
        members = self._by_phid.get(phid)
        if members is None:
            return 0
        if members is sub:
            del self._by_phid[phid]
            del self._strings[phid]
        elif type(members) is set:
            (<set>members).discard(sub)
            if len(<set>members) == 1:
                # Back to the one-listener form: a set costs ~200 bytes.
                for other in <set>members:
                    self._by_phid[phid] = other
        return 0

    def subscribe(self, Subscriber sub not None, phids):
        """Add each ``str`` in ``phids`` to the socket's subscriptions; skip the rest.

        Non-strings and PHIDs longer than the limit (in UTF-8 bytes) are
        skipped. Returns False, having added what fitted, when the socket
        would pass its subscription limit; the caller closes it.

        Equal PHIDs are shared through the index: the tabs that watch the
        same task hold one string, not a copy each (see ``_strings``).
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
            phid = self._strings.get(phid, phid)
            if sub._add(phid):
                try:
                    self._index(phid, sub)
                except BaseException:
                    sub._remove(phid)  # the socket lists only what the index has
                    raise
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

    def sweep(self, bytes ping_frame not None, subscribers=None):
        """One round of server pings; returns the sockets found dead (closed here).

        A socket heard from since the last round is fine. One that was quiet
        gets a protocol ping (browsers answer by themselves); one still quiet
        a round after its ping is half-open or gone and is dropped, so dead
        TCP connections don't pile up. A paced replay that made no progress
        for a whole round belongs to a tab that stopped reading: it is handed
        to the outbox's overflow handler (closed as too slow, not counted here).

        ``subscribers`` (a slice of :meth:`subscribers`) limits the round to
        those sockets, so a caller can spread a round over several loop
        iterations; sockets detached meanwhile are skipped.
        """
        cdef Subscriber sub
        cdef list dead = []
        cdef list stalled = []
        for sub in (list(self._members) if subscribers is None else subscribers):
            if not sub.attached or sub.channel is not self:
                continue
            if sub._paused:
                if sub._stalled:
                    stalled.append(sub)
                    continue
                sub._stalled = True
            if sub.heard:
                sub.heard = False
                sub._awaiting = False
            elif sub._awaiting:
                dead.append(sub)
            else:
                sub._awaiting = True
                sub.send(ping_frame)
        for sub in stalled:
            self.outbox._overflow(sub)
        for sub in dead:
            self._drop(sub)
            sub.transport.disconnect(False)
        return len(dead)
