"""Fuzzing the admin fast path against aiohttp's parser (hypothesis), on the same bytes.

Request heads are generated three ways: plain ones as Phorge and curl send
them, smuggling-shaped ones (a plain head with one flaw of the kinds proxies
and servers disagree on: whitespace before the colon, obs-fold, bare CR or LF,
NUL and other controls, a second or malformed ``Content-Length``,
``Transfer-Encoding`` beside it, a second ``Host``), and random ones built
from HTTP's own pieces. Each is followed by a body and by a second, plain
post, and the same bytes go to both readers:

- the fast path, :class:`~fastaphlict.admin.AdminProtocol` on a stand-in
  transport, with the hub's decision replaced by a recorder: which posts it
  served itself, and what it handed to aiohttp;
- aiohttp's ``HttpRequestParser`` (the C parser the server runs, with the
  server's limits).

Whatever the fast path serves, aiohttp must accept and read the same way:
method, path, instance, body (so the same length), and the next request
starting at the same byte. The fast path may close where aiohttp would
keep the connection, never the reverse. What the fast path doesn't serve
reaches aiohttp whole. Everything runs without sockets: a few hundred
examples take a second or two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser
from aiohttp.web_protocol import RequestPayloadError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastaphlict import admin
from fastaphlict.hub import Hub
from fastaphlict.protocol import parse_post_head

#: The plain post that follows every generated request: both readers must
#: find it at the same byte, or they framed the first one differently.
NEXT = b"POST /?instance=next HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
#: Longest body put after a head: a bigger declared length is left unsent.
MAX_SENT_BODY = 4096


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop for the parsers' futures and the fast path's timers; driven per example."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


# -- the two readers ------------------------------------------------------------


@dataclass
class Read:
    """One request as a reader took it."""

    method: str
    path: str
    instance: str
    body: bytes
    close: bool


class AiohttpReader:
    """aiohttp's request parser (the C one the server runs), with the server's limits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._parser = HttpRequestParser(
            BaseProtocol(loop),
            loop,
            2**16,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=128,
            payload_exception=RequestPayloadError,
            auto_decompress=True,
        )

    def feed(self, data: bytes, *, whole: bool = True) -> list[Read] | str:
        """The requests read from one more read of ``data``, or why aiohttp refuses it.

        With ``whole``, a body aiohttp still waits for counts as a refusal:
        the fast path served it, so aiohttp must find it whole in the same bytes.
        """
        try:
            messages = self._parser.feed_data(data)[0]
        except Exception as exc:  # BadHttpMessage and its kin: a 400
            return repr(exc)
        reads = []
        for message, payload in messages:
            if payload.exception() is not None:
                return repr(payload.exception())
            if whole and not payload.is_eof():
                return "the body is incomplete"
            reads.append(
                Read(
                    message.method,
                    message.path,
                    message.url.query.get("instance", ""),
                    payload.read_nowait(-1),
                    message.should_close,
                )
            )
        return reads


class _Wire:
    """The transport under the fast path: what it wrote, whether it closed, who took over."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class _Aiohttp(asyncio.Protocol):
    """Stands in for aiohttp's handler: keeps what it was handed."""

    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


#: One log budget for every example: the 413s are logged within it.
_THROTTLES = admin.new_throttles()


@dataclass
class FastPath:
    """What the fast path did with the bytes."""

    served: list[tuple[str, bytes]] = field(default_factory=list)
    handed: bytes | None = None
    closed: bool = False


def fast_path_reads(data: bytes, split: int, loop: asyncio.AbstractEventLoop) -> FastPath:
    """Feed ``data`` to an :class:`AdminProtocol` in two reads, split at ``split``."""
    result = FastPath()
    wire = _Wire()

    def decide(hub: Hub, instance: str, body: bytes, *_: Any) -> tuple[int, bytes]:
        result.served.append((instance, body))
        return 200, b"{}"

    async def run() -> None:
        conn = admin.AdminProtocol(Hub("FPFPFPFPFPFPFPFP"), _Aiohttp, set(), throttles=_THROTTLES)
        conn.connection_made(wire)  # type: ignore[arg-type]
        for piece in (data[:split], data[split:]):
            if wire.closed:
                break
            (wire.protocol or conn).data_received(piece)
        conn.connection_lost(None)

    with mock.patch.object(admin, "accept_post", decide):
        loop.run_until_complete(run())
    result.handed = bytes(wire.protocol.data) if wire.protocol is not None else None
    result.closed = wire.closed
    return result


# -- the heads ------------------------------------------------------------------

