"""The broker's wire, without Redis: bytes in, outcomes out (``fastaphlict.broker.wire``).

The channel's formats as the publish script writes them, stream entries as
XRANGE hands them over, the window against duplicates, the position rule,
and the permission check's replies, each fed as a table, malformed inputs
included. What goes through a real ``redis-server`` is ``test_broker.py``'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastaphlict.broker import commands, wire
from fastaphlict.broker.wire import ChannelMessage, Probe, SeenWindow
from fastaphlict.resp import RedisError

ORIGIN = "OtherNode0000001"


# -- the channel --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"M\nOtherNode0000001\n7\n1700000000000-3\n1700000000000.5\n7\ndefault{}",
            ChannelMessage(ORIGIN, 7, (1700000000000, 3), 1700000000000.5, "default", b"{}"),
        ),
        (
            # The payload may hold newlines: only the first six split.
            b'M\nA\n1\n5-0\n1.0\n4\nacme{\n"k":1\n}',
            ChannelMessage("A", 1, (5, 0), 1.0, "acme", b'{\n"k":1\n}'),
        ),
        (
            # An empty instance name and an empty payload are still a message.
            b"M\nA\n1\n5\n1.0\n0\n",
            ChannelMessage("A", 1, (5, 0), 1.0, "", b""),
        ),
        (
            "M\nA\n2\n9-1\n2.0\n8\nacme \u2713{}".encode(),
            ChannelMessage("A", 2, (9, 1), 2.0, "acme \u2713", b"{}"),
        ),
        (b"P\nThisNode00000000", Probe("ThisNode00000000")),
        (b"P\n", Probe("")),
        (b"P\n\xff", Probe("\ufffd")),
        # What is neither (the permission check's publish, anything else): ignored.
        (b"C", None),
        (b"", None),
        (b"X\nA", None),
        (b"m\nA\n1\n5-0\n1.0\n0\n", None),
    ],
)
def test_channel_messages_read(data: bytes, expected: object) -> None:
    assert wire.decode(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"M\n",
        b"M\nA\n1\n5-0\n1.0",  # fewer than seven parts
        b"M\nA\nseven\n5-0\n1.0\n0\n",  # the sequence is no number
        b"M\nA\n1\n5-0\n1.0\nx\n",  # the name's length is no number
        b"M\nA\n1\n5-0\n1.0\n-1\nacme",  # a negative length
        b"M\nA\n1\n5-0\n1.0\n9\nacme",  # longer than what follows
        b"M\nA\n1\nfive-0\n1.0\n0\n",  # the stream id
        b"M\nA\n1\n5-0\nsoon\n0\n",  # the acceptance time
        b"M\nA\n1\n5-0\n1.0\n2\n\xff\xfe",  # an instance name that is not UTF-8
    ],
)
def test_unreadable_channel_messages_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode(data)


@given(
    origin=st.text(st.sampled_from("23456789abcdefghjkmnpq"), min_size=1, max_size=16),
    seq=st.integers(0, 2**53),
    sid=st.tuples(st.integers(0, 2**48), st.integers(0, 2**32)),
    at=st.floats(0, 2e12, allow_nan=False),
    instance=st.text(max_size=20),
    payload=st.binary(max_size=64),
)
def test_a_written_message_reads_back(
    origin: str, seq: int, sid: tuple[int, int], at: float, instance: str, payload: bytes
) -> None:
    data = wire.encode_message(origin, seq, sid, at, instance, payload)
    assert wire.decode(data) == ChannelMessage(origin, seq, sid, at, instance, payload)


def test_a_probe_reads_back() -> None:
    assert wire.decode(wire.encode_probe("ThisNode00000000")) == Probe("ThisNode00000000")


def test_the_script_writes_the_format_the_reader_reads() -> None:
    """The Lua mirror of encode_message: the fields in the same order, the name's length first."""
    assert (
        "'M\\n' .. ARGV[2] .. '\\n' .. ARGV[3] .. '\\n' .. id .. '\\n'\n"
        "  .. ARGV[4] .. '\\n' .. #ARGV[1] .. '\\n' .. ARGV[1] .. ARGV[5]"
    ) in commands.PUBLISH_LUA


# -- stream entries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flat", "expected"),
    [
        ([b"o", b"A", b"s", b"3", b"a", b"1.5", b"p", b"{}"], ("A", 3, 1.5, b"{}")),
        # Field order does not matter, and extra fields are ignored.
        ([b"p", b"x", b"a", b"2", b"s", b"4", b"o", b"B", b"z", b"1"], ("B", 4, 2.0, b"x")),
    ],
)
def test_stream_entries_read(flat: list[Any], expected: tuple[Any, ...]) -> None:
    assert wire.entry_fields(flat) == expected


