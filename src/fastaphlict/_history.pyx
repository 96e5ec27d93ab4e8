# cython: language_level=3
"""History: the recent messages of one instance, indexed by PHID for replay.

A ``replay`` must cost what it sends, not what the history holds times what
the tab listens to. Comparing every subscription of a tab with every
subscriber of every entry (the obvious loop) costs subscriptions x subscribers
per replay: after a failover every tab replays at once, and a single tab with
4096 made-up PHIDs could hold the event loop for seconds.

So each history keeps an index PHID -> its entries, oldest first, maintained
as entries arrive and leave. A replay looks up each PHID of the tab once (one
hash lookup, a miss for PHIDs nothing was posted to), walks only the matched
entries of the window from the newest back, marks each entry once per replay
(an epoch, as the fan-out index does, so no set is built), and sorts what it
found by arrival. Its cost is O(subscriptions + matched entries), whatever the
size of the history. The price is one index append per subscriber of an
entry (a few hundred nanoseconds for Phorge's ~21), and the same again when
the entry leaves.

That price is paid lazily: an entry is indexed by the first replay (or index
question) that comes after it, not when it is published, and one that leaves
before any replay asked is never indexed at all. Publishing, the hot path,
only appends; replays are rare beside posts (a tab replays when it
reconnects), so most entries of a busy server leave unindexed. Each entry is
indexed at most once, so the total is never more than indexing on publish;
the first replay after a quiet spell pays for the entries since the last one
(at most the history's limit: ~3 ms a thousand entries of 21 PHIDs, so up to
~12 ms once for a full default history, e.g. the first replay after a restart
restored one).

The index shares the message's own subscriber strings (the entry keeps its
list alive anyway): no copy, and nothing is interned, so PHIDs nobody posts
any more are freed with their last entry.

Times are wall-clock milliseconds, as Aphlict keeps them. They are made
non-decreasing within one history: if the clock steps back, a new entry takes
the previous entry's time, so windows stay contiguous and the index can stop
at the first entry older than a window.

This module does no I/O and knows nothing of sockets: it answers "which
frames, in which order".
"""

cimport cython
from libc.stdint cimport uint64_t

__all__ = ["COMPILED", "History"]

#: True in the compiled module; tests assert it so a broken build can't hide.
COMPILED = cython.compiled


@cython.final
@cython.freelist(64)
cdef class _Entry:
    cdef readonly double at
    cdef readonly uint64_t seq
    cdef readonly bytes frame
    cdef readonly object subscribers  # the message's own list, or ()
    cdef uint64_t _mark


def _by_seq(_Entry e):
    return e.seq


