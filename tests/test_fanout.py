"""The compiled fan-out module: framing, the PHID index, and writes to real sockets.

Each fake connection is a real picows ``WSTransport`` whose socket is one end
of a ``socketpair``, so what the index "writes" is read back from the other
end byte for byte.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import logging
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from picows import WSTransport

import fastaphlict._fanout as fanout
import fastaphlict._history as history_module
from fastaphlict._fanout import Channel, Outbox, Subscriber, build_frame
from support import Conn, PairTransport


@pytest.mark.parametrize("module", [fanout, history_module], ids=lambda m: m.__name__)
def test_compiled_module_is_in_use(module: ModuleType) -> None:
    assert module.COMPILED is True
    assert Path(module.__file__ or "").suffix in (".so", ".pyd")


@pytest.mark.parametrize("module", [fanout, history_module], ids=lambda m: m.__name__)
def test_stub_names_exactly_what_the_module_exports(module: ModuleType) -> None:
    stub = Path(module.__file__ or "").with_name(module.__name__.rsplit(".", 1)[1] + ".pyi")
    tree = ast.parse(stub.read_text())
    stub_names = {
        node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))
    } | {
        node.target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    assert stub_names == set(module.__all__)
    for stub_cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        cls = getattr(module, stub_cls.name)
        stub_members = {
            n.name
            for n in stub_cls.body
            if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
        } | {
            n.target.id
            for n in stub_cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }
        public = {name for name in dir(cls) if not name.startswith("_")}
        assert stub_members == public, cls.__name__


def reference_frame(payload: bytes) -> bytes:
    """RFC 6455 §5.2, written independently of the module under test."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_build_frame_lengths(size: int) -> None:
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    assert build_frame(payload) == reference_frame(payload)


@given(st.binary(max_size=70000))
@settings(max_examples=60, deadline=None)
def test_build_frame_matches_reference(payload: bytes) -> None:
    assert build_frame(payload) == reference_frame(payload)


# -- fake connections over socketpairs ------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_publish_writes_the_same_frame_once_per_matched_socket(loop) -> None:
    channel = Channel()
    conns = [Conn(loop) for _ in range(3)]
    subs = [channel.attach(c.transport) for c in conns]
    channel.subscribe(subs[0], ["A", "B"])
    channel.subscribe(subs[1], ["B"])
    frame = build_frame(b'{"x":1}')
    assert channel.publish(["A", "B", "B", 7, None], frame) == 2
    assert conns[0].read() == b"", "written when the loop iteration ends"
    channel.outbox.flush()
    assert conns[0].read() == frame
    assert conns[1].read() == frame
    assert conns[2].read() == b""
    for c in conns:
        c.close()


def test_frames_of_one_iteration_leave_in_one_write_in_order(loop) -> None:
    channel = Channel()
    conn = Conn(loop)
    sub = channel.attach(conn.transport)
    channel.subscribe(sub, ["P"])
    frames = [build_frame(b'{"n":%d}' % n) for n in range(5)]
    for frame in frames:
        channel.publish(["P"], frame)
    assert channel.outbox.pending == 1 and channel.outbox.coalesced == 4
    channel.outbox.flush()
    assert conn.read() == b"".join(frames)
    assert channel.outbox.pending == 0
    conn.close()


def test_direct_send_flushes_pending_frames_first(loop) -> None:
    """A pong must never overtake a message published before it."""
    channel = Channel()
    conn = Conn(loop)
    sub = channel.attach(conn.transport)
    channel.subscribe(sub, ["P"])
    message, pong = build_frame(b'{"n":1}'), build_frame(b'{"type":"pong"}')
    channel.publish(["P"], message)
    assert sub.send(pong)
    assert conn.read() == message + pong
    channel.outbox.flush()
    assert conn.read() == b"", "nothing is written twice"
    conn.close()


def test_outbox_flush_is_scheduled_on_the_running_loop() -> None:
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        channel = Channel()
        conn = Conn(loop)
        sub = channel.attach(conn.transport)
        channel.subscribe(sub, ["P"])
        channel.publish(["P"], build_frame(b"{}"))
        assert conn.read() == b""
        await asyncio.sleep(0)
        data = conn.read()
        conn.close()
        return data

    assert asyncio.run(scenario()) == build_frame(b"{}")


