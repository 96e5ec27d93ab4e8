"""The protocol's pure rules, fed bytes (spec §1 admin, §2 client, §4 history).

Every rule of :mod:`fastaphlict.protocol` is checked here from tables, without
sockets; the socket tests elsewhere prove the wiring.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastaphlict.admin import AdminProtocol
from fastaphlict.hub import Hub
from fastaphlict.protocol import (
    HISTORY_TTL_MS,
    MAX_DEPTH,
    NestingTooDeep,
    could_be_plain_head,
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
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0", (b"/", 0, False, False)),
        (b"POST / HTTP/1.0\r\nContent-Length: 2", (b"/", 2, False, True)),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: keep-alive",
            (b"/", 2, False, False),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close",
            (b"/", 2, False, True),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length:  7 \r\nExpect: 100-continue",
            (b"/", 7, True, False),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nCONTENT-LENGTH:\t7\t\r\nEXPECT: 100-Continue",
            (b"/", 7, True, False),
        ),
        (
            b"POST /?a=%C3%A9&b=1:2@x/?y HTTP/1.1\r\nHost: x\r\nContent-Length: 1",
            (b"/?a=%C3%A9&b=1:2@x/?y", 1, False, False),
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 007", (b"/", 7, False, False)),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Empty:\r\nX-Tab: a\tb",
            (b"/", 2, False, False),
        ),
        # Connection is a token list: a value that merely contains "close" is not close.
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: xclose",
            (b"/", 2, False, False),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close-ish",
            (b"/", 2, False, False),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: foo, Close",
            (b"/", 2, False, True),
        ),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: keep-alives",
            (b"/", 2, False, True),
        ),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: Keep-Alive ,x",
            (b"/", 2, False, False),
        ),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: close\r\nConnection: keep-alive",
            (b"/", 2, False, True),
        ),
        # HTTP/1.0 knows no 100-continue: the expectation is ignored (RFC 9110 §10.1.1).
        (b"POST / HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue", (b"/", 2, False, True)),
        (b"POST / HTTP/1.0\r\nContent-Length: 2\r\nExpect: other", (b"/", 2, False, True)),
        (b"POST / HTTP/1.0\r\nHost: x\r\nContent-Length: 2", (b"/", 2, False, True)),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Type: a\r\nUser-Agent: b",
            (b"/", 2, False, False),
        ),
        # Anything else is aiohttp's to answer:
        # no Host in HTTP/1.1, or two (RFC 9112 §3.2),
        (b"POST / HTTP/1.1\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nhost: y", None),
        (b"POST / HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\nHost: x", None),
        # a singleton field twice (aiohttp refuses them), or one with no business here,
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Type: a\r\n"
            b"content-type: b",
            None,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nUser-Agent: a\r\nUser-Agent: b",
            None,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nETag: x", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nSec-WebSocket-Key1: x", None),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"post / HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST /status/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST /x?instance=a HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST /#f HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST / HTTP/2\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.2\r\nContent-Length: 2", None),
        (b"POST / http/1.1\r\nContent-Length: 2", None),
        (b"POST  / HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1 \r\nContent-Length: 2", None),
        (b"POST\t/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Encoding: gzip", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nUpgrade: h2c", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: Upgrade", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1234567890123456", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: something", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nno colon", None),
        # The shapes that got 200 from the old fast path and 400 from aiohttp (issue 16):
        # an obs-folded Content-Length, and obs-fold anywhere,
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n : 5", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\tX: y", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nX: a\r\n\tb\r\nContent-Length: 2", None),
        # whitespace (or a vertical tab) before the colon,
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length\t: 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length\x0b: 2", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\n Content-Length: 2", None),
        # a bare LF or bare CR hiding a Transfer-Encoding line,
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\nTransfer-Encoding: chunked", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\rTransfer-Encoding: chunked", None),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nX: a\nTransfer-Encoding: chunked\r\nContent-Length: 2",
            None,
        ),
        (b"POST / HTTP/1.1\nContent-Length: 2", None),
        # a NUL, another control or a byte past ASCII in a value,
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: a\x00b", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\x00", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: a\x7fb", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: a\x1bb", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: caf\xc3\xa9", None),
        # a control character or nothing as a field name,
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\x01: x", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n: x", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX\x00Y: x", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX(Y: x", None),
        # and a NUL after a name.
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding\x00: chunked",
            None,
        ),
        # A target outside RFC 3986 (a space, a quote, a bad escape, a control):
        (b"POST /?a b HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b'POST /?a"b HTTP/1.1\r\nHost: x\r\nContent-Length: 2', None),
        (b"POST /?a=%zz HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST /?a=%C HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST /?a\x7f HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"POST /?\xc3\xa9 HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        # Near aiohttp's limits (a line of 8190 bytes, 128 fields):
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: " + b"a" * 8200, None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2" + b"\r\nX: a" * 101, None),
    ],
)
def test_parse_post_head(head: bytes, parsed: tuple[bytes, int, bool, bool] | None) -> None:
    assert parse_post_head(head) == parsed
    if parsed is not None:
        assert could_be_plain_head(head) and could_be_plain_head(head[: len(head) // 2])


@pytest.mark.parametrize(
    "start",
    [
        b"G",
        b"GET / HTTP/1.1\r\n",
        b"POST / HTTP/1.1\nContent-Length: 2\n\n{}",
        b"POST / HTTP/1.1\r\nContent-Length: 2\rX",
        b"POST / HTTP/1.1\r\nX: \x00",
        b"POST / HTTP/1.1\r\nX: " + b"a" * 8200,
    ],
)
def test_a_head_that_cannot_become_plain_is_known_before_it_ends(start: bytes) -> None:
    """aiohttp answers these at once: the fast path must not wait for a CRLF CRLF."""
    assert not could_be_plain_head(start)
    assert could_be_plain_head(b"POST / HTTP/1.1\r\nContent-Length: 2\r")


# Generated heads: the plain ones are read as written; one flaw anywhere refuses them.

_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_READ = {"content-length", "transfer-encoding", "content-encoding", "connection", "upgrade", "host"}
_OWS = st.text(" \t", max_size=2)


@st.composite
def plain_heads(draw: st.DrawFn) -> tuple[bytes, tuple[bytes, int, bool, bool]]:
    """A head RFC 9112 allows and the fast path serves, and how it must be read."""
    query = draw(st.lists(st.sampled_from(["a", "Z", "9", "=", "&", "%C3%A9", "%2f", "~", ":"])))
    target = "/" + ("?" + "".join(query) if draw(st.booleans()) else "")
    http11 = draw(st.booleans())
    length = draw(st.integers(0, 10**9))
    fields = [
        (
            draw(
                st.text(_TCHARS, min_size=1, max_size=12).filter(
                    lambda n: n.lower() not in _READ | {"expect"}
                )
            ),
            draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)),
        )
        for _ in range(draw(st.integers(0, 6)))
    ]
    fields.append(
        (draw(st.sampled_from(["Content-Length", "content-length", "CONTENT-length"])), str(length))
    )
    fields.append((draw(st.sampled_from(["Host", "host"])), draw(st.sampled_from(["x", "h:1"]))))
    tokens = draw(
        st.lists(st.sampled_from(["close", "Close", "keep-alive", "Keep-Alive", "xclose", "te"]))
    )
    if tokens:
        fields.append(("Connection", ", ".join(tokens)))
    expect = draw(st.booleans())
    if expect:
        fields.append(("Expect", "100-continue"))
    fields = draw(st.permutations(fields))
    lines = [f"POST {target} HTTP/1.{int(http11)}"]
    lines += [f"{name}:{draw(_OWS)}{value.strip(' ')}{draw(_OWS)}" for name, value in fields]
    lowered = {token.lower() for token in tokens}
    close = "close" in lowered or not (http11 or "keep-alive" in lowered)
    head = "\r\n".join(lines).encode()
    return head, (target.encode(), length, expect and http11, close)


@given(plain_heads())
@settings(max_examples=300)
def test_generated_plain_heads_are_read_as_written(
    case: tuple[bytes, tuple[bytes, int, bool, bool]],
) -> None:
    head, parsed = case
    assert parse_post_head(head) == parsed
    assert all(could_be_plain_head(head[:end]) for end in range(0, len(head), 7))


#: One flaw each: what RFC 9112 forbids or the fast path leaves to aiohttp.
_FLAWS = [b"\r", b"\n", b"\x00", b"\x0b", b"\x7f", b"\x80", b"\xff", b"\x1b"]


@given(plain_heads(), st.data())
@settings(max_examples=300)
def test_a_generated_head_with_one_flaw_is_refused(
    case: tuple[bytes, tuple[bytes, int, bool, bool]], data: st.DataObject
) -> None:
    head = case[0]
    lines = head.split(b"\r\n")
    kind = data.draw(st.sampled_from(["byte", "space before colon", "obs-fold", "framing"]))
    if kind == "byte":
        at = data.draw(st.integers(0, len(head)))
        flawed = head[:at] + data.draw(st.sampled_from(_FLAWS)) + head[at:]
    elif kind == "space before colon":
        line = data.draw(st.integers(1, len(lines) - 1))
        lines[line] = lines[line].replace(b":", data.draw(st.sampled_from([b" :", b"\t:"])), 1)
        flawed = b"\r\n".join(lines)
    elif kind == "obs-fold":
        line = data.draw(st.integers(1, len(lines) - 1))
        lines.insert(line + 1, data.draw(st.sampled_from([b" ", b"\t"])) + b"x")
        flawed = b"\r\n".join(lines)
    else:
        extra = data.draw(
            st.sampled_from(
                [
                    b"Transfer-Encoding: chunked",
                    b"Content-Length: 5",
                    b"Content-Encoding: gzip",
                    b"Upgrade: websocket",
                    b"Connection: upgrade",
                    b"Host: y",
                ]
            )
        )
        lines.insert(data.draw(st.integers(1, len(lines))), extra)
        flawed = b"\r\n".join(lines)
    assert parse_post_head(flawed) is None, flawed


@pytest.mark.parametrize(
    ("target", "instance"),
    [
        (b"/", ""),
        (b"/?", ""),
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

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


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
    assert imported <= {"__future__", "json", "math", "re", "typing", "urllib", "orjson"}, imported