@pytest.mark.parametrize(
    ("flat", "error"),
    [
        ([b"o", b"A", b"s", b"3", b"a", b"1.5"], KeyError),  # no payload
        ([b"s", b"3", b"a", b"1.5", b"p", b"{}"], KeyError),  # no origin
        ([b"o", b"A", b"s", b"three", b"a", b"1.5", b"p", b"{}"], ValueError),
        ([b"o", b"A", b"s", b"3", b"a", b"later", b"p", b"{}"], ValueError),
        ([b"o", b"A", b"s", b"3", b"a", b"1.5", b"p", 7], TypeError),
        ([b"o", b"A", b"s", b"3", b"a", b"1.5", b"p"], ValueError),  # odd length
        ([b"o", b"\xff", b"s", b"3", b"a", b"1.5", b"p", b"{}"], ValueError),
    ],
)
def test_unreadable_stream_entries_raise(flat: list[Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        wire.entry_fields(flat)


@pytest.mark.parametrize(
    ("raw", "sid"),
    [(b"1-2", (1, 2)), ("3", (3, 0)), (b"0-0", (0, 0))],
)
def test_stream_ids(raw: bytes | str, sid: tuple[int, int]) -> None:
    assert wire.parse_stream_id(raw) == sid
    assert wire.parse_stream_id(wire.format_id(sid)) == sid


# -- the window against duplicates ----------------------------------------------------


def test_the_window_notes_each_number_once_per_origin() -> None:
    seen = SeenWindow()
    assert (ORIGIN, 1) not in seen
    assert seen.add(ORIGIN, 1) is False, "new"
    assert (ORIGIN, 1) in seen
    assert seen.add(ORIGIN, 1) is True, "a repeat"
    assert seen.add("Another000000001", 1) is False, "per origin"


def test_the_window_keeps_the_most_recent_numbers() -> None:
    seen = SeenWindow(size=3)
    for seq in (1, 2, 3, 4):
        seen.add(ORIGIN, seq)
    assert [(ORIGIN, seq) in seen for seq in (1, 2, 3, 4)] == [False, True, True, True]
    assert seen.add(ORIGIN, 1) is False, "out of the window: taken as new"


def test_the_window_forgets_departed_origins() -> None:
    seen = SeenWindow()
    seen.add(ORIGIN, 1)
    seen.add("Departed00000001", 1)
    seen.keep_only([ORIGIN])
    assert len(seen) == 1
    assert (ORIGIN, 1) in seen and ("Departed00000001", 1) not in seen


# -- the position rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "sid", "known", "taken"),
    [
        (None, (5, 0), True, False),  # no position yet: nothing was taken in
        ((10, 0), (11, 0), True, False),  # past the position: new
        ((10, 0), (10, 1), False, False),
        ((10, 0), (10, 0), True, True),  # at the position, known: the catch-up had it
        ((10, 1), (9, 5), True, True),  # numbers, not text: 9-5 is before 10-1
        ((10, 0), (9, 0), False, False),  # below but unknown: a new primary's clock behind
    ],
)
def test_the_position_rule(
    last: tuple[int, int] | None, sid: tuple[int, int], known: bool, taken: bool
) -> None:
    assert wire.taken_in(last, sid, known) is taken


# -- the permission check ---------------------------------------------------------------


NOPERM = b"NOPERM User fastaphlict has no permissions to run the 'xadd' command"


@pytest.mark.parametrize(
    ("load", "check", "expected"),
    [
        (b"sha", [], None),
        (b"sha", [[b"xadd", NOPERM]], f"xadd ({NOPERM.decode()})"),
        (
            b"sha",
            [[b"xadd", NOPERM], [b"pexpire", b"NOPERM no"], [b"pexpire", b"NOPERM no"]],
            f"xadd, pexpire ({NOPERM.decode()})",
        ),
        (b"sha", [[b"xadd", b"OOM command not allowed"]], None),  # not about permissions
        (b"sha", [[b"xadd"]], None),  # not a pair
        (b"sha", b"unexpected", None),
        (
            b"sha",
            hiredis.ReplyError("NOPERM this user has no permissions to run 'evalsha'"),
            "evalsha (NOPERM this user has no permissions to run 'evalsha')",
        ),
        (b"sha", hiredis.ReplyError("READONLY You can't write against a replica."), None),
        (
            hiredis.ReplyError("NOPERM no permissions to run the 'script|load' command"),
            None,
            "script|load (NOPERM no permissions to run the 'script|load' command)",
        ),
    ],
)
def test_refusals(load: Any, check: Any, expected: str | None) -> None:
    assert wire.refusals(load, check) == expected


def test_a_script_load_refused_for_another_reason_is_an_error() -> None:
    with pytest.raises(RedisError):
        wire.refusals(hiredis.ReplyError("ERR unknown command"), None)


# -- small readings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "run_id"),
    [
        (b"# Server\r\nredis_version:7.2.4\r\nrun_id:abc123\r\ntcp_port:6379\r\n", "abc123"),
        (b"# Server\r\nredis_version:7.2.4\r\n", None),
        (b"", None),
    ],
)
def test_run_id(info: bytes, run_id: str | None) -> None:
    assert wire.run_id(info) == run_id


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (asyncio.TimeoutError(), "timed out"),
        (ConnectionRefusedError("refused"), "ConnectionRefusedError: refused"),
        (RedisError(""), "RedisError"),
    ],
)
def test_reasons(exc: BaseException, text: str) -> None:
    assert wire.reason(exc) == text
