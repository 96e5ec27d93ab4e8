"""The client port's picows protocol: a set-up without system calls, no read buffer while idle.

``fastaphlict._protocol`` reads and writes picows' protocol object through a
struct of its own, and lets every socket with nothing pending read into one
shared buffer. These tests hold it to what picows itself does with the same
bytes: frames split anywhere, across many sockets at once, and larger than
the shared buffer, arrive whole and unmixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import Any

import pytest
from picows import WSAutoPingStrategy, WSListener
from picows.picows import WSProtocol

from fastaphlict import _protocol
from support import (
    TIMEOUT,
    client_frame,
    eventually,
    run,
    server_payload,
    settings,
    upgrade_request,
)

PING = client_frame(b'{"command":"ping","data":null}')
PONG = b'{"type":"pong"}'


async def _upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _subscribe(phid: str) -> bytes:
    return client_frame(b'{"command":"subscribe","data":["' + phid.encode() + b'"]}')


async def _delivered(srv: Any, reader: asyncio.StreamReader, key: int, phid: str) -> None:
    """Post as Phorge does, to ``phid``; the socket's next frame is that message."""
    response = await srv.post({"key": key, "type": "notification", "subscribers": [phid]})
    assert response.status == 200
    assert b'"key":%d,' % key in await server_payload(reader)


async def test_frames_split_anywhere_on_many_sockets_arrive_whole_and_unmixed() -> None:
    """Each socket's partial frame survives the reads of every other socket in between."""
    async with run(settings([])) as srv:
        port = srv.server.client_ports[0]
        tabs = [await _upgraded(port) for _ in range(24)]
        frames = [_subscribe(f"PHID-TEST-{i:04d}") + PING for i in range(len(tabs))]
        # Split at a different byte each: in the header, the mask, the payload.
        splits = [1 + i * 3 % (len(frame) - 1) for i, frame in enumerate(frames)]
        # Every socket sends the first part of its frames...
        for (_, writer), frame, split in zip(tabs, frames, splits, strict=True):
            writer.write(frame[:split])
            await writer.drain()
        # ...while another socket's whole frame is read (into the shared buffer)...
        reader, writer = await _upgraded(port)
        writer.write(PING)
        assert await server_payload(reader) == PONG
        # ...then the rest: each gets its pong, then its own message, and only that.
        for (_, writer), frame, split in zip(tabs, frames, splits, strict=True):
            writer.write(frame[split:])
        for tab_reader, _ in tabs:
            assert await server_payload(tab_reader) == PONG
        for i in range(len(tabs)):
            response = await srv.post(
                {"key": i, "type": "notification", "subscribers": [f"PHID-TEST-{i:04d}"]}
            )
            assert response.status == 200
        for i, (tab_reader, _) in enumerate(tabs):
            assert b'"key":%d,' % i in await server_payload(tab_reader)
        for _, tab_writer in [*tabs, (reader, writer)]:
            tab_writer.close()


async def test_a_frame_larger_than_the_shared_buffer_arrives_in_pieces() -> None:
    """57 KB sent 1000 bytes at a time, other sockets reading in between."""
    async with run(settings([])) as srv:
        port = srv.server.client_ports[0]
        big_reader, big_writer = await _upgraded(port)
        other_reader, other_writer = await _upgraded(port)
        phids = ",".join(f'"PHID-BIG-{i:010d}"' for i in range(2600)).encode()
        frame = client_frame(b'{"command":"subscribe","data":[' + phids + b"]}") + PING
        assert 50_000 < len(frame) < 64 * 1024
        for start in range(0, len(frame), 1000):
            big_writer.write(frame[start : start + 1000])
            await big_writer.drain()
            other_writer.write(PING)
            assert await server_payload(other_reader) == PONG
        assert await server_payload(big_reader) == PONG
        await _delivered(srv, big_reader, 7, "PHID-BIG-0000002599")
        big_writer.close()
        other_writer.close()