def test_closing_socket_is_skipped_and_dropped(loop) -> None:
    channel = Channel()
    a, b = Conn(loop), Conn(loop)
    sa, sb = channel.attach(a.transport), channel.attach(b.transport)
    channel.subscribe(sa, ["P"])
    channel.subscribe(sb, ["P"])
    a.transport.send_close()
    a.read()
    frame = build_frame(b"{}")
    assert channel.publish(["P"], frame) == 1
    channel.outbox.flush()
    assert a.read() == b"" and b.read() == frame
    assert not sa.attached and sa.phids == set()
    assert channel.size == 1
    a.close()
    b.close()


def test_write_error_never_raises_into_publisher(loop) -> None:
    channel = Channel()
    a, b = Conn(loop), Conn(loop)
    sa, sb = channel.attach(a.transport), channel.attach(b.transport)
    channel.subscribe(sa, ["P"])
    channel.subscribe(sb, ["P"])
    a.ours.close()  # send() on a closed fd fails; picows then hands data to write()
    frame = build_frame(b"{}")
    assert channel.publish(["P"], frame) == 2
    channel.outbox.flush()
    assert b.read() == frame
    b.close()


def test_non_list_subscribers_match_nothing(loop) -> None:
    channel = Channel()
    conn = Conn(loop)
    sub = channel.attach(conn.transport)
    channel.subscribe(sub, ["P", "x"])
    for subscribers in (None, "P", {"P": 1}, ("P",), 1):
        assert channel.match(subscribers) == []
        assert channel.publish(subscribers, build_frame(b"{}")) == 0
    assert conn.read() == b""
    conn.close()


def test_subscribe_skips_non_strings(loop) -> None:
    channel = Channel()
    conn = Conn(loop)
    sub = channel.attach(conn.transport)
    channel.subscribe(sub, ["A", 1, None, ["B"], {"C": 1}, "D"])
    assert sub.phids == {"A", "D"}
    assert channel.phid_count == 2
    channel.detach(sub)
    channel.detach(sub)  # idempotent
    assert channel.phid_count == 0 and channel.size == 0
    conn.close()


# -- the index against a plain-Python model -------------------------------

# More PHIDs than a socket keeps in its small list, so the set form is exercised too.
PHIDS = st.sampled_from([f"PHID-{i}" for i in range(24)])
SUBSCRIBERS = st.one_of(
    st.lists(st.one_of(PHIDS, PHIDS, st.integers(), st.none()), max_size=8),
    st.none(),
    PHIDS,
)


class IndexModel(RuleBasedStateMachine):
    """Random subscribe / unsubscribe / disconnect / close / publish sequences."""

    @initialize()
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.channel = Channel()
        self.conns: list[Conn] = []
        self.subs: list = []
        self.model: list[set[str] | None] = []  # None: detached or closing
        self.counter = 0

    def teardown(self) -> None:
        for conn in getattr(self, "conns", []):
            conn.close()
        if hasattr(self, "loop"):
            self.loop.close()

    @rule()
    def connect(self) -> None:
        if len(self.conns) >= 12:
            return
        conn = Conn(self.loop)
        self.conns.append(conn)
        self.subs.append(self.channel.attach(conn.transport))
        self.model.append(set())

    @rule(i=st.integers(0, 11), phids=st.lists(st.one_of(PHIDS, st.integers()), max_size=20))
    def subscribe(self, i: int, phids: list) -> None:
        if i < len(self.subs):
            self.channel.subscribe(self.subs[i], phids)
            if self.model[i] is not None:
                self.model[i] |= {p for p in phids if isinstance(p, str)}

    @rule(i=st.integers(0, 11), phids=st.lists(PHIDS, max_size=5))
    def unsubscribe(self, i: int, phids: list) -> None:
        if i < len(self.subs):
            self.channel.unsubscribe(self.subs[i], phids)
            if self.model[i] is not None:
                self.model[i] -= set(phids)

    @rule(i=st.integers(0, 11))
    def disconnect(self, i: int) -> None:
        if i < len(self.subs):
            self.channel.detach(self.subs[i])
            self.model[i] = None

    @rule(i=st.integers(0, 11))
    def closing(self, i: int) -> None:
        """The socket sent its close frame: it must be skipped from now on."""
        if i < len(self.subs) and self.model[i] is not None:
            self.conns[i].transport.send_close()
            self.conns[i].read()
            self.model[i] = None

    @rule(subscribers=SUBSCRIBERS)
    def publish(self, subscribers: object) -> None:
        self.counter += 1
        frame = build_frame(b'{"n":%d}' % self.counter)
        wanted = set()
        if isinstance(subscribers, list):
            strings = {p for p in subscribers if isinstance(p, str)}
            wanted = {
                i for i, phids in enumerate(self.model) if phids is not None and phids & strings
            }
        sent = self.channel.publish(subscribers, frame)
        self.channel.outbox.flush()
        assert sent == len(wanted)
        for i, conn in enumerate(self.conns):
            assert conn.read() == (frame if i in wanted else b""), i

    @invariant()
    def index_matches_model(self) -> None:
        if not hasattr(self, "channel"):
            return
        for sub, phids in zip(self.subs, self.model, strict=True):
            if phids is not None:
                assert sub.phids == phids


