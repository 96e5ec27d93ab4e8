"""The broker's own rules, without Redis: stream ids, the buffer, restore, the channel.

What goes through a real ``redis-server`` (delivery across nodes, catch-up,
outages, the probe) is ``test_broker.py``'s. Here the broker is built on a
hub and never started: :meth:`Broker.relay` and :meth:`Broker.restore` only
touch the buffer, :meth:`Broker.close` hands back what is left, and the
channel's messages are fed to the reader as Redis would hand them over.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import types
from typing import Any

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastaphlict import broker as broker_module
from fastaphlict.broker import MEMBER_TTL, Broker, parse_stream_id, wire
from fastaphlict.broker import commands as commands_module
from fastaphlict.broker import link as link_module
from fastaphlict.broker import publisher as publisher_module
from fastaphlict.config import parse_broker_url
from fastaphlict.hub import Hub
from fastaphlict.protocol import HISTORY_TTL_MS, dumps
from fastaphlict.resp import RedisError
from support import TIMEOUT, eventually, scaled

ME = "ThisNode00000000"
OTHER = "OtherNode0000001"
NOW = 1_700_000_000_000.0
CONFIG = parse_broker_url("redis://fastaphlict:hunter22@127.0.0.1:1/3")


def make(hub: Hub | None = None, **options: Any) -> Broker:
    return Broker(hub or Hub(ME), CONFIG, **options)


def body(n: int) -> bytes:
    return dumps({"key": n, "subscribers": ["PHID-A"], "touched": [ME]})


def channel_message(
    origin: str, seq: int, sid: str, at: float, instance: str, payload: bytes
) -> list[bytes]:
    """A message as the publish script puts it on the channel, as SUBSCRIBE hands it over."""
    encoded = instance.encode()
    data = b"\n".join(
        [
            b"M",
            origin.encode(),
            str(seq).encode(),
            sid.encode(),
            repr(at).encode(),
            str(len(encoded)).encode(),
            encoded + payload,
        ]
    )
    return [b"message", b"fastaphlict:3:messages", data]


def probe(origin: str) -> list[bytes]:
    return [b"message", b"fastaphlict:3:messages", b"P\n" + origin.encode()]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "now_ms", lambda: NOW)


# -- stream ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "sid"),
    [
        (b"1700000000000-3", (1700000000000, 3)),
        ("1700000000000-0", (1700000000000, 0)),
        (b"1700000000000", (1700000000000, 0)),
        ("0-1", (0, 1)),
    ],
)
def test_parse_stream_id_reads_bytes_and_text(raw: bytes | str, sid: tuple[int, int]) -> None:
    assert parse_stream_id(raw) == sid


@given(
    st.tuples(st.integers(0, 2**48), st.integers(0, 2**32)),
    st.tuples(st.integers(0, 2**48), st.integers(0, 2**32)),
)
def test_stream_ids_order_as_redis_orders_them(a: tuple[int, int], b: tuple[int, int]) -> None:
    """By milliseconds, then sequence, as numbers: "10-0" comes after "9-5"."""
    pa, pb = parse_stream_id(f"{a[0]}-{a[1]}".encode()), parse_stream_id(f"{b[0]}-{b[1]}")
    assert (pa, pb) == (a, b)
    assert (pa < pb) == (a[0] < b[0] or (a[0] == b[0] and a[1] < b[1]))


@pytest.mark.parametrize("raw", [b"", b"abc-1", b"1-x", "1.5-0"])
def test_an_unreadable_stream_id_raises_value_error(raw: bytes | str) -> None:
    with pytest.raises(ValueError):
        parse_stream_id(raw)


# -- construction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": -1}, {"probe_interval": 0}, {"buffer_limit": 0}],
)
async def test_settings_that_cannot_work_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make(**options)


async def test_a_new_broker_is_down_and_names_redis_without_the_password() -> None:
    broker = make()
    assert broker.up is False
    assert broker.buffered == 0
    assert broker.display == "redis://fastaphlict:***@127.0.0.1:1/3"
    assert broker.fingerprint == ME
    assert "hunter22" not in repr(broker.config)


async def test_the_channel_is_per_database() -> None:
    """Nodes on different databases of one Redis are different clusters."""
    assert make()._channel == "fastaphlict:3:messages"
    other = Broker(Hub(ME), parse_broker_url("unix:///run/redis.sock?db=0"))
    assert other._channel == "fastaphlict:0:messages"


# -- relay: the publish path ----------------------------------------------------------


async def test_relay_only_appends_numbered_messages_of_this_node(clock: None) -> None:
    broker = make()
    for n in range(3):
        broker.relay("acme", {"key": n}, body(n))
    assert broker.buffered == 3
    assert broker.stats.published == broker.stats.dropped == 0
    left = await asyncio.wait_for(broker.close(), TIMEOUT)
    assert left == [(ME, n + 1, "acme", NOW, body(n)) for n in range(3)]
    assert broker.buffered == 0


async def test_posting_through_the_hub_reaches_the_broker_buffer(clock: None) -> None:
    hub = Hub(ME)
    broker = make(hub)
    hub.add_relay(broker)
    hub.publish("acme", {"subscribers": ["PHID-A"]})
    [(origin, seq, instance, at, payload)] = await asyncio.wait_for(broker.close(), TIMEOUT)
    assert (origin, seq, instance, at) == (ME, 1, "acme", NOW)
    assert payload == dumps({"subscribers": ["PHID-A"], "touched": [ME]})


async def test_a_full_buffer_drops_the_oldest_counts_and_logs_once(
    clock: None, caplog: pytest.LogCaptureFixture
) -> None:
    broker = make(buffer_limit=3)
    with caplog.at_level(logging.WARNING, "fastaphlict.broker"):
        for n in range(10):
            broker.relay("default", {}, body(n))
    assert broker.buffered == 3
    assert broker.stats.dropped == 7
    warnings = [r for r in caplog.records if r.name == "fastaphlict.broker"]
    assert len(warnings) == 1
    assert "broker buffer full (3 messages or 64 MiB)" in warnings[0].getMessage()
    left = await asyncio.wait_for(broker.close(), TIMEOUT)
    assert [seq for _, seq, _, _, _ in left] == [8, 9, 10], "the newest are kept"


async def test_the_default_bound_is_16384_messages() -> None:
    broker = make()
    for _n in range(16384 + 5):
        broker.relay("default", {}, b"{}")
    assert broker.buffered == 16384
    assert broker.stats.dropped == 5


async def test_relay_after_close_counts_the_message_as_dropped() -> None:
    broker = make()
    await asyncio.wait_for(broker.close(), TIMEOUT)
    broker.relay("default", {}, body(1))
    assert broker.buffered == 0 and broker.stats.dropped == 1
    assert await asyncio.wait_for(broker.close(), TIMEOUT) == [], "close is idempotent"


async def test_abandon_hands_back_the_buffer_at_once(clock: None) -> None:
    broker = make()
    broker.relay("default", {}, body(1))
    assert broker.abandon() == [(ME, 1, "default", NOW, body(1))]
    broker.relay("default", {}, body(2))
    assert broker.stats.dropped == 1


# -- restore: what a previous process left in the state directory ------------------------


async def test_restore_queues_saved_messages_as_they_were(
    clock: None, caplog: pytest.LogCaptureFixture
) -> None:
    broker = make()
    saved = [
        ("PreviousProcess1", 41, "acme", NOW - 30_000, body(1)),
        ("PreviousProcess1", 42, "default", NOW - HISTORY_TTL_MS, body(2)),
    ]
    with caplog.at_level(logging.INFO, "fastaphlict.broker"):
        assert broker.restore(saved) == 2
    broker.relay("default", {}, body(3))
    left = await asyncio.wait_for(broker.close(), TIMEOUT)
    assert left == [*saved, (ME, 1, "default", NOW, body(3))], "origin, number and time kept"
    assert broker.stats.dropped == 0
    assert "2 saved message(s) to publish, 0 past the history window dropped" in caplog.text


async def test_restore_drops_what_is_past_the_history_window(clock: None) -> None:
    broker = make()
    saved = [
        ("PreviousProcess1", 1, "default", NOW - HISTORY_TTL_MS - 1, body(1)),
        ("PreviousProcess1", 2, "default", NOW - 120_000, body(2)),
        ("PreviousProcess1", 3, "default", NOW - 1000, body(3)),
    ]
    assert broker.restore(saved) == 1
    assert broker.stats.dropped == 2
    assert [s for _, s, _, _, _ in await asyncio.wait_for(broker.close(), TIMEOUT)] == [3]


async def test_restore_of_nothing_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    broker = make()
    with caplog.at_level(logging.DEBUG, "fastaphlict.broker"):
        assert broker.restore([]) == 0
    assert caplog.records == []


async def test_restored_messages_are_bounded_like_any_other(clock: None) -> None:
    broker = make(buffer_limit=2)
    saved = [("PreviousProcess1", n, "default", NOW - 10, body(n)) for n in range(1, 5)]
    assert broker.restore(saved) == 4
    assert broker.buffered == 2 and broker.stats.dropped == 2


async def test_a_restored_origin_counts_as_our_own(clock: None) -> None:
    """Its messages reached this node's tabs from the saved history: not again from Redis."""
    hub = Hub(ME)
    broker = make(hub)
    broker.restore([("PreviousProcess1", 9, "default", NOW - 1000, body(9))])
    broker._link.on_message(
        channel_message("PreviousProcess1", 9, "5-0", NOW - 1000, "default", body(9))
    )
    broker._link.on_message(
        channel_message("ExpiredProcess01", 1, "6-0", NOW - 1000, "default", body(1))
    )
    assert hub.stats.messages_in == 1, "only the message of the origin not restored"
    assert broker.stats.received == 1

    expired = make(Hub(ME))
    expired.restore([("ExpiredProcess01", 1, "default", NOW - HISTORY_TTL_MS - 1, body(1))])
    expired._link.on_message(channel_message("ExpiredProcess01", 1, "6-0", NOW, "default", body(1)))
    assert expired.stats.received == 1, "an origin none of whose messages was restored is not ours"


