"""A TLS listener that accepts a budget of sockets per loop pass, so handshakes come paced.

uvloop's own accept path takes every connection waiting in the backlog in
one pass, and their ClientHellos are then ready together in the next: the
private-key work of a whole reconnect storm (~0.25 ms a tab with ECDSA,
~0.7 ms with RSA-2048 on the development machine) runs back to back in one
pass, and every open tab's ping waits behind it. Here the listening socket's
readiness calls :meth:`PacedServer._accept`, which takes at most ``budget``
sockets and hands each to ``loop.connect_accepted_socket`` with the TLS
context; the rest wait in the kernel's backlog for the next pass, after
the other sockets' reads. On Linux a connection enters that backlog only
once its ClientHello is in (``TCP_DEFER_ACCEPT``), so the budget bounds the
handshakes of a pass. A plain listener has no such work per connection and
stays on uvloop's C accept path.

This module knows nothing of WebSockets or the hub: it takes a protocol
factory and an ``ssl.SSLContext``, as ``loop.create_server`` does, and
returns an object used as that call's ``asyncio.Server`` is.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ACCEPT_BUDGET", "PacedServer", "bind", "serve"]

log = logging.getLogger("fastaphlict.server")

#: Sockets accepted per loop pass (see docs/benchmarks.md, "Reconnect storm
#: over TLS": the watcher's worst ping against the storm's length).
ACCEPT_BUDGET = 16
#: Linux's TCP_DEFER_ACCEPT: a connection reaches the backlog once its first
#: bytes (the ClientHello) have arrived, so each socket accepted has its
#: handshake ready and the budget bounds the handshakes of a pass, not only
#: the accepts (a client often connects long before it sends its hello).
DEFER_ACCEPT: int | None = getattr(socket, "TCP_DEFER_ACCEPT", None)
#: How long accepting pauses when the process is out of descriptors or memory.
RETRY_DELAY = 1.0
#: accept() failures that say the process, not the peer, is out of something.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class PacedServer(asyncio.AbstractServer):
    """Listening sockets served through a per-pass accept budget.

    ``accepted`` records how many sockets each accept callback took, when a
    test asks for it (a list); None costs nothing.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        sockets: Sequence[socket.socket],
        *,
        handshake_timeout: float | None = None,
        budget: int = ACCEPT_BUDGET,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._factory = protocol_factory
        self._context = context
        self._sockets = list(sockets)
        self._handshake_timeout = handshake_timeout
        self._budget = budget
        self._serving = False
        #: Accepted sockets; uvloop detaches each (fileno -1) once its transport closed.
        self._connections: set[socket.socket] = set()
        self._pruned_at = 0
        #: Pending handshakes, held so that no task is collected mid-way.
        self._handshakes: set[asyncio.Task[Any]] = set()
        self.accepted: list[int] | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._start()

    async def serve_forever(self) -> None:
        raise NotImplementedError("serve with start_serving() and close()")

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay."""
        self._stop()
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def wait_closed(self) -> None:
        """Until every connection accepted here is closed (as uvloop's server waits)."""
        while self._sockets or self._open():
            await asyncio.sleep(0.01)

    def _start(self) -> None:
        if self._serving or not self._sockets:
            return
        self._serving = True
        for sock in self._sockets:
            if DEFER_ACCEPT:
                seconds = max(1, math.ceil(self._handshake_timeout or 1))
                sock.setsockopt(socket.IPPROTO_TCP, DEFER_ACCEPT, seconds)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop(self) -> None:
        if self._serving:
            self._serving = False
            for sock in self._sockets:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        """Take up to the budget from the backlog; the rest waits for the next pass."""
        taken = 0
        for _ in range(self._budget):  # failed accepts count too: never a spin
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    # As asyncio does: stop asking for a while, or the loop spins.
                    log.error("cannot accept a connection (%s): retrying in %g s", exc, RETRY_DELAY)
                    self._stop()
                    self._loop.call_later(RETRY_DELAY, self._start)
                    break
                continue  # the peer's doing (ECONNABORTED...): the next one
            taken += 1
            # No setblocking(): libuv makes the socket non-blocking as it opens it.
            self._track(sock)
            task = self._loop.create_task(self._handshake(sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
        if self.accepted is not None:
            self.accepted.append(taken)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                self._factory,
                sock,
                ssl=self._context,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            # A peer that does not finish the handshake: uvloop has closed it
            # already and logs it in debug mode, as on its own accept path.
            log.debug("tls handshake failed: %s", exc)
        except Exception:
            # The boundary of one connection: say so once, keep the listener.
            log.exception("tls connection failed")

    def _track(self, sock: socket.socket) -> None:
        """Remember ``sock`` for wait_closed; drop the closed ones as the set doubles."""
        self._connections.add(sock)
        if len(self._connections) > 2 * self._pruned_at + 64:
            self._open()

    def _open(self) -> int:
        self._connections = {s for s in self._connections if s.fileno() != -1}
        self._pruned_at = len(self._connections)
        return self._pruned_at


async def bind(
    host: str | None, port: int, *, reuse_address: bool, reuse_port: bool, backlog: int
) -> list[socket.socket]:
    """Listening sockets for ``host``'s addresses, with the options ``create_server`` sets.

    One socket per address family the name resolves to (``0.0.0.0`` gives
    one, a name with IPv4 and IPv6 addresses two); IPv6 sockets are IPv6
    only, as asyncio makes them. An error closes what was opened and keeps
    its errno.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    context: ssl.SSLContext,
    *,
    host: str | None = None,
    port: int = 0,
    sock: socket.socket | None = None,
    reuse_address: bool = True,
    reuse_port: bool = False,
    backlog: int = 100,
    handshake_timeout: float | None = None,
    budget: int | None = None,
) -> PacedServer:
    """A started :class:`PacedServer` on ``sock`` (already listening) or a bind of host/port.

    ``budget`` defaults to :data:`ACCEPT_BUDGET` as it is at the call.
    """
    if sock is not None:
        sock.setblocking(False)
        sockets = [sock]
    else:
        sockets = await bind(
            host, port, reuse_address=reuse_address, reuse_port=reuse_port, backlog=backlog
        )
    server = PacedServer(
        protocol_factory,
        context,
        sockets,
        handshake_timeout=handshake_timeout,
        budget=ACCEPT_BUDGET if budget is None else budget,
    )
    server._start()
    return server