class _Recorder(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def on_ws_frame(self, transport: object, frame: object) -> None:
        self.payloads.append(frame.get_payload_as_bytes())  # type: ignore[attr-defined]


def _factory(
    listeners: Callable[[object], object], timeout: float = 5.0, max_frame_size: int = 65536
) -> Any:
    """The port's protocol factory: ``listeners(request)`` makes each socket's
    listener (None refuses the upgrade)."""
    return _protocol.protocol_factory(listeners, logging.getLogger("test"), timeout, max_frame_size)


async def _connected(make: object) -> tuple[object, socket.socket, socket.socket]:
    """A server protocol on a socket pair, not upgraded: (protocol, server end, client end)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    _, protocol = await asyncio.get_running_loop().connect_accepted_socket(make, ours)  # type: ignore[arg-type]
    return protocol, ours, theirs


async def _accepted(make: object) -> tuple[object, socket.socket, socket.socket]:
    """An upgraded server protocol on a socket pair: (protocol, server end, client end)."""
    loop = asyncio.get_running_loop()
    protocol, ours, theirs = await _connected(make)
    await loop.sock_sendall(theirs, upgrade_request("/"))
    assert (await asyncio.wait_for(loop.sock_recv(theirs, 4096), TIMEOUT)).startswith(
        b"HTTP/1.1 101"
    )
    return protocol, ours, theirs


async def test_an_idle_socket_reads_into_the_shared_buffer() -> None:
    """Own buffer only while a partial frame waits; shared again once it is parsed."""
    loop = asyncio.get_running_loop()
    recorder = _Recorder()
    protocol, _, theirs = await _accepted(_factory(lambda request: recorder))
    assert not _protocol.owns_read_buffer(protocol)
    frame = client_frame(b"x" * 300)
    await loop.sock_sendall(theirs, frame[:150])
    await eventually(lambda: _protocol.owns_read_buffer(protocol), TIMEOUT, "a buffer of its own")
    await loop.sock_sendall(theirs, frame[150:])
    await eventually(lambda: recorder.payloads == [b"x" * 300], TIMEOUT, "the frame, whole")
    assert not _protocol.owns_read_buffer(protocol)
    theirs.close()


async def test_the_factory_refuses_a_protocol_it_does_not_read_right() -> None:
    """The layout check compares every field it relies on, so it can fail."""
    loop = asyncio.get_running_loop()
    logger, other = logging.getLogger("test"), logging.getLogger("other")
    factory = object()
    timeout, idle, reply = 5.5, 20.5, 20.25
    probe = WSProtocol(
        None, None, False, factory, logger, True, timeout, False, idle, reply,
        WSAutoPingStrategy.PING_WHEN_IDLE, False, 4096, None, 6144,
    )  # fmt: skip
    args = (loop, 4096, 6144, idle, reply)
    assert _protocol.head_matches(probe, factory, logger, timeout, *args)
    assert not _protocol.head_matches(probe, factory, other, timeout, *args)
    assert not _protocol.head_matches(probe, object(), logger, timeout, *args)
    assert not _protocol.head_matches(probe, factory, logger, 5.5001, *args)
    assert not _protocol.head_matches(
        probe, factory, logger, timeout, loop, 4097, 6144, idle, reply
    )
    assert not _protocol.head_matches(
        probe, factory, logger, timeout, loop, 4096, 8192, idle, reply
    )
    assert not _protocol.head_matches(object(), factory, logger, timeout, *args)
    with pytest.raises(TypeError):
        _protocol.owns_read_buffer(probe)


async def test_one_timer_drops_the_silent_sockets_and_spares_the_upgraded() -> None:
    """Handshake deadlines share a timer: silent sockets go, upgraded ones stay."""
    async with run(settings(["--handshake-timeout=0.4"])) as srv:
        port = srv.server.client_ports[0]
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        reader, writer = await _upgraded(port)
        started = asyncio.get_running_loop().time()
        for silent_reader, _ in silent:
            assert await asyncio.wait_for(silent_reader.read(), TIMEOUT) == b""
        assert asyncio.get_running_loop().time() - started >= 0.35
        # Past its own deadline, the upgraded socket still answers.
        writer.write(PING)
        assert await server_payload(reader) == PONG
        for _, silent_writer in silent:
            silent_writer.close()
        writer.close()


def _unread(sock: socket.socket) -> int:
    """Bytes the server has not read from ``sock`` yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def test_a_partial_frame_is_not_overwritten_once_the_shared_buffer_was_replaced() -> None:
    """Bursts grow the shared buffer past 64 KiB, so it is replaced; sockets idle since
    still read into the one they had. A partial frame there must get its own
    copy, or the next idle socket's read overwrites it (another tab's bytes in
    this tab's message)."""
    loop = asyncio.get_running_loop()
    recorders: list[_Recorder] = []

    def listener(request: object) -> _Recorder:
        recorders.append(_Recorder())
        return recorders[-1]

    make = _factory(listener, max_frame_size=1 << 20)
    _, victim_sock, victim = await _accepted(make)
    _, _, other = await _accepted(make)
    victim_log, other_log = recorders
    # Each burst fills whatever the shared buffer offers in one read, which
    # doubles it; eight bursts take it well past 64 KiB.
    burst = client_frame(b"b" * 994, opcode=0x2) * 300
    for _ in range(8):
        _, _, sender = await _accepted(make)
        await loop.sock_sendall(sender, burst)
        log = recorders[-1]
        await eventually(lambda log=log: len(log.payloads) == 300, TIMEOUT, "the burst")
        sender.close()
    # The victim's first 3000 bytes of a 4000-byte frame are read...
    message = bytes(range(256)) * 15 + b"m" * 160
    frame = client_frame(message, opcode=0x2)
    await loop.sock_sendall(victim, frame[:3000])
    await eventually(lambda: _unread(victim_sock) == 0, TIMEOUT, "the partial frame read")
    # ...then another idle socket's whole frame, then the victim's rest.
    await loop.sock_sendall(other, client_frame(b"o" * 100, opcode=0x2))
    await eventually(lambda: other_log.payloads == [b"o" * 100], TIMEOUT, "the other frame")
    await loop.sock_sendall(victim, frame[3000:])
    await eventually(lambda: len(victim_log.payloads) == 1, TIMEOUT, "the victim's frame")
    assert victim_log.payloads == [message]
    victim.close()
    other.close()


async def test_wait_disconnected_waits_for_the_socket_to_close() -> None:
    """The shared finished future stands in for each transport's own until awaited."""
    loop = asyncio.get_running_loop()
    recorders: list[_Recorder] = []

    def listener(request: object) -> _Recorder:
        recorders.append(_Recorder())
        return recorders[-1]

    make = _factory(listener)
    protocol, _, theirs = await _accepted(make)
    waiting = asyncio.ensure_future(protocol.transport.wait_disconnected())  # type: ignore[attr-defined]
    # A round trip through the server: the wait had every chance to end.
    await loop.sock_sendall(theirs, client_frame(b"still here", opcode=0x2))
    await eventually(lambda: recorders[0].payloads == [b"still here"], TIMEOUT, "the frame")
    assert not waiting.done()
    theirs.close()
    await asyncio.wait_for(waiting, TIMEOUT)
    # Once closed, a new wait ends at once.
    await asyncio.wait_for(protocol.transport.wait_disconnected(), TIMEOUT)  # type: ignore[attr-defined]


async def test_frames_in_the_upgrade_requests_packet_are_read() -> None:
    """A client that sends its first frames with the upgrade request, in one packet."""
    async with run(settings([])) as srv:
        port = srv.server.client_ports[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request("/") + _subscribe("PHID-TEST-PIPE") + PING)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert await server_payload(reader) == PONG
        await _delivered(srv, reader, 3, "PHID-TEST-PIPE")
        writer.close()


async def test_ports_on_two_loops_read_into_buffers_of_their_own() -> None:
    """The idle sockets' buffer is a port's, not the process's.

    uvloop reads without the GIL: a server on another thread's loop reading
    into this loop's buffer would write over what this one is parsing.
    """
    recorder = _Recorder()
    make = _factory(lambda request: recorder)
    here, _, here_client = await _accepted(make)
    neighbour, _, neighbour_client = await _accepted(make)
    assert _protocol.shares_read_buffer(here, neighbour)
    shared: list[bool] = []

    async def elsewhere() -> None:
        there_make = _factory(lambda request: _Recorder())
        there, _, there_client = await _accepted(there_make)
        shared.append(_protocol.shares_read_buffer(here, there))
        there_client.close()
        await eventually(lambda: there.transport.is_disconnected, TIMEOUT, "closed")  # type: ignore[attr-defined]

    thread = threading.Thread(target=asyncio.run, args=(elsewhere(),))
    thread.start()
    thread.join()
    assert shared == [False]
    here_client.close()
    neighbour_client.close()


async def test_a_trickled_upgrade_request_is_dropped_at_its_deadline() -> None:
    """Slowloris: bytes of the request keep coming, but the deadline is the handshake's."""
    async with run(settings(["--handshake-timeout=0.4"])) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.client_ports[0])
        closed = asyncio.ensure_future(reader.read())
        request = upgrade_request("/")
        sent = 0
        # The attacker's pace (a byte per 20 ms: 4 s for the request), not a wait for the server.
        while not closed.done() and sent < len(request) - 1:
            writer.write(request[sent : sent + 1])
            sent += 1
            await asyncio.sleep(0.02)
        assert closed.done() and closed.result() == b"", (
            "still open after the request's last byte but one"
        )
        assert sent < len(request) / 2
        writer.close()


