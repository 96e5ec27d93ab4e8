"""The fan-out's own send(): frames straight to the kernel, and the loop's transport behind it.

Each connection here is a real loopback TCP connection whose server end is a
real uvloop transport under a picows ``WSTransport``, as in production. The
fan-out writes a frame with one ``send()`` of its own while the transport
holds nothing of the socket's; what ``send()`` leaves goes to the transport.
These tests build the states where that could reorder or lose bytes (a
partial write, a full socket, a peer that stops reading, a pong picows wrote
itself, a reset connection) and read back what the client end received, byte for
byte. Between a write and the check the loop does not run unless the test
says so, so the transport cannot flush behind the test's back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator

import pytest
from picows import WSTransport

from fastaphlict._fanout import Channel, Subscriber, build_frame
from support import TIMEOUT, eventually

#: Small socket buffers, so a few hundred KiB fill them.
BUFFER = 16384


class Recorder(asyncio.Protocol):
    """The server end's protocol: records flow control and the loss of the connection."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.lost = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Tab:
    """One connection: the fan-out's Subscriber on the server end, a plain socket as the client."""

    def __init__(
        self, channel: Channel, server: socket.socket, client: socket.socket, rec: Recorder
    ) -> None:
        self.client = client
        self.recorder = rec
        self.transport: asyncio.Transport = rec.transport  # type: ignore[attr-defined]
        self.ws = WSTransport(False, self.transport, logging.getLogger("test"), rec.loop)  # type: ignore[attr-defined]
        self.sub: Subscriber = channel.attach(self.ws)
        channel.subscribe(self.sub, ["P"])
        self.fd = server.fileno()

    def read_now(self) -> bytes:
        """What the client end can read without waiting."""
        chunks = []
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def take(self, size: int) -> bytes:
        """Exactly ``size`` bytes the kernel already holds, without running the loop."""
        self.client.settimeout(TIMEOUT)
        got = bytearray()
        try:
            while len(got) < size:
                got += self.client.recv(size - len(got))
        finally:
            self.client.setblocking(False)
        return bytes(got)

    async def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, letting the loop run (and the transport flush) meanwhile."""
        got = bytearray()

        def enough() -> bool:
            got.extend(self.read_now())
            return len(got) >= size

        await eventually(enough, TIMEOUT, f"{size} bytes at the client")
        assert len(got) == size, "more arrived than was written"
        return bytes(got)


async def open_tab(channel: Channel, listener: socket.socket) -> Tab:
    loop = asyncio.get_running_loop()
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    client.setblocking(False)
    server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    rec = Recorder()
    rec.loop = loop  # type: ignore[attr-defined]

    def made(transport: asyncio.BaseTransport) -> None:
        rec.transport = transport  # type: ignore[attr-defined]

    rec.connection_made = made  # type: ignore[method-assign]
    await loop.connect_accepted_socket(lambda: rec, server)
    return Tab(channel, server, client, rec)


@pytest.fixture
async def listener() -> AsyncIterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def fill(tab: Tab) -> bytes:
    """Write filler with plain send()s on the server's socket until the kernel takes no more."""
    raw = socket.socket(fileno=os.dup(tab.fd))
    raw.setblocking(False)
    sent = bytearray()
    chunk = b"f" * 4096
    with raw:
        while True:
            try:
                sent += chunk[: raw.send(chunk)]
            except BlockingIOError:
                return bytes(sent)


def publish(channel: Channel, frame: bytes) -> None:
    assert channel.publish(["P"], frame) == 1
    channel.outbox.flush()


def frames(n: int, size: int) -> list[bytes]:
    return [build_frame(b'{"n":%d,"pad":"%s"}' % (i, b"x" * size)) for i in range(n)]


async def test_a_frame_the_kernel_takes_whole_is_sent_without_the_transport(listener) -> None:
    channel = Channel()
    tab = await open_tab(channel, listener)
    first, second = frames(2, 100)
    publish(channel, first)
    publish(channel, second)
    assert tab.transport.get_write_buffer_size() == 0
    assert tab.read_now() == first + second, "in the kernel before the loop ran again"
    assert channel.outbox.bytes_sent == len(first) + len(second)
    tab.client.close()