async def test_the_server_is_told_once_every_restored_message_is_acknowledged(
    clock: None,
) -> None:
    """Only then may the saved file go: a crash before must find them again."""
    broker = make(buffer_limit=3)
    told: list[int] = []
    broker.on_restored = lambda: told.append(broker.buffered)
    saved = [("PreviousProcess1", n, "default", NOW - 10, body(n)) for n in range(1, 5)]
    assert broker.restore(saved) == 4  # the bound drops the oldest: it counts as done
    broker.relay("default", {}, body(5))
    assert broker.buffered == 3 and not told

    def acknowledge(count: int) -> None:
        broker._publisher._in_flight = [broker._publisher._buffer.popleft() for _ in range(count)]
        broker._publisher._published([b"1-0"] * count, None)

    acknowledge(1)  # PreviousProcess1:3
    broker._publisher._in_flight = [broker._publisher._buffer.popleft()]
    broker._publisher._published(None, ConnectionError("lost"))  # PreviousProcess1:4 comes back
    assert not told
    acknowledge(1)  # PreviousProcess1:4
    assert told == [1], "told once the last restored one is in, our own still buffered"
    acknowledge(1)
    assert told == [1]


async def test_a_first_sync_delivers_from_the_time_it_is_given(clock: None) -> None:
    """A node with a state directory delivers what its tabs missed while it was away.

    Only once it serves: a sync before the listeners open has no tab to deliver to.
    """
    for serving, deliver_from, delivered in (
        (True, None, 0),
        (True, NOW - 10_000, 1),
        (False, NOW - 10_000, 0),
    ):
        broker = make()
        broker._link.serving = serving
        if deliver_from is not None:
            broker.deliver_from(deliver_from)
        page = [
            (
                f"{int(NOW) - age}-0".encode(),
                [
                    b"o",
                    OTHER.encode(),
                    b"s",
                    str(n).encode(),
                    b"a",
                    repr(NOW - age).encode(),
                    b"p",
                    body(n),
                ],
            )
            for n, age in ((1, 20_000), (2, 5_000))
        ]
        assert await broker._link.catch_up_instance(None, "default", page, 1.0) == 2  # type: ignore[arg-type]
        assert broker.stats.received == delivered