@cython.final
cdef class History:
    """At most ``limit`` entries, none older than ``ttl_ms``, each with its prebuilt frame."""

    cdef object _entries        # collections.deque[_Entry], oldest first
    cdef dict _by_phid          # str -> _Entry, or list[_Entry] (oldest first) once two
    cdef uint64_t _indexed      # entries up to this seq are in _by_phid, later ones not yet
    cdef readonly Py_ssize_t limit
    cdef readonly double ttl_ms
    cdef uint64_t _seq
    cdef uint64_t _epoch
    cdef double _last_at

    def __cinit__(self, Py_ssize_t limit=4096, double ttl_ms=60000.0):
        from collections import deque

        if limit < 1:
            raise ValueError("history limit must be at least 1")
        self._entries = deque()
        self._by_phid = {}
        self.limit = limit
        self.ttl_ms = ttl_ms
        self._seq = 0
        self._indexed = 0
        self._epoch = 0
        self._last_at = float("-inf")

    def __len__(self):
        return len(self._entries)

    @property
    def phid_count(self):
        """Distinct PHIDs the entries name (the index, caught up; for tests and metrics)."""
        self._catch_up()
        return len(self._by_phid)

    def oldest(self):
        """Arrival time of the oldest entry, or None when empty."""
        if not self._entries:
            return None
        return (<_Entry>self._entries[0]).at

    def newest(self):
        """Arrival time of the newest entry, or None when empty."""
        if not self._entries:
            return None
        return (<_Entry>self._entries[len(self._entries) - 1]).at

    def add(self, double at, subscribers, bytes frame not None):
        """Store a message; entries past the window or the limit leave first.

        ``subscribers`` is the message's list (anything else is stored as no
        subscribers: such a message replays to nobody, as it reached nobody).
        It is kept, not copied: the caller must not modify it afterwards.
        """
        if at < self._last_at:
            at = self._last_at  # the clock stepped back: keep windows contiguous
        self._last_at = at
        self.purge(at)
        while len(self._entries) >= self.limit:
            self._evict()
        cdef _Entry entry = _Entry.__new__(_Entry)
        self._seq += 1
        entry.seq = self._seq
        entry.at = at
        entry.frame = frame
        entry._mark = 0
        # Indexed by the next replay that comes (see _catch_up), not here.
        entry.subscribers = subscribers if type(subscribers) is list else ()
        self._entries.append(entry)

    cdef void _catch_up(self) except *:
        # Index the entries added since the last look, oldest first, so every
        # PHID's chain stays in arrival order. They are the newest entries:
        # walk back from the newest to the first one already indexed.
        if self._indexed == self._seq:
            return
        cdef list fresh = []
        cdef _Entry entry
        for entry in reversed(self._entries):
            if entry.seq <= self._indexed:
                break
            fresh.append(entry)
        cdef Py_ssize_t i = len(fresh) - 1
        while i >= 0:
            entry = <_Entry>fresh[i]
            if type(entry.subscribers) is list:
                for phid in <list>entry.subscribers:
                    if type(phid) is str:
                        self._index(<str>phid, entry)
            self._indexed = entry.seq
            i -= 1
        self._indexed = self._seq

    cdef inline void _index(self, str phid, _Entry entry) except *:
        cdef dict by_phid = self._by_phid
        found = by_phid.get(phid)
        if found is None:
            by_phid[phid] = entry
        elif type(found) is _Entry:
            if found is not entry:  # a PHID listed twice in one message
                by_phid[phid] = [found, entry]
        elif (<list>found)[len(<list>found) - 1] is not entry:
            (<list>found).append(entry)

    cdef void _evict(self) except *:
        cdef _Entry entry = <_Entry>self._entries.popleft()
        cdef dict by_phid = self._by_phid
        if entry.seq > self._indexed or type(entry.subscribers) is not list:
            return  # never indexed
        for phid in <list>entry.subscribers:
            if type(phid) is not str:
                continue
            found = by_phid.get(phid)
            if found is None:
                continue
            if found is entry:
                del by_phid[phid]
            elif type(found) is list and (<list>found)[0] is entry:
                # Entries leave oldest first, so ours is at the front.
                del (<list>found)[0]
                if len(<list>found) == 1:
                    by_phid[phid] = (<list>found)[0]

    def purge(self, double now):
        """Drop entries older than the retention window; return how many left."""
        cdef double horizon = now - self.ttl_ms
        cdef Py_ssize_t dropped = 0
        entries = self._entries
        while entries and (<_Entry>entries[0]).at < horizon:
            self._evict()
            dropped += 1
        return dropped

    def live(self, double now):
        """``(size, oldest)`` of the entries inside the window at ``now``, dropping none.

        What a read (``/status/``, a scrape) reports: the history as a purge
        would leave it, without purging. ``oldest`` is None when none is live.
        Costs one step per expired entry (entries are in time order).
        """
        cdef double horizon = now - self.ttl_ms
        cdef Py_ssize_t expired = 0
        cdef _Entry e
        for e in self._entries:
            if e.at >= horizon:
                return len(self._entries) - expired, e.at
            expired += 1
        return 0, None

    def entries(self):
        """Every entry as ``(at, subscribers, frame)``, oldest first: what a restart keeps.

        ``subscribers`` is the list the entry was stored with (``()`` when the
        message had none); like the frame, it is shared, not copied.
        """
        cdef _Entry e
        return [(e.at, e.subscribers, e.frame) for e in self._entries]

    def clear(self):
        """Forget everything (a cleared history takes entries of any time again)."""
        self._entries.clear()
        self._by_phid.clear()
        self._indexed = self._seq
        self._last_at = float("-inf")

    def since(self, double now, double age_ms):
        """Frames of every entry with ``at >= now - age_ms``, oldest first (after purging)."""
        self.purge(now)
        if age_ms < 0:
            return []
        cdef double horizon = now - age_ms
        cdef list out = []
        cdef _Entry e
        for e in self._entries:
            if e.at >= horizon:
                out.append(e.frame)
        return out

    def select(self, phids, double now, double age_ms):
        """Frames of the window's entries naming any of ``phids``, oldest first, each once.

        ``phids`` is any iterable of strings (a tab's subscriptions). Cost:
        one lookup per PHID plus one step per matched entry, then a sort of
        what matched. A negative age selects nothing (Aphlict's rule).
        """
        self.purge(now)
        if age_ms < 0 or not self._entries:
            return []
        self._catch_up()
        cdef double horizon = now - age_ms
        cdef dict by_phid = self._by_phid
        cdef list found = []
        cdef list chain
        cdef _Entry e
        cdef Py_ssize_t i
        self._epoch += 1
        cdef uint64_t epoch = self._epoch
        for phid in phids:
            hit = by_phid.get(phid)
            if hit is None:
                continue
            if type(hit) is _Entry:
                e = <_Entry>hit
                if e.at >= horizon and e._mark != epoch:
                    e._mark = epoch
                    found.append(e)
                continue
            chain = <list>hit
            i = len(chain) - 1
            while i >= 0:
                e = <_Entry>chain[i]
                if e.at < horizon:
                    break  # the rest of this chain is older still
                if e._mark != epoch:
                    e._mark = epoch
                    found.append(e)
                i -= 1
        if len(found) > 1:
            found.sort(key=_by_seq)
        return [e.frame for e in found]
