"""The client port: browsers' WebSockets, served by picows.

This module turns frames into hub calls and nothing else. It reads the four
Aphlict commands (``subscribe``, ``unsubscribe``, ``replay``, ``ping``) and the
instance of the request path by the rules of :mod:`fastaphlict.protocol`,
and answers plain HTTP requests the way Phorge's health check expects. It
never touches the admin side and holds no state beyond each socket's
:class:`~fastaphlict._fanout.Subscriber`.

Commands of one socket run synchronously in arrival order, so a ``pong`` is
proof that every earlier command on that socket took effect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from fastaphlict._fanout import Subscriber, build_frame
from fastaphlict.address import describe, format_address
from fastaphlict.config import Limits
from fastaphlict.hub import Hub
from fastaphlict.protocol import (
    BENIGN,
    PING_COMMAND,
    PONG,
    instance_from_path,
    read_command,
    replay_age,
)
from fastaphlict.ratelimit import Throttle

__all__ = [
    "NOT_WEBSOCKET_BODY",
    "ClientListener",
    "Options",
    "PicowsLog",
    "close_all",
    "close_slow",
    "listener_factory",
    "new_throttles",
]

log = logging.getLogger("fastaphlict.client")

#: Aphlict's exact answer to a plain HTTP request; Phorge reads 501 as healthy.
NOT_WEBSOCKET_BODY = b"HTTP/501 Use Websockets\n"
#: The reply to ``ping``, byte for byte.
_PONG_FRAME = build_frame(PONG)
#: Seconds a refused socket gets to read its close frame before it is dropped.
_CLOSE_GRACE = 1.0


def _close(transport: WSTransport, code: WSCloseCode, reason: bytes) -> None:
    """Close a socket we refuse, so that its client can read why.

    Closing at once could reset the connection (the client's unread frames
    turn a close into a RST) and lose the close frame with its code; the
    client gets a moment to answer, then the socket is dropped regardless.
    """
    transport.send_close(code, reason)
    asyncio.get_running_loop().call_later(_CLOSE_GRACE, transport.disconnect, False)


def close_slow(hub: Hub, sub: Subscriber, cap: int, throttle: Throttle | None = None) -> None:
    """Close a socket that does not read what it is sent (1013), once.

    The transport's own cap fires ``pause_writing`` again if the socket
    drains a little and fills up again, and a paced replay can overflow
    too: the ``slow`` mark keeps it to one close, one count, one log line.
    A tab can get itself closed at will (replays it never reads), so the
    line is kept within ``throttle``'s budget too.
    """
    if sub.slow:
        return
    sub.slow = True
    hub.slow_client_closed()
    transport = sub.transport
    if throttle is None or throttle.allow():
        log.warning("closing slow client: over %d unsent bytes: peer=%s", cap, describe(transport))
    # The close frame queues behind the backlog; the socket is dropped
    # shortly after whether or not the client ever reads it.
    _close(transport, WSCloseCode.TRY_AGAIN_LATER, b"too slow")


def _text(reason: object) -> str:
    """A close reason for a log line: picows keeps str or bytes."""
    if isinstance(reason, bytes):
        return reason.decode("utf-8", "replace")
    return str(reason or "")


def _close_summary(handshake: Any) -> str:
    """Who closed, with which code and reason, for the debug close line."""
    if handshake is None:
        return "without a close frame"
    first, who = (
        (handshake.recv, "client")
        if handshake.recv is not None and (handshake.sent is None or handshake.recv_then_sent)
        else (handshake.sent, "server")
    )
    if first is None:
        return "without a close frame"
    return f"closed by the {who}: code {int(first.code)} reason {_text(first.reason)!r}"


def _sendable(code: int) -> bool:
    """Whether an endpoint may put ``code`` in a close frame (RFC 6455 §7.4)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class Options:
    """What every socket of one client listener shares."""

    debug: bool = False
    limits: Limits = field(default_factory=Limits)
    #: The connection cap in force (Limits.max_connections resolved at start).
    max_connections: int = 0
    #: Log-line budgets for rejected input, shared by the server's sockets.
    throttles: dict[str, Throttle] = field(default_factory=lambda: new_throttles())


