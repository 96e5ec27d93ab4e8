"""The minimal server: a floor for the per-post path, measured beside fastaphlict.

What every Python design of this server pays per post, and nothing more: an
``asyncio.Protocol`` on each port (on uvloop), a hand-written HTTP/1.1 reader
for pipelined ``POST /`` on the admin port, a hand-written upgrade and frame
parser on the client port, a dict from PHID to a set of sockets, one
``orjson.dumps`` and one frame per message, then ``transport.write`` to each
target. It is correct for what the harness's targeted and broadcast scenarios
send (Phorge-shaped posts, ``subscribe``/``unsubscribe``/``ping``, masked
client frames, close and ping control frames, the ``touched`` fingerprint of
the protocol's section 5), and keeps nothing else: no history (``replay``
answers nothing), no limits, no instances, no peers, no slow-client handling.

That is the point of it: fastaphlict's CPU per delivery divided by this
server's says what fastaphlict's extra duties and its compiled fan-out cost or
save against the plain Python way. It is never a server to deploy.

Run: ``python -m fastaphlict.bench.minimal --client-port 23280 --admin-port 23281``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import secrets

import orjson

__all__ = ["GUID", "PONG", "frame", "main", "next_frame", "serve", "switching", "unmask"]

#: RFC 6455's GUID for ``Sec-WebSocket-Accept``.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
_NOT_WEBSOCKET = (
    b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 24\r\nConnection: close\r\n\r\n"
    b"HTTP/501 Use Websockets\n"
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked, final server frame."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return head + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    """A client frame's payload, unmasked with one big-integer XOR (no per-byte loop)."""
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


PONG = frame(b'{"type":"pong"}')


def switching(key: bytes) -> bytes:
    """The 101 answer to an upgrade that sent ``Sec-WebSocket-Key: key``."""
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def next_frame(buf: bytearray, most: int = 1 << 62) -> tuple[int, bytes, int] | None:
    """``(opcode, payload unmasked, its end)`` of the first frame in ``buf``; None while partial.

    A payload over ``most`` bytes is framed but not copied or unmasked (``b""``).
    """
    if len(buf) < 2:
        return None
    size = buf[1] & 0x7F
    pos = 2
    if size == 126:
        if len(buf) < 4:
            return None
        size = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif size == 127:
        if len(buf) < 10:
            return None
        size = int.from_bytes(buf[2:10], "big")
        pos = 10
    masked = 4 if buf[1] & 0x80 else 0
    end = pos + masked + size
    if len(buf) < end:
        return None
    if size > most:
        return buf[0] & 0x0F, b"", end
    payload = bytes(buf[pos + masked : end])
    if masked:
        payload = unmask(payload, bytes(buf[pos : pos + 4]))
    return buf[0] & 0x0F, payload, end


class Tab(asyncio.Protocol):
    """One browser socket: the upgrade, then frames; its PHIDs in the shared index."""

    def __init__(self, index: dict[str, set[Tab]]) -> None:
        self.index = index
        self.buf = bytearray()
        self.open = False
        self.phids: set[str] = set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's, not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        for phid in self.phids:
            tabs = self.index.get(phid)
            if tabs is not None:
                tabs.discard(self)
                if not tabs:
                    del self.index[phid]
        self.phids.clear()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open and not self._upgrade():
            return
        self._frames()

    def _upgrade(self) -> bool:
        """Answer the opening handshake once its head is in; False while it is not."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        key = None
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip()
        assert self.transport is not None
        if key is None:
            self.transport.write(_NOT_WEBSOCKET)
            self.transport.close()
            return False
        self.transport.write(switching(key.encode()))
        self.open = True
        return True

    def _frames(self) -> None:
        """Every whole frame in the buffer; a partial one waits for more bytes."""
        buf = self.buf
        while (found := next_frame(buf)) is not None:
            opcode, payload, end = found
            del buf[:end]
            if not self._on_frame(opcode, payload):
                return

    def _on_frame(self, opcode: int, payload: bytes) -> bool:
        """Act on one frame; False once the socket is closing."""
        transport = self.transport
        assert transport is not None
        if opcode == 0x8:
            transport.write(frame(payload[:2], 0x8))
            transport.close()
            return False
        if opcode == 0x9:
            transport.write(frame(payload, 0xA))
        elif opcode in (0x1, 0x2):
            self._command(payload)
        return True

    def _command(self, payload: bytes) -> None:
        """``{"command": C, "data": D}``; anything malformed is ignored, as the protocol says."""
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        command = message.get("command")
        data = message.get("data")
        if command == "ping":
            assert self.transport is not None
            self.transport.write(PONG)
        elif command == "subscribe" and isinstance(data, list):
            for phid in data:
                if isinstance(phid, str) and phid not in self.phids:
                    self.phids.add(phid)
                    self.index.setdefault(phid, set()).add(self)
        elif command == "unsubscribe" and isinstance(data, list):
            for phid in data:
                if isinstance(phid, str) and phid in self.phids:
                    self.phids.discard(phid)
                    tabs = self.index.get(phid)
                    if tabs is not None:
                        tabs.discard(self)
                        if not tabs:
                            del self.index[phid]


class Admin(asyncio.Protocol):
    """Phorge's posts: pipelined HTTP/1.1 requests with a ``Content-Length`` body."""

    def __init__(self, index: dict[str, set[Tab]], fingerprint: str) -> None:
        self.index = index
        self.fingerprint = fingerprint
        self.receipt = orjson.dumps({"fingerprint": fingerprint})
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's, not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(buf) < end + 4 + length:
                break
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method == "POST" and path == "/":
                out.append(self._post(body))
            else:
                out.append(_NOT_FOUND)
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))

    def _post(self, body: bytes) -> bytes:
        """Deliver one message: one serialisation, one frame, a write per target."""
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _BAD
        if not isinstance(message, dict):
            return _BAD
        touched = message.get("touched")
        message["touched"] = (
            [*touched, self.fingerprint] if isinstance(touched, list) else [self.fingerprint]
        )
        subscribers = message.get("subscribers")
        if isinstance(subscribers, list):
            index = self.index
            targets: set[Tab] = set()
            for phid in subscribers:
                if isinstance(phid, str):
                    tabs = index.get(phid)
                    if tabs:
                        targets.update(tabs)
            if targets:
                data = frame(orjson.dumps(message))
                for tab in targets:
                    assert tab.transport is not None
                    tab.transport.write(data)
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(self.receipt)).encode()
            + b"\r\n\r\n"
            + self.receipt
        )


async def serve(host: str, client_port: int, admin_port: int) -> None:
    """Both listeners, until cancelled."""
    loop = asyncio.get_running_loop()
    index: dict[str, set[Tab]] = {}
    fingerprint = "".join(secrets.choice(_ALPHABET) for _ in range(16))
    client = await loop.create_server(lambda: Tab(index), host, client_port, backlog=4096)
    admin = await loop.create_server(
        lambda: Admin(index, fingerprint), host, admin_port, backlog=1024
    )
    print(f"minimal server: client {client_port}, admin {admin_port}", flush=True)
    async with client, admin:
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--client-port", type=int, default=22280)
    parser.add_argument("--admin-port", type=int, default=22281)
    args = parser.parse_args(argv)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.client_port, args.admin_port))


if __name__ == "__main__":
    main()