# -- the channel: what other nodes published -----------------------------------------------


async def test_another_nodes_message_is_delivered_with_its_acceptance_time() -> None:
    hub = Hub(ME)
    broker = make(hub)
    at = time.time() * 1000 - 4000
    broker._link.on_message(channel_message(OTHER, 1, "10-0", at, "acme \u2713", body(1)))
    assert broker.stats.received == 1
    status = hub.status("acme \u2713")
    assert status["history.size"] == 1
    assert 4000 <= status["history.age"] < 4000 + TIMEOUT * 1000
    assert broker.is_member(OTHER) and broker.members() == [OTHER]


async def test_our_own_messages_on_the_channel_are_skipped() -> None:
    """They reached this node's tabs when they were posted."""
    hub = Hub(ME)
    broker = make(hub)
    broker._link.on_message(channel_message(ME, 1, "10-0", NOW, "default", body(1)))
    assert hub.stats.messages_in == 0 and broker.stats.received == 0
    assert not broker.is_member(ME)
    assert broker._link.read["default"] == (10, 0), "the position follows them"
    broker._link.on_message(channel_message(ME, 2, "9-0", NOW, "acme \u2713", body(2)))
    broker._link.on_message(channel_message(ME, 1, "9-5", NOW, "default", body(1)))
    assert broker._link.read == {"default": (10, 0), "acme \u2713": (9, 0)}
    assert broker.stats.malformed == 0