#: Close codes picows sends when its frame parser refuses a client's bytes.
_PARSER_CLOSE_CODES = frozenset({1002, 1003, 1007, 1009})
#: How picows words those refusals, at ERROR, one per connection.
_PICOWS_CLIENT_ERRORS = ("WS parser error", "on_ws_frame raised WSProtocolError")


class PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' logger, with a client's protocol errors demoted to debug.

    picows logs a malformed frame (too big, bad opcode, bad UTF-8) at ERROR,
    on an internet-facing port, and without the client's address; the
    listener logs it instead, once, at info and rate-limited. An adapter,
    not a Logger: picows builds a child Logger per connection from a Logger.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if (
            level >= logging.ERROR
            and isinstance(msg, str)
            and msg.startswith(_PICOWS_CLIENT_ERRORS)
        ):
            level = logging.DEBUG
        if not self.isEnabledFor(level):
            return  # picows logs every connection: nothing is formatted unless shown
        # picows passes socket addresses as tuples: one address format everywhere.
        args = tuple(format_address(a) if isinstance(a, tuple) else a for a in args)
        super().log(level, msg, *args, **kwargs)


def new_throttles() -> dict[str, Throttle]:
    """One throttle per kind of rejected client input, for one server."""
    return {
        kind: Throttle(kind, logger=log)
        for kind in (
            "ignored frame",
            "protocol error",
            "oversized",
            "subscriptions",
            "slow client",
            "origin",
            "instance name",
            "connection cap",
        )
    }