async def test_a_socket_leaves_its_deadline_when_it_upgrades_or_closes() -> None:
    """Only sockets still upgrading wait; the silent one is dropped at its deadline."""
    loop = asyncio.get_running_loop()
    make = _factory(lambda request: _Recorder(), timeout=0.5)
    deadlines = make.args[3]
    upgraded, closed, silent = [(await _connected(make))[2] for _ in range(3)]
    assert len(deadlines) == 3
    await loop.sock_sendall(upgraded, upgrade_request("/"))
    await eventually(lambda: len(deadlines) == 2, TIMEOUT, "the upgraded socket left")
    closed.close()
    await eventually(lambda: len(deadlines) == 1, TIMEOUT, "the closed socket left")
    assert await asyncio.wait_for(loop.sock_recv(silent, 16), TIMEOUT) == b""
    assert len(deadlines) == 0
    assert (await asyncio.wait_for(loop.sock_recv(upgraded, 4096), TIMEOUT)).startswith(
        b"HTTP/1.1 101"
    )
    await loop.sock_sendall(upgraded, PING)
    upgraded.close()
    silent.close()


async def test_a_refused_upgrade_with_frames_behind_it_is_closed_and_leaves_its_deadline() -> None:
    """An upgrade the listener factory refuses (404), its client's frames already sent."""
    loop = asyncio.get_running_loop()
    # A deadline far past the test's: only the close can empty it.
    make = _factory(lambda request: None, timeout=3600.0)
    deadlines = make.args[3]
    _, _, theirs = await _connected(make)
    await loop.sock_sendall(theirs, upgrade_request("/") + PING * 100)
    answer = await asyncio.wait_for(loop.sock_recv(theirs, 4096), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 404"), answer
    # Closed (reset, as it closes with our frames unread).
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(loop.sock_recv(theirs, 4096), TIMEOUT):
            pass
    await eventually(lambda: len(deadlines) == 0, TIMEOUT, "the refused socket left its deadline")
    theirs.close()


async def test_an_upgrade_request_past_16_kib_is_dropped_before_its_deadline() -> None:
    """Headers that never end: dropped at 16 KiB, not held in a growing buffer to the deadline."""
    loop = asyncio.get_running_loop()
    recorder = _Recorder()
    make = _factory(lambda request: recorder, timeout=3600.0)
    _, _, theirs = await _connected(make)
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        await loop.sock_sendall(theirs, head + b"X-Pad: " + b"a" * (20 * 1024))
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(loop.sock_recv(theirs, 4096), TIMEOUT) == b""
    # Another socket on the port is served as before.
    _, _, other = await _accepted(make)
    await loop_round_trip(other, recorder)
    theirs.close()
    other.close()


async def loop_round_trip(theirs: socket.socket, recorder: _Recorder) -> None:
    """One frame through the server, recorded whole."""
    await asyncio.get_running_loop().sock_sendall(theirs, client_frame(b"here", opcode=0x2))
    await eventually(lambda: recorder.payloads[-1:] == [b"here"], TIMEOUT, "the frame")
