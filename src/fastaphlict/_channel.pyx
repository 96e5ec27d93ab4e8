# cython: language_level=3
"""The channel: the PHID index of one instance, matching and publishing.

This is the hot path of every publish. It owns nothing but the index: which
open socket listens to which PHID. It never parses JSON, never logs and never
raises into the publisher.

:class:`Channel` indexes the sockets of one instance by PHID. Matching a
message costs O(len(subscribers) + matched sockets): it looks up each
subscriber PHID in a dict and never scans the sockets. What it matches it
queues in its :class:`~fastaphlict._outbox.Outbox`, which writes each socket
once at the end of the loop iteration.
"""

cimport cython
from libc.stdint cimport uint64_t
from picows.picows cimport WSTransport

from fastaphlict._outbox cimport Outbox, _queue
from fastaphlict._subscriber cimport Index, Subscriber
from fastaphlict._wire cimport _trim, _usable

__all__ = ["Channel"]

@cython.final
cdef class Channel(Index):
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
                _queue(outbox, sub, frame)
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
            sub._overflow()
        for sub in dead:
            self._drop(sub)
            sub.transport.disconnect(False)
        return len(dead)
