"""The protocol's pure rules, fed bytes (spec §1 admin, §2 client, §4 history).

Every rule of :mod:`fastaphlict.protocol` is checked here from tables, without
sockets; the socket tests elsewhere prove the wiring.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fastaphlict.admin import AdminProtocol
from fastaphlict.hub import Hub
from fastaphlict.protocol import (
    HISTORY_TTL_MS,
    MAX_DEPTH,
    NestingTooDeep,
    dumps,
    instance_from_path,
    loads,
    parse_command,
    parse_post_head,
    query_instance,
    replay_age,
)

#: Depths around every limit in play: MAX_DEPTH and orjson's writer (254),
#: Python's recursion limit (~1000), orjson's reader (1024), and far past them.
DEPTHS = [1, 2, 253, 254, 255, 256, 500, 1000, 1023, 1024, 1025, 5000, 100_000]


# -- JSON as JavaScript reads and writes it -----------------------------------------


@pytest.mark.parametrize(
    "value",
    [{"a": "é日本"}, {"n": 2**63 - 1}, {"k": [1, 2.5, None, True]}, {"z": 1, "a": 2}],
)
def test_dumps_is_compact_utf8_and_keeps_order(value: dict) -> None:
    out = dumps(value)
    assert b" " not in out
    assert loads(out) == value
    assert list(loads(out)) == list(value)
    assert b"\\u" not in out


def _nested_text(depth: int, kind: str, leaf: str = "1") -> str:
    """JSON text ``depth`` containers deep (``[]`` is 1 deep), ``leaf`` innermost."""
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


def _nested_value(depth: int, leaf: object = 1) -> list:
    value: object = leaf
    for _ in range(depth):
        value = [value]
    return value  # type: ignore[return-value]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize(
    "form",
    ["bytes", "str", "surrogate", "overflow"],
    ids=["orjson", "str", "fallback-surrogate", "fallback-overflow"],
)
def test_loads_accepts_max_depth_and_refuses_deeper_whichever_parser(
    depth: int, kind: str, form: str
) -> None:
    """One rule for every parser: past MAX_DEPTH is NestingTooDeep, never RecursionError.

    A lone surrogate or a number past a double's range sends the body through
    the standard library instead of orjson; the answer must not change.
    """
    leaf = {"surrogate": '"\\ud800"', "overflow": "1e400"}.get(form, "1")
    text = _nested_text(depth, kind, leaf)
    body: bytes | str = text if form == "str" else text.encode()
    if depth <= MAX_DEPTH:
        value = loads(body)
        assert loads(dumps(value)) == value
    else:
        with pytest.raises(NestingTooDeep):
            loads(body)


def test_nesting_too_deep_is_a_value_error() -> None:
    """Callers that refuse invalid JSON (ValueError) refuse deep JSON with no change."""
    assert issubclass(NestingTooDeep, ValueError)


def test_max_depth_is_what_orjson_writes() -> None:
    """Every value loads() returns takes orjson's fast path out; a new orjson must keep that."""
    orjson.dumps(_nested_value(MAX_DEPTH))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(_nested_value(MAX_DEPTH + 1))
    assert orjson.loads(_nested_text(MAX_DEPTH + 1, "list")), "orjson reads deeper than it writes"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 1000, 5000])
@pytest.mark.parametrize("leaf", [1, "\ud800", 10**30], ids=["plain", "surrogate", "huge-int"])
def test_dumps_refuses_what_loads_refuses(depth: int, leaf: object) -> None:
    """Past MAX_DEPTH dumps() raises NestingTooDeep, never RecursionError nor deep output."""
    with pytest.raises(NestingTooDeep):
        dumps(_nested_value(depth, leaf))


@pytest.mark.parametrize("leaf", [1, "\ud800", 10**30], ids=["plain", "surrogate", "huge-int"])
def test_dumps_writes_max_depth(leaf: object) -> None:
    out = dumps(_nested_value(MAX_DEPTH, leaf))
    assert out.startswith(b"[" * MAX_DEPTH) and out.endswith(b"]" * MAX_DEPTH)


# -- client commands, paths and replay windows --------------------------------------


@pytest.mark.parametrize(
    ("path", "instance"),
    [
        ("/~acme/", "acme"),
        ("/~a/b/", "ab"),
        ("/~a~b", "a"),
        ("/~/", "default"),
        ("/", "default"),
        ("", "default"),
        ("/~acme/?instance=acme", "acme"),
        ("/?instance=acme", "default"),
        ("/ws/~acme", "acme"),
        ("/~a%20b/", "a%20b"),
        (b"/~acme/", "acme"),
    ],
)
def test_instance_from_path(path: str | bytes, instance: str) -> None:
    assert instance_from_path(path) == instance


def test_replay_age_rule() -> None:
    assert replay_age(None) == HISTORY_TTL_MS
    assert replay_age({}) == HISTORY_TTL_MS
    assert replay_age({"age": 0}) == HISTORY_TTL_MS
    assert replay_age({"age": "5"}) == HISTORY_TTL_MS
    assert replay_age({"age": 1500}) == 1500
    assert replay_age({"age": 2.5}) == 2.5
    assert replay_age({"age": 10**9}) == HISTORY_TTL_MS, "capped at the retention"
    assert replay_age({"age": -5}) < 0
    assert replay_age([1]) is None
    assert replay_age("x") is None


