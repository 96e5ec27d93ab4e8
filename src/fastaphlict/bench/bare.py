"""The bare protocol: the floor of a reconnect storm, measured beside fastaphlict.

A uvloop protocol that accepts, answers the opening handshake with a 101, and
answers every ``ping`` command with ``{"type":"pong"}``; every other frame
(``subscribe``, ``replay``) is framed and dropped. Its CPU per tab in an
empty-history storm is what accepting, handshaking and framing cost in
Python on uvloop; fastaphlict's figure over it is what subscribing, the
replay lookup and its own bookkeeping add. It is never a server to deploy.

Run: ``python -m fastaphlict.bench.bare --client-port 23280``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from fastaphlict.bench.minimal import PONG, switching, unmask

__all__ = ["Bare", "main", "serve"]


class Bare(asyncio.Protocol):
    """One socket: the handshake, then a pong for each ``ping`` command and nothing else."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's, not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        transport = self.transport
        assert transport is not None
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            key = b""
            for line in bytes(buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            del buf[: end + 4]
            transport.write(switching(key))
            self.open = True
        # The frame reader is inline here, not minimal.next_frame: a floor must
        # not pay a call and a tuple a frame that a bare protocol would not.
        while len(buf) >= 2:
            size = buf[1] & 0x7F
            pos = 2
            if size == 126:
                if len(buf) < 4:
                    return
                size = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size = int.from_bytes(buf[2:10], "big")
                pos = 10
            masked = 4 if buf[1] & 0x80 else 0
            end = pos + masked + size
            if len(buf) < end:
                return
            opcode = buf[0] & 0x0F
            # Only a short text frame can be a ping command: longer ones (subscribe,
            # replay) are framed and dropped unread.
            if opcode == 0x1 and size < 64:
                payload = bytes(buf[pos + masked : end])
                if masked:
                    payload = unmask(payload, bytes(buf[pos : pos + 4]))
                if b'"ping"' in payload:
                    transport.write(PONG)
            elif opcode == 0x8:
                transport.close()
                return
            del buf[:end]


async def serve(host: str, port: int) -> None:
    """The listener, until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Bare, host, port, backlog=4096)
    print(f"bare protocol: client {port}", flush=True)
    async with server:
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--client-port", type=int, default=22280)
    args = parser.parse_args(argv)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.client_port))


if __name__ == "__main__":
    main()