_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Mostly small bodies; sometimes one left unsent (the fast path waits) or over 2 MiB (413).
_LENGTHS = st.one_of(
    *[st.integers(0, 64)] * 5, st.sampled_from([MAX_SENT_BODY + 1, 2**21, 2**21 + 1])
)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)


@st.composite
def plain_heads(draw: st.DrawFn) -> bytes:
    """A head as Phorge, curl or a careful client writes it (fields in any order)."""
    query = draw(st.lists(st.sampled_from(["instance=", "a", "Z", "=", "&", "%C3%A9", "+", "%2F"])))
    target = "/" + ("?" + "".join(query) if query or draw(st.booleans()) else "")
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    fields = [(draw(st.sampled_from(["Content-Length", "content-length"])), str(draw(_LENGTHS)))]
    if version == "HTTP/1.1" or draw(st.booleans()):
        fields.append(("Host", draw(st.sampled_from(["x", "127.0.0.1:22281"]))))
    extra = st.tuples(st.text(_TCHARS, min_size=1, max_size=10), _VALUE).filter(
        lambda f: (
            f[0].lower()
            not in {"content-length", "host", "transfer-encoding", "content-encoding", "upgrade"}
            and (f[0].lower() != "expect" or f[1].strip().lower() == "100-continue")
        )
    )
    fields += draw(st.lists(extra, max_size=4))
    fields += draw(
        st.lists(
            st.sampled_from(
                [
                    ("Connection", "close"),
                    ("Connection", "keep-alive"),
                    ("Connection", "Keep-Alive, TE"),
                    ("Connection", "xclose"),
                    ("Expect", "100-continue"),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ]
            ),
            max_size=2,
        )
    )
    fields = draw(st.permutations(fields))
    lines = [f"POST {target} {version}"]
    lines += [
        f"{name}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{value}" for name, value in fields
    ]
    return "\r\n".join(lines).encode()


#: Field lines that readers disagree on, or that change how the body is read.
_ODD_FIELDS = [
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding : chunked",
    b"Transfer-Encoding\x00: chunked",
    b"Transfer-Encoding:\x0bchunked",
    b"transfer-encoding: identity",
    b" Transfer-Encoding: chunked",
    b"\tContent-Length: 5",
    b"Content-Length: 5",
    b"Content-Length: +5",
    b"Content-Length: -1",
    b"Content-Length: 5, 5",
    b"Content-Length: 0x5",
    b"Content-Length: 5\x00",
    b"Content-Length : 5",
    b"Content-Length\x0b: 5",
    b"Content-Length:\r\n 5",
    b"Content-Length: 99999999999999999999",
    b"Host: y",
    b"Connection: upgrade",
    b"Upgrade: h2c",
    b"Content-Encoding: gzip",
    b"Expect: 100-continue",
    b"Expect: 200-ok",
    b"X: \x80",
    b"X: a\x7fb",
    b"\x01: x",
    b": x",
    b"X Y: z",
]
_ODD_BYTES = [b"\x00", b"\x0b", b"\x0c", b"\x7f", b"\x80", b"\xff", b"\t", b" ", b"\r", b"\n"]
_ODD_LINE_ENDS = [b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r\n"]
_ODD_REQUEST_LINES = [
    b"post / HTTP/1.1",
    b"POST / HTTP/1.2",
    b"POST / HTTP/1.10",
    b"POST / HTTP/01.1",
    b"POST  / HTTP/1.1",
    b"POST / HTTP/1.1 ",
    b"POST /?a b HTTP/1.1",
    b'POST /?a"b HTTP/1.1',
    b"POST /?a=%zz HTTP/1.1",
    b"POST // HTTP/1.1",
    b"POST * HTTP/1.1",
    b"POST http://x/ HTTP/1.1",
    b"POST /#x HTTP/1.1",
    b"PUT / HTTP/1.1",
]


@st.composite
def smuggling_heads(draw: st.DrawFn) -> bytes:
    """A plain head with one to three flaws of the kinds request smuggling is made of."""
    head = draw(plain_heads())
    for _ in range(draw(st.integers(1, 3))):
        lines = head.split(b"\r\n")
        kind = draw(st.sampled_from(["field", "byte", "line end", "request line"]))
        if kind == "field":
            lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from(_ODD_FIELDS)))
            head = b"\r\n".join(lines)
        elif kind == "byte":
            at = draw(st.integers(0, len(head)))
            head = head[:at] + draw(st.sampled_from(_ODD_BYTES)) + head[at:]
        elif kind == "line end" and len(lines) > 1:
            at = draw(st.integers(1, len(lines) - 1))
            end = draw(st.sampled_from(_ODD_LINE_ENDS))
            head = b"\r\n".join(lines[:at]) + end + b"\r\n".join(lines[at:])
        else:
            lines[0] = draw(st.sampled_from(_ODD_REQUEST_LINES))
            head = b"\r\n".join(lines)
    return head