def test_parse_command_types() -> None:
    assert parse_command(b'{"command":"ping"}') == ("ping", None)
    assert parse_command('{"command":"subscribe","data":["a"]}') == ("subscribe", ["a"])
    assert parse_command(b'{"command":"subscribe","data":"a"}') is None
    assert parse_command(b'{"command":"replay","data":{"age":1}}') == ("replay", {"age": 1})
    assert parse_command(b'{"command":"replay","data":1}') is None
    assert parse_command(b"\xff") is None
    # Beyond 64 bits a number becomes a float, as in JavaScript.
    assert parse_command(b'{"command":"ping","data":' + b"1" * 30 + b"}") == (
        "ping",
        1.111111111111111e29,
    )


# -- the admin fast path's request head ---------------------------------------------

PHORGE_HEAD = (
    b"POST /?instance=acme HTTP/1.1\r\nHost: 127.0.0.1:22281\r\nAccept: */*\r\n"
    b"Content-Length: 42\r\nContent-Type: application/x-www-form-urlencoded"
)


@pytest.mark.parametrize(
    ("head", "parsed"),
    [
        (PHORGE_HEAD, (b"/?instance=acme", 42, False, False)),
        (b"POST / HTTP/1.1\r\nContent-Length: 0", (b"/", 0, False, False)),
        (b"POST / HTTP/1.0\r\nContent-Length: 2", (b"/", 2, False, True)),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: keep-alive",
            (b"/", 2, False, False),
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nConnection: close", (b"/", 2, False, True)),
        (b"POST / HTTP/1.1\r\ncontent-length:  7 \r\nExpect: 100-continue", (b"/", 7, True, False)),
        # Anything else is aiohttp's to answer:
        (b"GET / HTTP/1.1\r\nContent-Length: 2", None),
        (b"POST /status/ HTTP/1.1\r\nContent-Length: 2", None),
        (b"POST /x?instance=a HTTP/1.1\r\nContent-Length: 2", None),
        (b"POST / HTTP/2\r\nContent-Length: 2", None),
        (b"POST  / HTTP/1.1\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1", None),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked", None),
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1\r\nContent-Length: -2", None),
        (b"POST / HTTP/1.1\r\nContent-Length: 0x2", None),
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: something", None),
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nno colon", None),
    ],
)
def test_parse_post_head(head: bytes, parsed: tuple[bytes, int, bool, bool] | None) -> None:
    assert parse_post_head(head) == parsed


@pytest.mark.parametrize(
    ("target", "instance"),
    [
        (b"/", ""),
        (b"/?instance=acme", "acme"),
        (b"/?instance=a%20b&instance=c", "a b"),
        (b"/?x=1&instance=%C3%A9", "é"),
        (b"/?instance=", ""),
        (b"/?instance=a+b", "a b"),
    ],
)
def test_query_instance(target: bytes, instance: str) -> None:
    assert query_instance(target) == instance


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Wire:
    """The transport side of an AdminProtocol: what it wrote, whether it closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def _serve(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Feed an admin connection ``chunks``; what it answered and what it published."""
    published: list[bytes] = []

    class Recorder:
        def relay(self, instance: str, message: dict, body: bytes) -> None:
            published.append(instance.encode() + b" " + body)

    async def run() -> bytes:
        hub = Hub("FPFPFPFPFPFPFPFP")
        hub.add_relay(Recorder())
        wire = _Wire()
        conn = AdminProtocol(hub, lambda: None, set())  # type: ignore[arg-type, return-value]
        conn.connection_made(wire)  # type: ignore[arg-type]
        for chunk in chunks:
            conn.data_received(chunk)
        conn.connection_lost(None)
        return bytes(wire.written)

    return asyncio.run(run()), published


def _post(body: bytes, query: bytes = b"", extra: bytes = b"") -> bytes:
    return (
        b"POST /"
        + query
        + b" HTTP/1.1\r\nHost: x\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def test_pipelined_posts_read_one_byte_at_a_time_answer_as_read_whole() -> None:
    stream = (
        _post(b'{"key":"1","subscribers":["PHID-A"],"t":"100% done & a=1"}')
        + _post('{"key":"2","t":"é日本"}'.encode(), b"?instance=acme")
        + _post(b"[1]")
        + _post(b"{}", extra=b"Expect: 100-continue\r\n")
    )
    whole, published = _serve([stream])
    assert whole.count(b"HTTP/1.1 200 OK") == 3 and whole.count(b"HTTP/1.1 400 ") == 1
    bytewise, published_bytewise = _serve([stream[i : i + 1] for i in range(len(stream))])
    # Fed a byte at a time, the last post waits for its body: curl gets its
    # 100 Continue first. Apart from that, every answer is the same.
    assert bytewise.count(CONTINUE) == 1 and CONTINUE not in whole
    assert bytewise.replace(CONTINUE, b"") == whole
    assert published_bytewise == published
    assert [p.split(b" ", 1)[0] for p in published] == [b"default", b"acme", b"default"]


def test_the_rules_module_does_no_io() -> None:
    """protocol.py imports nothing that could touch a socket, a file or a loop."""
    import ast
    from pathlib import Path

    import fastaphlict.protocol as protocol

    tree = ast.parse(Path(protocol.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"__future__", "json", "math", "typing", "urllib", "orjson"}, imported