class ClientListener(WSListener):
    """One browser socket: runs its commands against the hub, in order."""

    __slots__ = (
        "_closed_here",
        "_fragments",
        "_hub",
        "_instance",
        "_logged_rejection",
        "_opened",
        "_options",
        "_sub",
    )

    def __init__(self, hub: Hub, instance: str, options: Options = Options()) -> None:
        super().__init__()
        self._hub = hub
        self._instance = instance
        self._options = options
        self._sub: Subscriber | None = None
        self._fragments: bytearray | None = None
        self._logged_rejection = False
        #: This listener closed the socket itself (and logged why).
        self._closed_here = False
        self._opened = 0.0  # monotonic time of the upgrade; set only with debug on

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._sub = self._hub.attach(self._instance, transport)
        # Past this many unsent bytes the event loop calls pause_writing():
        # the socket is not reading, and is closed before it eats the memory.
        transport.underlying_transport.set_write_buffer_limits(
            high=self._options.limits.max_buffered
        )
        # Debug only, as Aphlict traces them: after a restart thousands of tabs
        # reconnect at once, and two info lines per socket were a tenth of the
        # server's CPU per reconnecting tab (issue 8).
        if self._options.debug:
            self._opened = time.monotonic()
            log.debug("connection open: instance=%s peer=%s", self._instance, describe(transport))

    def pause_writing(self) -> None:
        """The socket's unsent data passed the cap.

        During a paced replay that is the replay's cue to wait for the
        socket to drain; otherwise the tab is not reading live traffic and
        is closed as too slow (1013).
        """
        sub = self._sub
        if sub is not None and not sub.pause():
            close_slow(
                self._hub,
                sub,
                self._options.limits.max_buffered,
                self._options.throttles["slow client"],
            )

    def resume_writing(self) -> None:
        """The socket drained: a paced replay goes on (nothing else waits)."""
        sub = self._sub
        if sub is not None and not sub.slow:
            sub.resume()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        sub = self._sub
        if sub is not None:
            self._hub.detach(self._instance, sub)
            self._sub = None
        handshake = transport.close_handshake
        sent = handshake.sent if handshake is not None else None
        if (
            sent is not None
            and not self._closed_here
            and handshake.recv is None
            and int(sent.code) in _PARSER_CLOSE_CODES
        ):
            # picows' parser refused the client's bytes (its own line is at debug).
            self._hub.reject_frame()
            if self._options.throttles["protocol error"].allow():
                log.info(
                    "closed %s: protocol error: %s (close %d)",
                    describe(transport),
                    _text(sent.reason),
                    int(sent.code),
                )
        if self._options.debug:
            log.debug(
                "connection closed: instance=%s peer=%s %s, after %.1fs",
                self._instance,
                describe(transport),
                _close_summary(handshake),
                time.monotonic() - self._opened,
            )

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        sub = self._sub
        if sub is not None:
            sub.heard = True  # any frame, pongs included, proves the peer alive
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # RFC 6455 §5.2: no extension was negotiated, so a set reserved
            # bit means the peer speaks something else; picows does not check.
            self._fragments = None
            self._protocol_error(transport, "reserved bits set")
            return
        msg_type = frame.msg_type
        if msg_type is WSMsgType.CLOSE:
            # Complete the closing handshake, echoing the code like ws does,
            # unless it is one an endpoint may not send (none, 1005, 1006,
            # 1015, out of range): then a plain 1000.
            code = frame.get_close_code()
            transport.send_close(code if _sendable(int(code)) else WSCloseCode.OK)
            transport.disconnect()
            return
        if transport.is_close_frame_sent:
            # Closing (a refused frame, a limit, shutdown): what follows is not
            # ours to judge; after a parser error it may not even be frames.
            return
        if msg_type is WSMsgType.PING:
            # Answered here, not by picows' auto-pong, which replies before
            # this handler sees the frame and so before its reserved bits.
            transport.send_pong(frame.get_payload_as_bytes())
            if sub is not None:
                sub.wrote_around()  # picows' write may have left bytes in the transport
            return
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            if self._fragments is not None:
                # RFC 6455 §5.4: a new message before the last one's final
                # fragment. ws fails the connection with 1002; so do we.
                self._fragments = None
                self._protocol_error(transport, "new message inside a fragmented one")
            elif frame.fin:
                self._handle(transport, frame.get_payload_as_bytes())
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
            return
        if msg_type is WSMsgType.CONTINUATION:
            buf = self._fragments
            if buf is None:
                # Nothing to continue (RFC 6455 §5.4): ws closes with 1002 too.
                self._protocol_error(transport, "continuation without a message")
                return
            limit = self._options.limits.max_frame_size
            if len(buf) + frame.payload_size > limit:
                self._fragments = None
                self._hub.reject_frame()
                self._closed_here = True
                if self._options.throttles["oversized"].allow():
                    log.info("closing: message over %d bytes from %s", limit, describe(transport))
                _close(transport, WSCloseCode.MESSAGE_TOO_BIG, b"message too big")
                return
            buf += frame.get_payload_as_memoryview()
            if frame.fin:
                self._fragments = None
                self._handle(transport, bytes(buf))
        # Unsolicited PONGs need nothing.

    def _protocol_error(self, transport: WSTransport, reason: str) -> None:
        """Close with 1002 for a frame RFC 6455 forbids; count and log it once."""
        if transport.is_close_frame_sent:
            return  # already closing: what follows the close is not ours to judge
        self._hub.reject_frame()
        self._closed_here = True
        if self._options.throttles["protocol error"].allow():
            log.info("closing: protocol error (%s) from %s", reason, describe(transport))
        _close(transport, WSCloseCode.PROTOCOL_ERROR, b"protocol error")

    def _handle(self, transport: WSTransport, payload: bytes) -> None:
        sub = self._sub
        if sub is None:
            return
        if payload == PING_COMMAND:  # what every browser sends every 15 s, byte for byte
            if self._options.debug:
                log.debug("command ping from %s", describe(transport))
            sub.send(_PONG_FRAME)
            return
        parsed = read_command(payload)
        if isinstance(parsed, str):
            self._reject(transport, parsed, payload)
            return
        command, data = parsed
        if self._options.debug:
            log.debug("command %s from %s: %r", command, describe(transport), data)
        if command == "ping":
            sub.send(_PONG_FRAME)
        elif command == "subscribe":
            if not self._hub.subscribe(sub, data):
                limit = self._options.limits.max_subscriptions
                self._hub.reject_frame()
                if self._options.throttles["subscriptions"].allow():
                    log.info("closing: over %d subscriptions from %s", limit, describe(transport))
                _close(transport, WSCloseCode.POLICY_VIOLATION, b"too many subscriptions")
        elif command == "unsubscribe":
            self._hub.unsubscribe(sub, data)
        else:  # replay
            age = replay_age(data)
            if age is not None:
                self._hub.replay(self._instance, sub, age)

    def _reject(self, transport: WSTransport, reason: str, payload: bytes) -> None:
        if reason is BENIGN:
            if self._options.debug:
                log.debug("ignored frame from %s: %s", describe(transport), reason)
            return
        self._hub.reject_frame()
        # One line per connection, not per frame: a hostile client can't flood the log.
        if not self._logged_rejection:
            self._logged_rejection = True
            if not self._options.throttles["ignored frame"].allow():
                return
            log.info(
                "ignored frame (%s) from %s; further ones on this socket logged at debug",
                reason,
                describe(transport),
            )
        elif self._options.debug:
            log.debug("ignored frame (%s) from %s: %r", reason, describe(transport), payload[:200])