#: HTTP's pieces, for heads that are mostly nonsense but look like HTTP up close.
_PIECES = [
    b"POST",
    b" ",
    b"/",
    b"?",
    b"instance=a",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"chunked",
    b"close",
    b"2",
    b"0",
    b",",
    b"\t",
    b"\x00",
    b"x",
]


@st.composite
def random_heads(draw: st.DrawFn) -> bytes:
    start = draw(
        st.sampled_from(
            [
                b"",
                b"POST / HTTP/1.1\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n",
            ]
        )
    )
    rest = draw(
        st.one_of(
            st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join),
            st.binary(max_size=60),
        )
    )
    return start + rest


def request_after(head: bytes, filler: int) -> bytes:
    """``head``, the blank line, the body its Content-Length asks for, and :data:`NEXT`.

    When the fast path can't read the head, ``filler`` bytes stand for the body.
    """
    parsed = parse_post_head(head) if b"\r\n\r\n" not in head else None
    length = parsed[1] if parsed is not None else filler
    body = b"" if length > MAX_SENT_BODY else b"{" + b"a" * (length - 1) if length else b""
    return head + b"\r\n\r\n" + body + NEXT


# -- the property -------------------------------------------------------------------


def check_agreement(data: bytes, split: int, loop: asyncio.AbstractEventLoop) -> None:
    """Every post the fast path served, aiohttp reads alike from the same bytes.

    aiohttp is fed the bytes of each served post as a read of its own, cut
    where the fast path's framing ends it: its first message must be that
    post, whole, and nothing else. What the fast path handed over instead
    must be exactly the bytes after the last post it served; aiohttp's
    verdict on those is its own.
    """
    fast = fast_path_reads(data, split, loop)
    aiohttp = AiohttpReader(loop)
    offset = 0
    for number, (instance, body) in enumerate(fast.served):
        end = data.find(b"\r\n\r\n", offset)
        parsed = parse_post_head(data[offset:end])
        assert parsed is not None, "the fast path served a head its parser refuses"
        target, length, _, close = parsed
        cut = end + 4 + length
        theirs = aiohttp.feed(data[offset:cut])
        assert not isinstance(theirs, str), f"served by the fast path, refused by aiohttp: {theirs}"
        assert len(theirs) == 1, f"aiohttp found {len(theirs)} requests where the fast path saw one"
        [read] = theirs
        assert (read.method, read.path) == ("POST", target.decode("ascii"))
        assert (read.instance, read.body) == (instance, body)
        assert len(body) == length
        assert close or not read.close, "the fast path keeps open what aiohttp closes"
        offset = cut
        if close:
            assert fast.closed and number == len(fast.served) - 1
            return
    if fast.handed is not None:
        assert fast.handed == data[offset:], "the fast path kept bytes from aiohttp"
    elif not fast.closed and offset < len(data):
        # Waiting for a body it was told is coming: aiohttp must take the head too.
        end = data.find(b"\r\n\r\n", offset)
        assert end >= 0 and parse_post_head(data[offset:end]) is not None
        theirs = aiohttp.feed(data[offset : end + 4], whole=False)
        assert not isinstance(theirs, str), f"taken by the fast path, refused by aiohttp: {theirs}"


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    head=st.one_of(plain_heads(), smuggling_heads(), random_heads()),
    filler=st.integers(0, 8),
    split=st.integers(0, 400),
)
# The shapes that got 200 from the first fast path and 400 from aiohttp (issue 16).
@example(head=b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 2", filler=2, split=0)
@example(head=b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length\x0b: 2", filler=2, split=0)
@example(head=b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n : 5", filler=2, split=0)
@example(
    head=b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\nTransfer-Encoding: chunked",
    filler=2,
    split=0,
)
@example(head=b"POST / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\nContent-Length: 2", filler=2, split=0)
@example(head=b"POST / HTTP/1.1\r\nHost: x\r\n\x01: x\r\nContent-Length: 2", filler=2, split=0)
@example(head=b"POST / HTTP/1.1\r\nHost: x\r\n: x\r\nContent-Length: 2", filler=2, split=0)
@example(
    head=b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding\x00: chunked\r\nContent-Length: 2",
    filler=2,
    split=0,
)
@example(head=b"POST / HTTP/1.1\r\nContent-Length: 2", filler=2, split=0)
def test_the_fast_path_serves_only_what_aiohttp_reads_the_same_way(
    loop: asyncio.AbstractEventLoop, head: bytes, filler: int, split: int
) -> None:
    data = request_after(head, filler)
    check_agreement(data, min(split, len(data)), loop)