async def test_a_message_the_catch_up_already_gave_is_skipped_by_stream_position() -> None:
    hub = Hub(ME)
    broker = make(hub)
    for seq, sid in ((1, "9-5"), (2, "10-0"), (2, "10-0"), (1, "9-5"), (3, "10-1")):
        broker._link.on_message(channel_message(OTHER, seq, sid, NOW, "default", body(seq)))
    assert broker.stats.received == 3, "9-5, 10-0 and 10-1 once each"
    assert broker._link.read["default"] == (10, 1), "numbers, not text, order them"
    # Below the position but not a repeat: a new primary whose clock is behind.
    broker._link.on_message(channel_message(OTHER, 4, "9-0", NOW, "default", body(4)))
    assert broker.stats.received == 4
    assert broker._link.read["default"] == (9, 0), "the position follows the new server"
    broker._link.on_message(channel_message(OTHER, 5, "1-0", NOW, "other", body(5)))
    assert broker.stats.received == 5, "positions are per instance"


@pytest.mark.parametrize("origin", [b"O", ME.encode()], ids=["another node's", "our own"])
@pytest.mark.parametrize(
    "data",
    [
        b"M\n<origin>\nshort",
        b"M\n<origin>\n1\nnot-an-id\n1.0\n7\ndefault{}",
        b"M\n<origin>\n1\n1-0\nsoon\n7\ndefault{}",
        b"M\n<origin>\n1\n1-0\n1.0\nseven\ndefault{}",
        b"M\n<origin>\none\n1-0\n1.0\n7\ndefault{}",
        b"M\n<origin>\n1\n1-0\n1.0\n70\ndefault{}",
        b"M\n<origin>\n1\n1-0\n1.0\n-1\ndefault{}",
    ],
)
async def test_an_unreadable_channel_message_is_logged_and_skipped(
    origin: bytes, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    reply = [b"message", b"fastaphlict:3:messages", data.replace(b"<origin>", origin)]
    hub = Hub(ME)
    broker = make(hub)
    with caplog.at_level(logging.WARNING, "fastaphlict.broker"):
        broker._link.on_message(reply)
    assert "skipped unreadable message on fastaphlict:3:messages" in caplog.text
    assert hub.stats.messages_in == 0 and broker.stats.received == 0
    assert broker.stats.malformed == 1


@pytest.mark.parametrize(
    "reply",
    [
        [b"subscribe", b"fastaphlict:3:messages", 1],
        [b"message", b"fastaphlict:3:messages", b"X\nsomething newer"],
        b"OK",
        None,
    ],
)
async def test_other_replies_are_ignored(reply: Any, caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub(ME)
    broker = make(hub)
    broker._link.on_message(reply)
    assert hub.stats.messages_in == 0 and broker.stats.received == 0
    assert caplog.records == []


async def test_probes_make_members_and_our_own_probe_is_not_one() -> None:
    broker = make()
    before = broker._link.last_probe
    broker._link.on_message(probe(OTHER))
    broker._link.on_message(probe(ME))
    assert broker.members() == [OTHER]
    assert broker.is_member(OTHER) and not broker.is_member(ME)
    assert not broker.is_member("NeverSeen0000000")
    assert broker._link.last_probe > before, "our own probe came back"


async def test_members_are_forgotten_after_their_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(
        link_module, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    )
    broker = make()
    broker._link.on_message(probe(OTHER))
    now[0] += MEMBER_TTL
    assert broker.is_member(OTHER) and broker.members() == [OTHER]
    now[0] += 1
    assert not broker.is_member(OTHER)
    assert broker.members() == []
    assert MEMBER_TTL > HISTORY_TTL_MS / 1000, "longer than a history window"


# -- the publisher: failures keep the buffer, in order, within its bound ------------------------


class FakeCommands:
    """Stands in for the command connection: records each batch sent; the test answers it."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Any], Any]] = []
        self.answered = 0
        self.is_closed = False

    def send_batch(self, commands: list[Any], done: Any) -> None:
        self.batches.append((commands, done))

    def close(self) -> None:
        self.is_closed = True

    @property
    def sent(self) -> list[list[int]]:
        """The sequence numbers of each batch (the EVALSHA's 9th word)."""
        return [[command[8] for command in commands] for commands, _ in self.batches]

    def answer(self, ok: bool = True) -> None:
        """Reply to the oldest unanswered batch: every script ran, or the connection was lost."""
        commands, done = self.batches[self.answered]
        self.answered += 1
        if ok:
            done([b"1-0"] * len(commands), None)
        else:
            self.is_closed = True
            done(None, broker_module.RedisError("Connection refused"))


def fake_commands(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> list[FakeCommands]:
    """Every (re)connection the publisher makes gets a new fake; the list holds them all."""
    made: list[FakeCommands] = []

    async def connect() -> FakeCommands:
        if broker._commands.conn is None or broker._commands.conn.is_closed:
            made.append(FakeCommands())
            broker._commands.conn = made[-1]  # type: ignore[assignment]
        return broker._commands.conn  # type: ignore[return-value]

    monkeypatch.setattr(broker._commands, "get", connect)
    return made


def batches(made: list[FakeCommands]) -> list[list[int]]:
    return [batch for conn in made for batch in conn.sent]


async def test_a_failed_publish_is_retried_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = make()
    made = fake_commands(broker, monkeypatch)
    for n in range(5):
        broker.relay("default", {}, body(n))
    task = asyncio.create_task(broker._publisher.run())
    try:
        for attempt in range(2):
            await eventually(lambda a=attempt: len(made) == a + 1 and made[-1].batches)
            made[-1].answer(ok=False)
        await eventually(lambda: len(made) == 3 and made[-1].batches)
        made[-1].answer()
        assert broker.stats.published == 5
        broker.relay("default", {}, body(5))  # sent at once: nothing is out
        made[-1].answer()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert batches(made) == [[1, 2, 3, 4, 5]] * 3 + [[6]]
    assert broker.stats.publish_failures == 2
    assert broker.stats.dropped == 0
    assert broker.stats.latency.count == 6
    assert broker.buffered == 0


async def test_messages_accepted_while_a_batch_is_out_leave_together_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = make()
    made = fake_commands(broker, monkeypatch)
    task = asyncio.create_task(broker._publisher.run())
    try:
        broker.relay("default", {}, body(1))
        await eventually(lambda: bool(made) and bool(made[-1].batches))
        for n in range(2, 5):
            broker.relay("default", {}, body(n))
        assert batches(made) == [[1]], "one batch out at a time"
        made[-1].answer()
        assert batches(made) == [[1], [2, 3, 4]], "the rest leaves with the reply, in order"
        made[-1].answer()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert broker.stats.published == 4


async def test_a_batch_that_fails_while_the_buffer_filled_keeps_the_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages relayed while a publish is in flight count against the bound when it fails."""
    broker = make(buffer_limit=4)
    made = fake_commands(broker, monkeypatch)
    broker.relay("default", {}, body(1))
    broker.relay("default", {}, body(2))
    task = asyncio.create_task(broker._publisher.run())
    try:
        await eventually(lambda: broker._publisher._in_flight != [])
        assert broker.buffered == 2, "in flight is not acknowledged yet: still counted"
        for n in range(3, 7):
            broker.relay("default", {}, body(n))
        assert broker.stats.dropped == 0
        with caplog.at_level(logging.WARNING, "fastaphlict.broker"):
            made[-1].answer(ok=False)
            assert broker.stats.publish_failures == 1
            assert broker.stats.dropped == 2, "the two oldest"
            await eventually(lambda: len(made) == 2 and bool(made[-1].batches))
            made[-1].answer()
            assert broker.stats.published == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert batches(made) == [[1, 2], [3, 4, 5, 6]]
    assert "dropping the oldest" in caplog.text, "what the bound drops is logged"


async def test_a_batch_in_flight_counts_as_buffered_and_is_handed_back_by_abandon(
    monkeypatch: pytest.MonkeyPatch, clock: None
) -> None:
    """While Redis takes its time, /metrics still counts them, and a forced stop keeps them."""
    broker = make()
    made = fake_commands(broker, monkeypatch)
    broker.relay("default", {}, body(1))
    task = asyncio.create_task(broker._publisher.run())
    broker._tasks = [task]
    await eventually(lambda: broker._publisher._in_flight != [])
    broker.relay("default", {}, body(2))
    assert broker.buffered == 2
    left = broker.abandon()
    await asyncio.gather(task, return_exceptions=True)
    assert [seq for _, seq, _, _, _ in left] == [1, 2], "the batch in flight first, in order"
    assert made[-1].is_closed


async def test_close_waits_for_the_batch_in_flight_while_publishing_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch Redis is about to acknowledge is not handed back as unpublished (or dropped)."""
    broker = make()
    made = fake_commands(broker, monkeypatch)
    broker.relay("default", {}, body(1))
    broker._tasks = [asyncio.create_task(broker._publisher.run())]
    await eventually(lambda: broker._publisher._in_flight != [])
    closing = asyncio.create_task(broker.close(drain_timeout=TIMEOUT))
    await asyncio.sleep(0.05)
    assert not closing.done(), "still draining"
    made[-1].answer()
    assert await asyncio.wait_for(closing, TIMEOUT) == []
    assert broker.stats.published == 1


async def test_a_batch_without_replies_is_given_up_a_whole_timeout_after_it_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each batch gets the whole ``timeout`` from when it left, not from an earlier batch's.

    One timer watches every batch out (no timer per message): when it fires
    for a batch that was answered meanwhile, the batch out now is younger and
    must not be given up with it.
    """
    timeout = scaled(0.5)
    broker = make(timeout=timeout)
    made = fake_commands(broker, monkeypatch)
    task = asyncio.create_task(broker._publisher.run())
    try:
        broker.relay("default", {}, body(1))
        await eventually(lambda: bool(made) and bool(made[-1].batches))
        first_left = time.monotonic()
        await asyncio.sleep(0.6 * timeout)
        made[-1].answer()
        broker.relay("default", {}, body(2))  # leaves at once, never answered
        second_left = time.monotonic()
        assert batches(made) == [[1], [2]]
        await asyncio.sleep(first_left + 1.3 * timeout - time.monotonic())
        assert not made[-1].is_closed, "given up on the first batch's time"
        await eventually(lambda: made[-1].is_closed, timeout=TIMEOUT + timeout)
        assert time.monotonic() - second_left >= timeout
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert broker.stats.published == 1


async def test_a_write_that_raises_puts_the_batch_back_for_the_publisher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop raises RuntimeError writing to a transport that closed this very iteration."""
    broker = make()
    made = fake_commands(broker, monkeypatch)
    task = asyncio.create_task(broker._publisher.run())
    try:
        broker.relay("default", {}, body(1))
        await eventually(lambda: bool(made) and bool(made[-1].batches))
        made[-1].answer()

        def closed_handle(commands: list[Any], done: Any) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        monkeypatch.setattr(made[-1], "send_batch", closed_handle)
        broker.relay("default", {}, body(2))  # must not raise into the post
        assert broker.buffered == 1 and broker.stats.publish_failures == 1
        await eventually(lambda: len(made) == 2 and bool(made[-1].batches))
        made[-1].answer()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert batches(made) == [[1], [2]]
    assert broker.stats.published == 2


async def test_a_catch_up_that_fails_midway_reads_the_instance_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read position moves only once an instance is read whole and delivered."""
    hub = Hub(ME)
    broker = make(hub)
    now = time.time() * 1000
    entries = [
        [f"{int(now) - 1000 + n}-0".encode(), [b"o", b"OTHER", b"s", b"%d" % n, b"a",
         repr(now - 1000 + n).encode(), b"p", body(n)]]
        for n in range(5)
    ]  # fmt: skip
    fail = [True]

    async def reply(command: tuple[Any, ...]) -> Any:
        if command[0] == "ZRANGE":
            return [b"acme"]
        start = command[2]
        rest = (
            entries
            if start == "-"
            else [e for e in entries if parse_stream_id(e[0]) > parse_stream_id(start[1:])]
        )
        page = rest[:2]
        if page and page[0] is not entries[0] and fail[0]:
            fail[0] = False
            raise broker_module.RedisError("connection lost")  # the second page
        return page

    class Reads:
        """The catch-up's connection."""

        async def execute(self, command: tuple[Any, ...], timeout: float) -> Any:
            return await reply(command)

        async def execute_many(self, commands: list[Any], timeout: float) -> list[Any]:
            return [await reply(command) for command in commands]

    monkeypatch.setattr(broker._link, "_catch_up_page", 2)
    reads: Any = Reads()
    with pytest.raises(broker_module.RedisError):
        await broker._link.catch_up(reads)
    assert "acme" not in broker._link.read, "nothing of a failed read counts as read"
    assert await broker._link.catch_up(reads) == 5
    assert hub.status("acme")["history.size"] == 5
    assert broker._link.read["acme"] == parse_stream_id(entries[-1][0])


async def test_a_message_redis_took_twice_is_delivered_once() -> None:
    """Published, reply lost, retried on a new primary without its mark: two stream entries."""
    hub = Hub(ME)
    broker = make(hub)
    now = time.time() * 1000
    broker._link.on_message(channel_message(OTHER, 7, "10-0", now - 100, "acme", body(7)))
    broker._link.on_message(channel_message(OTHER, 7, "11-0", now - 100, "acme", body(7)))
    broker._link.on_message(channel_message(OTHER, 8, "12-0", now - 50, "acme", body(8)))
    assert broker.stats.received == 2
    assert hub.status("acme")["history.size"] == 2


async def test_close_tries_once_more_at_once_when_the_publisher_is_backing_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a blip Redis is back, but the publisher waits out its backoff: the stop doesn't."""
    monkeypatch.setattr(publisher_module, "BACKOFF_FIRST", 60.0)
    broker = make()
    made = fake_commands(broker, monkeypatch)
    broker.relay("default", {}, body(1))
    broker._tasks = [asyncio.create_task(broker._publisher.run())]
    await eventually(lambda: bool(made) and bool(made[-1].batches))
    made[-1].answer(ok=False)  # the publisher now backs off for a minute
    closing = asyncio.create_task(broker.close(drain_timeout=TIMEOUT))
    await eventually(lambda: len(made) == 2 and bool(made[-1].batches), what="a new attempt")
    made[-1].answer()
    assert await asyncio.wait_for(closing, TIMEOUT) == []
    assert broker.stats.published == 1


async def test_close_during_an_outage_hands_back_what_one_more_attempt_could_not_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = make()
    made = fake_commands(broker, monkeypatch)
    broker.relay("default", {}, body(1))
    broker._tasks = [asyncio.create_task(broker._publisher.run())]
    await eventually(lambda: bool(made) and bool(made[-1].batches))
    made[-1].answer(ok=False)
    closing = asyncio.create_task(broker.close(drain_timeout=TIMEOUT))
    await eventually(lambda: len(made) == 2 and bool(made[-1].batches), what="a new attempt")
    made[-1].answer(ok=False)
    left = await asyncio.wait_for(closing, TIMEOUT)
    assert [seq for _, seq, _, _, _ in left] == [1]
    assert len(made) == 2, "one attempt at the stop, no more"


async def test_the_buffer_is_bounded_in_bytes_too(caplog: pytest.LogCaptureFixture) -> None:
    """Big posts during an outage: the oldest go once the bytes pass the bound."""
    broker = make(buffer_bytes=3000)
    big = [dumps({"key": n, "subscribers": [], "pad": "x" * 900}) for n in range(5)]
    with caplog.at_level(logging.WARNING, "fastaphlict.broker"):
        for payload in big:
            broker.relay("default", {}, payload)
    assert broker.buffered == 3 and broker.stats.dropped == 2
    assert [item[1] for item in broker._publisher._buffer] == [3, 4, 5], "the newest stay"
    assert "dropping the oldest" in caplog.text
    huge = dumps({"key": "huge", "pad": "x" * 5000})
    broker.relay("default", {}, huge)
    assert [item[4] for item in broker._publisher._buffer] == [huge], "one message always fits"


def test_the_permission_check_runs_every_command_the_publish_script_runs() -> None:
    """A command added to the script and not to the check would go unnamed in the log."""
    used = set(re.findall(r"redis\.call\('(\w+)'", commands_module.PUBLISH_LUA))
    checked = set(re.findall(r"try\('(\w+)'", commands_module.CHECK_LUA))
    assert used and used == checked


@pytest.mark.parametrize(
    ("load", "check", "refused"),
    [
        (b"sha", [], None),
        (b"sha", [[b"xadd", b"ERR The user executing the script can't run this command"]], "xadd"),
        (b"sha", [[b"time", b"NOPERM no permissions"], [b"time", b"NOPERM x"]], "time"),
        (b"sha", [[b"xadd", b"READONLY You can't write against a read only replica."]], None),
        (hiredis.ReplyError("NOPERM this user has no permissions"), None, "script|load"),
        (b"sha", hiredis.ReplyError("NOPERM no permissions to run 'evalsha'"), "evalsha"),
        (b"sha", hiredis.ReplyError("NOSCRIPT No matching script"), None),
    ],
)
def test_the_permission_check_names_only_refused_permissions(
    load: Any, check: Any, refused: str | None
) -> None:
    found = wire.refusals(load, check)
    assert (found.split(" (")[0] if found else None) == refused


def test_a_script_load_refused_for_another_reason_is_an_error() -> None:
    with pytest.raises(RedisError, match="SCRIPT LOAD refused"):
        wire.refusals(hiredis.ReplyError("ERR unknown command"), None)