def listener_factory(hub: Hub, options: Options = Options()):
    """Build the picows router: WebSocket upgrades get a listener, plain HTTP gets 501.

    ``GET /healthz`` answers 200 for load balancers; every other request that
    is not a WebSocket upgrade gets Aphlict's 501, which Phorge's "test
    client" check reads as healthy.
    """

    limits = options.limits
    origins = frozenset(limits.allowed_origins)
    throttles = options.throttles
    hub.on_slow_client(
        lambda sub: close_slow(hub, sub, limits.max_buffered, throttles["slow client"])
    )

    def refuse(status: int, body: bytes, **headers: str) -> WSUpgradeResponseWithListener:
        response = WSUpgradeResponse.create_error_response(status, body, headers or None)
        return WSUpgradeResponseWithListener(response, None)

    def factory(request: WSUpgradeRequest) -> ClientListener | WSUpgradeResponseWithListener:
        upgrade = request.headers.get("Upgrade", "")
        if upgrade.lower() != "websocket":
            path = request.path.split(b"?", 1)[0]
            if path == b"/healthz":
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_ok_response(b"ok\n"), None
                )
            return refuse(501, NOT_WEBSOCKET_BODY)
        # Each refusal is one line within its kind's budget: a page (or a
        # script) retrying in a loop must not fill the disk.
        if origins and request.headers.get("Origin", "") not in origins:
            if throttles["origin"].allow():
                log.info("refused origin %r", request.headers.get("Origin"))
            return refuse(403, b"origin not allowed\n")
        instance = instance_from_path(request.path)
        if len(instance) > limits.max_instance_length:
            if throttles["instance name"].allow():
                log.info("refused instance name over %d characters", limits.max_instance_length)
            return refuse(400, b"instance name too long\n")
        if options.max_connections and hub.clients_active >= options.max_connections:
            if throttles["connection cap"].allow():
                log.warning("refused connection: %d open, the limit", hub.clients_active)
            return refuse(503, b"server full, try again later\n", **{"Retry-After": "5"})
        return ClientListener(hub, instance, options)

    return factory


def close_all(hub: Hub, code: WSCloseCode = WSCloseCode.GOING_AWAY) -> int:
    """Send every open socket a close frame (shutdown); return how many.

    Frames still waiting in the outbox go first: a message published just
    before the signal is delivered, not dropped behind the close frame.
    """
    hub.outbox.flush()
    count = 0
    for inst in hub.instances():
        for sub in inst.channel.subscribers():
            transport = sub.transport
            if not (transport.is_close_frame_sent or transport.is_disconnected):
                transport.send_close(code)
                count += 1
    return count
