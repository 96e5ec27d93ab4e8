"""The compiled fan-out module: framing, the PHID index, and writes to real sockets.

Each fake connection is a real picows ``WSTransport`` whose socket is one end
of a ``socketpair``, so what the index "writes" is read back from the other
end byte for byte.
"""

from __future__ import annotations

import ast
import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import fastaphlict._fanout as fanout
import fastaphlict._history as history_module
from fastaphlict._fanout import Channel, build_frame
from support import Conn


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