TestIndexModel = IndexModel.TestCase
TestIndexModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_outbox_schedules_its_flush_on_each_new_loop() -> None:
    # One outbox outlives an event loop (tests; a restarted loop). It used to
    # cache the first loop's call_soon and set its "flush scheduled" flag
    # before calling it: the closed loop's call_soon raised into the
    # publisher, the flag stayed set, and no later publish was ever written.
    channel = Channel()
    frame = build_frame(b'{"n":1}')
    for _ in range(2):
        loop = asyncio.new_event_loop()
        try:
            conn = Conn(loop)
            sub = channel.attach(conn.transport)
            channel.subscribe(sub, ["A"])

            async def publish() -> None:
                assert channel.publish(["A"], frame) == 1
                for _ in range(3):
                    await asyncio.sleep(0)

            loop.run_until_complete(publish())
            assert channel.outbox.pending == 0
            assert conn.read() == frame
            channel.detach(sub)
            conn.close()
        finally:
            loop.close()


def test_equal_phids_share_one_string_that_is_freed_with_its_last_listener(loop) -> None:
    import sys

    channel = Channel()
    first = "".join(["PHID-TASK-", "x" * 20])
    second = "".join(["PHID-TASK-", "x" * 20])
    assert first == second and first is not second
    conns = [Conn(loop) for _ in range(2)]
    a, b = (channel.attach(c.transport) for c in conns)
    baseline = sys.getrefcount(first)
    channel.subscribe(a, [first])
    channel.subscribe(b, [second])
    assert next(iter(b.subscriptions())) is first, "the second tab holds the shared string"
    channel.detach(a)
    channel.detach(b)
    assert channel.phid_count == 0
    assert sys.getrefcount(first) == baseline, "nothing (no intern table) keeps it alive"
    for c in conns:
        c.close()


def test_built_against_the_installed_picows() -> None:
    import picows

    assert picows.__version__ == fanout.PICOWS_VERSION
    fanout.check_picows_version(picows.__version__)


def test_another_picows_is_a_clear_import_error() -> None:
    """_fanout reads picows' structs directly: with another picows it must refuse to load."""
    with pytest.raises(ImportError) as info:
        fanout.check_picows_version("9.9.9", "2.3.1")
    message = str(info.value)
    assert "2.3.1" in message and "9.9.9" in message
    assert "reinstall fastaphlict" in message


# -- paced replays over a transport with flow control -----------------------


