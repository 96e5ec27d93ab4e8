"""The admin port: where Phorge's PHP posts messages and reads status.

Phorge posts the raw JSON body with curl's default form content type, so the
body is JSON whatever the ``Content-Type`` says: it is never parsed as a form.
PHP only looks at status codes and gives up after 2 s, so every answer here is
immediate; relaying to peers happens behind the hub, asynchronously.

An aiohttp application serves every route. In front of it,
:class:`AdminProtocol` answers the one hot request, a plain ``POST /`` with a
``Content-Length``, itself: aiohttp spends about 130 us of CPU per request on
this path (request, stream and response objects, routing, a task), more than
delivering a typical message to all of its ~45 sockets. Any other request
(status, health, chunked bodies, anything unusual) hands the connection to
aiohttp as it is, so every edge of HTTP keeps aiohttp's handling.

This module only translates HTTP to hub calls; it never touches WebSockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from fastaphlict import metrics
from fastaphlict.hub import Hub, format_address
from fastaphlict.peers import PeerRelay
from fastaphlict.protocol import (
    DEFAULT_INSTANCE,
    MAX_DEPTH,
    NestingTooDeep,
    dumps,
    loads,
    parse_post_head,
    query_instance,
)
from fastaphlict.ratelimit import Throttle

if TYPE_CHECKING:
    from fastaphlict.broker import Broker

__all__ = [
    "MAX_BODY_SIZE",
    "AdminProtocol",
    "accept_post",
    "make_app",
    "refused_loopback",
]

log = logging.getLogger("fastaphlict.admin")

#: Largest accepted post body; bigger posts get 413, like Aphlict.
MAX_BODY_SIZE = 2 * 1024 * 1024
#: Largest request head the fast path reads; past it aiohttp decides.
MAX_HEAD_SIZE = 16 * 1024
#: Idle keep-alive connections are closed after this long, as aiohttp does.
KEEPALIVE_TIMEOUT = 75.0

HUB_KEY: web.AppKey[Hub] = web.AppKey("hub", Hub)
REGISTRY_KEY: web.AppKey[CollectorRegistry] = web.AppKey("metrics", CollectorRegistry)


def accept_post(hub: Hub, instance: str, body: bytes, remote: object) -> tuple[int, bytes]:
    """Decide one ``POST /``: publish a JSON object, refuse anything else.

    Returns the status and the response body. Shared by both HTTP paths so
    they can't disagree. ``remote`` (a peer name) is only formatted for a
    rejection's log line, never on the accepted path.
    """
    if len(instance) > hub.max_instance_length:
        hub.stats.posts_rejected += 1
        log.info("rejected post from %s: instance name too long", format_address(remote))
        return 400, b"instance name too long\n"
    try:
        message = loads(body)
    except NestingTooDeep:
        hub.stats.posts_rejected += 1
        log.info(
            "rejected post from %s: JSON nested deeper than %d", format_address(remote), MAX_DEPTH
        )
        return 400, b"body must be a JSON object\n"
    except ValueError:
        hub.stats.posts_rejected += 1
        log.info("rejected post from %s: body is not JSON", format_address(remote))
        return 400, b"body must be a JSON object\n"
    if not isinstance(message, dict):
        hub.stats.posts_rejected += 1
        log.info("rejected post from %s: body is JSON but not an object", format_address(remote))
        return 400, b"body must be a JSON object\n"
    hub.publish(instance or DEFAULT_INSTANCE, message)
    return 200, hub.receipt


def _instance(request: web.Request) -> str:
    """``?instance=NAME`` (decoded, first value wins); absent or empty is ``default``."""
    return request.query.get("instance") or DEFAULT_INSTANCE


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


async def handle_root(request: web.Request) -> web.Response:
    """``POST /``: accept one message; any other method is 405."""
    if request.method != "POST":
        return _text(405, "method not allowed")
    hub = request.app[HUB_KEY]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        hub.stats.posts_rejected += 1
        log.warning("rejected post over %d bytes from %s", MAX_BODY_SIZE, request.remote)
        return _text(413, "request body too large")
    status, answer = accept_post(hub, _instance(request), body, request.remote)
    if status != 200:
        return web.Response(status=status, body=answer, content_type="text/plain")
    return web.Response(body=answer, content_type="application/json")


async def handle_status(request: web.Request) -> web.Response:
    """``GET``/``HEAD /status/``: Aphlict's flat status object for one instance."""
    status = request.app[HUB_KEY].status(_instance(request))
    return web.Response(body=dumps(status), content_type="application/json")


async def handle_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format, computed at scrape time."""
    body = metrics.render(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def handle_healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness for containers and load balancers."""
    return web.Response(text="ok\n")


def make_app(
    hub: Hub,
    *,
    relay: PeerRelay | None = None,
    broker: Broker | None = None,
    max_body_size: int = MAX_BODY_SIZE,
) -> web.Application:
    """The admin application. ``/status`` without its slash is a 404, as in Aphlict."""
    app = web.Application(client_max_size=max_body_size)
    app[HUB_KEY] = hub
    app[REGISTRY_KEY] = metrics.make_registry(hub, relay, broker)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_route("*", "/", handle_root)
    app.router.add_get("/status/", handle_status)
    app.router.add_get("/healthz", handle_healthz)
    return app


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    413: b"Request Entity Too Large",
    500: b"Internal Server Error",
}