async def test_what_a_partial_write_leaves_goes_first_even_once_the_kernel_has_room(
    listener,
) -> None:
    """After a partial send() the transport holds the tail: later frames queue behind it.

    The client drains its socket before the loop runs, so the kernel has room
    while the transport still holds the tail: a later frame sent straight away
    would arrive before it.
    """
    channel = Channel()
    tab = await open_tab(channel, listener)
    big = build_frame(b"b" * (BUFFER * 32))
    publish(channel, big)
    held = tab.transport.get_write_buffer_size()
    assert 0 < held < len(big), "a partial write"
    head = tab.take(len(big) - held)  # all the kernel took: it has room again
    assert head == big[: len(head)] and tab.read_now() == b""
    later = frames(3, 10)
    for frame in later:
        publish(channel, frame)
    rest = await tab.read(len(big) - len(head) + sum(map(len, later)))
    assert head + rest == big + b"".join(later)
    assert channel.outbox.bytes_sent == len(big) + sum(map(len, later))
    tab.client.close()


async def test_a_full_socket_hands_the_whole_frame_to_the_transport_in_order(listener) -> None:
    """send() meets EAGAIN: the frame goes to the transport whole, behind the filler."""
    channel = Channel()
    tab = await open_tab(channel, listener)
    filler = fill(tab)
    first, second = frames(2, 50)
    publish(channel, first)
    assert tab.transport.get_write_buffer_size() == len(first), "all of it queued"
    assert tab.take(len(filler)) == filler  # room in the kernel; the transport holds `first`
    assert tab.read_now() == b""
    publish(channel, second)
    assert tab.transport.get_write_buffer_size() == len(first) + len(second)
    assert await tab.read(len(first) + len(second)) == first + second
    tab.client.close()


async def test_back_to_direct_sends_once_the_transport_has_drained(listener) -> None:
    channel = Channel()
    tab = await open_tab(channel, listener)
    filler = fill(tab)
    first, second, third = frames(3, 50)
    publish(channel, first)
    assert tab.take(len(filler)) == filler
    assert await tab.read(len(first)) == first
    await eventually(lambda: tab.transport.get_write_buffer_size() == 0)
    publish(channel, second)
    publish(channel, third)
    assert tab.read_now() == second + third
    tab.client.close()


async def test_a_peer_that_stops_reading_pauses_the_transport_and_loses_nothing(
    listener,
) -> None:
    channel = Channel()
    tab = await open_tab(channel, listener)
    tab.transport.set_write_buffer_limits(high=BUFFER)
    sent = frames(200, 1000)
    for frame in sent:
        publish(channel, frame)
    assert tab.recorder.paused == 1, "the high-water mark was passed: the protocol was told"
    assert tab.transport.get_write_buffer_size() > BUFFER
    got = await tab.read(sum(map(len, sent)))
    assert got == b"".join(sent)
    await eventually(lambda: tab.recorder.resumed == 1)
    tab.client.close()


async def test_a_pong_picows_wrote_itself_is_not_overtaken(listener) -> None:
    """picows' send_pong may leave its frame in the transport; wrote_around() says so."""
    channel = Channel()
    tab = await open_tab(channel, listener)
    warm = build_frame(b"{}")
    publish(channel, warm)  # the socket is on direct sends now
    assert tab.read_now() == warm
    filler = fill(tab)
    tab.ws.send_pong(b"p")
    pong = b"\x8a\x01p"
    assert tab.transport.get_write_buffer_size() == len(pong)
    tab.sub.wrote_around()
    assert tab.take(len(filler)) == filler  # the kernel has room; the pong is still queued
    message = build_frame(b'{"after":"pong"}')
    publish(channel, message)
    assert await tab.read(len(pong) + len(message)) == pong + message
    tab.client.close()


async def test_a_reset_connection_fails_quietly_and_is_reported_lost(listener) -> None:
    channel = Channel()
    tab = await open_tab(channel, listener)
    tab.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    tab.client.close()  # RST
    other = await open_tab(channel, listener)
    frame = build_frame(b"{}")
    assert channel.publish(["P"], frame) == 2
    for _ in range(3):  # the first send() may still succeed; a later one meets the reset
        channel.outbox.flush()
        channel.publish(["P"], frame)
    channel.outbox.flush()
    assert other.read_now() == frame * 4
    await asyncio.wait_for(tab.recorder.lost, TIMEOUT)
    other.client.close()