class FlowTransport(PairTransport):
    """An event-loop transport in miniature: it holds writes until :meth:`drain`.

    Past ``high`` bytes held it calls the subscriber's ``pause()``, and its
    ``resume()`` once drained to a quarter of that, as asyncio's transports
    call ``pause_writing``/``resume_writing`` (the client listener forwards
    them). A ``pause()`` answered False is what the client closes as slow.
    """

    def __init__(self, sock: socket.socket, high: int) -> None:
        super().__init__(sock)
        self.held = bytearray()
        self.high = high
        self.paused = False
        self.refused = 0  # pause() calls answered "not paced": a slow socket
        self.sub: Subscriber | None = None

    def get_write_buffer_size(self) -> int:
        # Never 0, so picows hands every write to write() rather than send().
        return len(self.held) + 1

    def write(self, data: bytes) -> None:
        self.held += data
        if not self.paused and len(self.held) > self.high:
            self.paused = True
            assert self.sub is not None
            if not self.sub.pause():
                self.refused += 1

    def drain(self, count: int | None = None) -> None:
        count = len(self.held) if count is None else count
        self.sock.sendall(self.held[:count])
        del self.held[:count]
        if self.paused and len(self.held) <= self.high // 4:
            self.paused = False
            assert self.sub is not None
            self.sub.resume()