def refused_loopback(listen: str, allow: tuple[IPv4Network | IPv6Network, ...]) -> tuple[str, ...]:
    """The loopback addresses a listener on ``listen`` accepts but ``allow`` refuses.

    Docker's health check and a Phorge on the same host connect from there;
    an allow-list that forgets them is most likely a mistake.
    """
    if not allow:
        return ()
    if listen == "localhost":
        candidates = ("127.0.0.1", "::1")
    else:
        try:
            address = ip_address(listen)
        except ValueError:
            return ()  # a host name: its loopback, if any, is unknown here
        if address.is_unspecified:
            candidates = ("127.0.0.1",) if address.version == 4 else ("127.0.0.1", "::1")
        elif address.is_loopback:
            candidates = (str(address),)
        else:
            return ()
    return tuple(c for c in candidates if not _allowed((c, 0), allow))


def _allowed(peername: object, allow: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        address = ip_address(peername[0])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allow)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _response(status: int, body: bytes, *, close: bool) -> bytes:
    kind = b"application/json" if status == 200 else b"text/plain; charset=utf-8"
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        _REASONS[status],
        kind,
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


class AdminProtocol(asyncio.Protocol):
    """One admin connection: ``POST /`` served here, anything else by aiohttp.

    The fast path reads requests that are exactly what Phorge sends: a
    request line ``POST /`` or ``POST /?query``, a ``Content-Length``, no
    ``Transfer-Encoding``. It keeps connections alive, answers curl's
    ``Expect: 100-continue`` and serves pipelined requests in order. The
    first request it does not take hands the connection, with the bytes
    already read, to an aiohttp handler for good.
    """

    def __init__(
        self,
        hub: Hub,
        fallback: Callable[[], asyncio.Protocol],
        connections: set[AdminProtocol],
        max_body_size: int = MAX_BODY_SIZE,
        allow: tuple[IPv4Network | IPv6Network, ...] = (),
        refused: Throttle | None = None,
    ) -> None:
        self._hub = hub
        self._fallback = fallback
        self._connections = connections
        self._max_body = max_body_size
        self._allow = allow
        # One budget per listener for "refused" lines: an outsider hammering
        # the port must not fill the disk.
        self._refused = refused
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._continued = False  # 100 Continue already sent for the current request
        self._idle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._active_at = 0.0  # loop time of the last answered request
        self._remote: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._remote = transport.get_extra_info("peername")
        if self._allow and not _allowed(self._remote, self._allow):
            if self._refused is None or self._refused.allow():
                log.warning(
                    "refused admin connection from %s: not in the allow-list",
                    format_address(self._remote),
                )
            transport.write(_response(403, b"forbidden\n", close=True))  # type: ignore[attr-defined]
            transport.close()
            self._transport = None
            return
        self._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def close(self) -> None:
        """Close this connection (shutdown); a request being read is abandoned."""
        if self._transport is not None:
            self._transport.close()

    def _arm_idle(self) -> None:
        # One timer per connection, re-armed lazily when it fires: requests
        # only stamp _active_at, so a busy connection costs no timer churn.
        self._active_at = self._loop.time()
        self._idle = self._loop.call_at(self._active_at + KEEPALIVE_TIMEOUT, self._on_idle)

    def _on_idle(self) -> None:
        deadline = self._active_at + KEEPALIVE_TIMEOUT
        if self._loop.time() >= deadline:
            self.close()
        else:
            self._idle = self._loop.call_at(deadline, self._on_idle)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while self._transport is not None and buffer:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE)
            if end < 0:
                if len(buffer) >= MAX_HEAD_SIZE:
                    self._hand_off()
                return
            parsed = parse_post_head(bytes(buffer[:end]))
            if parsed is None:
                self._hand_off()
                return
            target, length, expect_continue, close = parsed
            if length > self._max_body:
                self._hub.stats.posts_rejected += 1
                log.warning(
                    "rejected post over %d bytes from %s",
                    self._max_body,
                    format_address(self._remote),
                )
                self._transport.write(_response(413, b"request body too large\n", close=True))
                self._transport.close()
                return
            start = end + 4
            if len(buffer) - start < length:
                if expect_continue and not self._continued:
                    self._continued = True
                    self._transport.write(_CONTINUE)
                return
            body = bytes(buffer[start : start + length])
            del buffer[: start + length]
            self._continued = False
            try:
                status, answer = accept_post(self._hub, query_instance(target), body, self._remote)
            except Exception:
                # The boundary of one request, as aiohttp's is: log it, answer
                # 500 and close, rather than let the loop drop the connection
                # with no answer at all.
                log.exception("post from %s failed", format_address(self._remote))
                self._transport.write(_response(500, b"internal error\n", close=True))
                self._transport.close()
                return
            self._transport.write(_response(status, answer, close=close))
            if close:
                self._transport.close()
                return
            self._active_at = self._loop.time()

    def _hand_off(self) -> None:
        """Give this connection, and what it sent so far, to aiohttp for good."""
        transport = self._transport
        if transport is None:
            return
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None
        handler = self._fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        pending, self._buffer = bytes(self._buffer), bytearray()
        if pending:
            handler.data_received(pending)
