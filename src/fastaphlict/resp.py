"""One connection to Redis: RESP over an asyncio protocol, replies parsed by hiredis.

Why not redis-py, the ecosystem's client: measured with the ``broker``
benchmark, its per-call machinery (a ``SCRIPT EXISTS`` round trip before
every pipeline, a coroutine and a timeout context per reply read, command
packing in Python) made a brokered message cost the posting node more than
delivering it to 45 tabs. Here a command is packed by hiredis' C code,
commands of one batch leave in one write, and every reply that arrives in one
read is parsed by hiredis and handed over in one loop; pub/sub messages go
straight to a callback, in the event loop's own ``data_received``.

What it owns: connecting (TCP, TLS verified against a CA file or the
system's, or a unix socket; then ``AUTH``, ``SELECT`` and a client name in
one round trip), pipelining, matching replies to callers in order. What it
never does: retry or reconnect. The broker decides that, because every
reconnection needs its catch-up first. Every wait has a timeout, and a
timed-out connection is closed: after a lost reply its order is unknown.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import hiredis

log = logging.getLogger("fastaphlict.broker")

if TYPE_CHECKING:
    from fastaphlict.config import BrokerConfig

__all__ = ["ConnectionLost", "RedisError", "RespConnection", "connect"]

Command = Sequence[str | bytes | int | float]


class RedisError(Exception):
    """Redis answered with an error, or the connection could not do its job."""


class ConnectionLost(RedisError):
    """The connection closed (or was closed) before the reply came."""


#: What a batch's caller is told: every reply in order, or why there are none.
BatchDone = Callable[[list[Any] | None, Exception | None], None]


class _Waiting:
    """One batch of commands sent, waiting for its replies."""

    __slots__ = ("count", "done", "replies")

    def __init__(self, count: int, done: BatchDone) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.done = done


class RespConnection(asyncio.Protocol):
    """A Redis connection: send commands, get their replies in order, or get pushes.

    Replies are matched to waiting batches first; a reply nobody waits for
    (a pub/sub message) goes to :attr:`on_push`.
    """

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Called with each reply nobody waits for (pub/sub messages).
        self.on_push: Callable[[Any], None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        waiting = self._waiting
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if waiting:
                    head = waiting[0]
                    head.replies.append(reply)
                    if len(head.replies) == head.count:
                        waiting.popleft()
                        _tell(head, head.replies, None)
                elif self.on_push is not None:
                    self.on_push(reply)
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionLost(f"protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection lost: {exc}" if exc else "connection closed"))

    # -- API --------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def send_batch(self, commands: Sequence[Command], done: BatchDone) -> None:
        """Write ``commands`` in one write; ``done(replies, None)`` once all replies are in.

        ``done(None, error)`` instead when the connection is lost first. Error
        replies are :class:`hiredis.ReplyError` values among the replies.
        The caller bounds the wait (and closes the connection on a timeout).
        """
        if self._transport is None or self.closed.done():
            raise ConnectionLost("connection closed")
        pack = hiredis.pack_command
        if len(commands) == 1:  # the publisher's usual batch
            data = pack(tuple(commands[0]))
        else:
            data = b"".join([pack(tuple(c)) for c in commands])
        try:
            self._transport.write(data)
        except Exception as exc:  # uvloop raises RuntimeError once its handle is closed
            raise ConnectionLost(f"cannot write: {exc}") from exc
        self._waiting.append(_Waiting(len(commands), done))

    async def execute_many(self, commands: Sequence[Command], timeout: float) -> list[Any]:
        """Send ``commands``; their replies, error replies as :class:`hiredis.ReplyError` values.

        On a timeout the connection is closed (a late reply would be taken
        for the next command's) and :class:`TimeoutError` is raised.
        """
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def done(replies: list[Any] | None, error: Exception | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(replies or [])

        self.send_batch(commands, done)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.close()
            raise TimeoutError(f"no reply from Redis within {timeout:g}s") from None

    async def execute(self, command: Command, timeout: float) -> Any:
        """One command's reply; an error reply raises :class:`RedisError`."""
        [reply] = await self.execute_many([command], timeout)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    def close(self) -> None:
        """Close now; whatever waits is told :class:`ConnectionLost`."""
        if self._transport is not None:
            self._transport.abort()
        self._fail(ConnectionLost("connection closed"))

    def _fail(self, error: RedisError) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        while self._waiting:
            _tell(self._waiting.popleft(), None, error)


def _tell(waiting: _Waiting, replies: list[Any] | None, error: Exception | None) -> None:
    """Hand a batch its outcome; a caller's bug is logged, never left to stall the others."""
    try:
        waiting.done(replies, error)
    except Exception:
        log.exception("redis: a reply handler failed")


async def connect(
    config: BrokerConfig, *, timeout: float, ca_file: str | None = None, name: str = ""
) -> RespConnection:
    """Open a connection to the broker and authenticate; raise within ``timeout``.

    Errors never carry the password: they are Redis' or the system's words.
    """
    loop = asyncio.get_running_loop()
    protocol = RespConnection()
    try:
        if config.scheme == "unix":
            await asyncio.wait_for(
                loop.create_unix_connection(lambda: protocol, config.path), timeout
            )
        else:
            context = None
            if config.scheme == "rediss":
                context = ssl.create_default_context(cafile=ca_file)
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: protocol,
                    config.host,
                    config.port,
                    ssl=context,
                    server_hostname=config.host if context else None,
                    ssl_handshake_timeout=timeout if context else None,
                ),
                timeout,
            )
    except asyncio.TimeoutError:
        raise TimeoutError(f"no connection within {timeout:g}s") from None
    handshake: list[Command] = []
    if config.password is not None:
        if config.username:
            handshake.append(("AUTH", config.username, config.password))
        else:
            handshake.append(("AUTH", config.password))
    if config.db:
        handshake.append(("SELECT", config.db))
    if name:
        handshake.append(("CLIENT", "SETNAME", name))
    if handshake:
        try:
            replies = await protocol.execute_many(handshake, timeout)
        except BaseException:
            protocol.close()
            raise
        for command, reply in zip(handshake, replies, strict=True):
            if not isinstance(reply, hiredis.ReplyError):
                continue
            if command[0] == "CLIENT":
                continue  # the name only helps CLIENT LIST; an ACL may forbid it
            protocol.close()
            if command[0] == "AUTH":
                raise RedisError(f"AUTH refused: {_auth_error(str(reply))}")
            raise RedisError(f"{command[0]} refused: {reply}")
    return protocol


def _auth_error(text: str) -> str:
    """Redis' answer to AUTH without anything it echoed of the command.

    An ``ERR unknown command 'AUTH', with args beginning with: ...`` (AUTH
    renamed away, or not Redis at all) repeats the password; the error code
    and a fixed explanation are enough.
    """
    code = text.split(" ", 1)[0] if text else "ERR"
    known = {
        "WRONGPASS": "wrong user name or password",
        "NOPERM": "the user may not do this",
        "NOAUTH": "authentication required",
    }
    return f"{code} ({known.get(code, 'the server refused the credentials')})"