class FlowConn(Conn):
    """A fake connection whose transport has flow control (see FlowTransport)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: Channel, high: int) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.theirs.setblocking(False)
        self.flow = FlowTransport(self.ours, high)
        self.transport = WSTransport(False, self.flow, logging.getLogger("t"), loop)
        self.sub = self.flow.sub = channel.attach(self.transport)
        channel.subscribe(self.sub, ["P"])

    def step(self) -> bytes:
        """The client reads what the transport holds now (which may resume a replay)."""
        out = bytearray()
        count = len(self.flow.held)
        while count:
            piece = min(count, 1 << 15)
            count -= piece
            self.flow.drain(piece)
            out += self.read()
        return bytes(out)

    def pump(self) -> bytes:
        """The client reads until the transport holds nothing."""
        out = bytearray()
        while self.flow.held:
            out += self.step()
        return bytes(out)


def _frames(tag: bytes, count: int, size: int) -> list[bytes]:
    return [build_frame(b"%s%05d" % (tag, n) + b"." * (size - 6)) for n in range(count)]


def test_a_small_replay_and_the_pong_behind_it_leave_in_one_write(loop) -> None:
    # JX.Aphlict sends subscribe, replay and ping together after a restart: a
    # replay an empty transport takes whole waits for the iteration's flush, so
    # the pong joins it. A SEQPACKET pair keeps each send() a record of its own.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel()
    sub = channel.attach(WSTransport(False, PairTransport(ours), logging.getLogger("t"), loop))
    history, pong = _frames(b"h", 3, 100), build_frame(b'{"type":"pong"}')
    assert sub.replay(list(history)) == 3 and not sub.replaying
    assert sub.send(pong)
    assert theirs.recv(1 << 16) == b"".join([*history, pong]), "one send()"
    channel.outbox.flush()
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1 << 16)  # nothing is written twice
    ours.close()
    theirs.close()


def test_a_small_replay_goes_out_with_the_flush_ahead_of_live_frames(loop) -> None:
    channel = Channel()
    conn = Conn(loop)
    sub = channel.attach(conn.transport)
    channel.subscribe(sub, ["P"])
    history, live = _frames(b"h", 3, 100), build_frame(b'{"n":1}')
    assert sub.replay(list(history)) == 3
    channel.publish(["P"], live)
    assert conn.read() == b"" and channel.outbox.pending == 1
    assert channel.outbox.coalesced == 1, "the replay's frames were one write anyway"
    channel.outbox.flush()
    assert conn.read() == b"".join([*history, live])
    conn.close()


def test_a_replay_past_the_low_water_mark_is_written_at_once(loop) -> None:
    # 3000 bytes would leave the transport over a quarter of its 4000-byte cap:
    # that replay is paced (written now, while the transport takes it).
    channel = Channel(Outbox(max_buffered=4000))
    conn = Conn(loop)
    sub = channel.attach(conn.transport)
    history = _frames(b"h", 3, 1000)
    assert sub.replay(list(history)) == 3
    assert conn.read() == b"".join(history) and channel.outbox.pending == 0
    conn.close()


def test_a_pause_right_after_a_replay_paces_instead_of_closing(loop) -> None:
    # The replay is written (no pause), but the transport still holds nearly
    # the cap of it: the next live frame pushes it over. That is the replay's
    # tail, not a slow tab; once drained to the low-water mark it is over.
    overflowed: list[Subscriber] = []
    channel = Channel(Outbox(max_buffered=4000))
    channel.outbox.on_overflow = overflowed.append
    conn = FlowConn(loop, channel, high=4000)
    history = _frames(b"h", 3, 1000)
    assert conn.sub.replay(history) == 3
    assert not conn.flow.paused and not conn.sub.replaying, "written, nothing left to write"
    live = _frames(b"l", 3, 1000)
    for frame in live:
        channel.publish(["P"], frame)
        channel.outbox.flush()
    assert conn.flow.paused and conn.flow.refused == 0, "the pause paces: not slow"
    assert conn.sub.send(build_frame(b"pong"))
    assert conn.pump() == b"".join([*history, *live, build_frame(b"pong")])
    assert not overflowed
    # Drained: the socket is back to the live rule, where a pause is slowness.
    channel.publish(["P"], build_frame(b"x" * 5000))
    channel.outbox.flush()
    assert conn.flow.refused == 1
    conn.close()


def test_live_frames_behind_a_replay_are_judged_by_progress_not_size(loop) -> None:
    # A replay of 40 writes' worth; 1000 bytes of live frames arrive per
    # write the tab drains: 15 times the 2000-byte cap pile up behind it.
    overflowed: list[Subscriber] = []
    channel = Channel(Outbox(max_buffered=2000))
    channel.outbox.on_overflow = overflowed.append
    reader = FlowConn(loop, channel, high=2000)
    history = _frames(b"h", 40 * 64, 1000)  # the replay joins 64 KiB per write
    reader.sub.replay(history)
    received = bytearray()
    live: list[bytes] = []
    for frame in _frames(b"l", 30, 1000):
        live.append(frame)
        channel.publish(["P"], frame)
        channel.outbox.flush()
        received += reader.step()  # one drain: the next replay write goes out
    assert reader.sub.replaying, "the live frames waited behind the replay"
    received += reader.pump()
    assert not overflowed
    assert bytes(received) == b"".join([*history, *live]), "all of it, in order"
    reader.close()


@pytest.mark.parametrize("drains", [False, True], ids=["stopped", "drains-too-slowly"])
def test_a_tab_that_does_not_keep_up_behind_a_replay_is_closed(loop, drains: bool) -> None:
    # Stopped: the first cap's worth of live frames without a drain. Draining,
    # but slower than live frames come: at the hard cap, 16 caps' worth.
    overflowed: list[Subscriber] = []
    channel = Channel(Outbox(max_buffered=2000))
    channel.outbox.on_overflow = overflowed.append
    tab = FlowConn(loop, channel, high=2000)
    tab.sub.replay(_frames(b"h", 100 * 64, 1000))
    queued = 0
    while not overflowed and queued < 40_000:
        channel.publish(["P"], build_frame(b"." * 1000))
        channel.outbox.flush()
        queued += 1004
        if drains and queued % 2008 == 1004:
            tab.step()  # one drain per 2008 bytes: more than the rule asks
    assert overflowed == [tab.sub]
    assert queued > (32_000 if drains else 2000) and queued <= (34_000 if drains else 3012)
    tab.close()


def test_a_tab_draining_a_replay_is_alive_though_its_ping_waits_behind_it(loop) -> None:
    # The sweep's ping queues behind the replay, so its answer can't come
    # before the replay is read: the drains are what prove the peer alive.
    channel = Channel(Outbox(max_buffered=2000))
    tab = FlowConn(loop, channel, high=2000)
    tab.sub.replay(_frames(b"h", 10 * 64, 1000))
    for _ in range(5):
        assert channel.sweep(build_frame(b"ping")) == 0
        tab.step()
    assert tab.sub.attached and tab.sub.replaying
    tab.close()


def test_flush_puts_back_the_sockets_an_exception_did_not_reach(loop) -> None:
    # An overflow handler that raises (any bug would do): the sockets after
    # the failing one keep their frames queued, and later publishes reach them.
    channel = Channel(Outbox(max_buffered=10))

    def broken(sub: Subscriber) -> None:
        raise RuntimeError("handler bug")

    channel.outbox.on_overflow = broken
    paced = FlowConn(loop, channel, high=10)
    channel.unsubscribe(paced.sub, ["P"])
    channel.subscribe(paced.sub, ["Q"])  # matched first: its socket is flushed first
    assert paced.sub.replay([build_frame(b"x" * 100)]) == 1 and paced.flow.paused
    others = [Conn(loop) for _ in range(2)]
    for conn in others:
        channel.subscribe(channel.attach(conn.transport), ["P"])
    frame = build_frame(b'{"n":1,"pad":"over the 10-byte cap"}')
    assert channel.publish(["Q", "P"], frame) == 3
    with pytest.raises(RuntimeError, match="handler bug"):
        channel.outbox.flush()
    assert channel.outbox.pending == 2, "the two sockets not reached are queued again"
    channel.outbox.flush()
    assert [c.read() for c in others] == [frame, frame]
    again = build_frame(b'{"n":2}')
    assert channel.publish(["P"], again) == 2
    channel.outbox.flush()
    assert [c.read() for c in others] == [again, again], "not stranded"
    for conn in [paced, *others]:
        conn.close()


# -- the index under allocation failures -------------------------------------


def _index_is_consistent(channel: Channel, subs: list[Subscriber], phids: list[str]) -> None:
    for phid in phids:
        listeners = {sub for sub in subs if sub.attached and phid in sub.phids}
        assert set(channel.match([phid])) == listeners, phid
    assert channel.phid_count == len({p for sub in subs if sub.attached for p in sub.phids})


def test_index_errors_propagate_and_leave_it_consistent(loop) -> None:
    """Every allocation in subscribe, unsubscribe and detach fails in turn (CPython's
    own fault injection): each call either completes or raises MemoryError, nothing
    is printed as unraisable and swallowed, and the index always agrees with the
    sockets' own PHID lists."""
    testcapi: Any = pytest.importorskip("_testcapi")
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    phids = [f"PHID-{i}" for i in range(20)]  # past the short-list size: sets too
    try:
        conns = [Conn(loop) for _ in range(2)]
        steps: list[tuple[str, int, list[str]]] = [
            ("subscribe", 0, phids[:10]),
            ("subscribe", 1, phids[5:]),
            ("subscribe", 0, phids[10:]),
            ("unsubscribe", 1, phids[::2]),
            ("detach", 0, []),
            ("detach", 1, []),
        ]
        failures = 0
        for start in range(60):
            channel = Channel()
            subs = [channel.attach(c.transport) for c in conns]
            for action, which, arg in steps:
                call = functools.partial(getattr(channel, action), subs[which])
                args = () if action == "detach" else (arg,)
                testcapi.set_nomemory(start, start + 1)
                try:
                    call(*args)
                except MemoryError:
                    failures += 1
                finally:
                    testcapi.remove_mem_hooks()
                _index_is_consistent(channel, subs, phids)
                call(*args)  # memory is back: the same call now completes
                _index_is_consistent(channel, subs, phids)
            assert channel.size == 0 and channel.phid_count == 0
        for conn in conns:
            conn.close()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, [u.exc_value for u in unraisable]
    assert failures, "some allocation failed inside the calls"


@pytest.mark.parametrize(
    ("module", "base", "made_as"),
    [
        ("fastaphlict._subscriber", "Index", "Channel"),
        ("fastaphlict._outbox", "Outlet", "Subscriber"),
    ],
)
def test_a_base_class_of_the_fan_out_cannot_be_made_on_its_own(
    module: str, base: str, made_as: str
) -> None:
    """Made on its own, a base leaves its subclass's fields unset: a Subscriber
    attached to a bare Index would read its channel's outbox as None in C."""
    with pytest.raises(TypeError, match=f"{base} is a base class: make a {made_as}"):
        getattr(importlib.import_module(module), base)()
