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
aiohttp as it is, so every edge of HTTP keeps aiohttp's handling. The fast
path takes only heads it fully understands, by RFC 9112's strict rules
(:func:`~fastaphlict.protocol.parse_post_head`): where it and aiohttp, or a
proxy in front, could read a head differently, requests can be smuggled.

A body over the limit gets 413 on either path, then a lingering close: the
rest of the body is read and dropped, within :data:`LINGER_BYTES` and
:data:`LINGER_TIME`, so a client still sending it reads the answer. Log lines
about refused requests stay within per-kind budgets (:func:`new_throttles`).

This module only translates HTTP to hub calls; it never touches WebSockets.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from fastaphlict import dashboard, metrics
from fastaphlict.address import format_address
from fastaphlict.hub import Hub
from fastaphlict.peers import PeerRelay
from fastaphlict.protocol import (
    DEFAULT_INSTANCE,
    MAX_DEPTH,
    NestingTooDeep,
    could_be_plain_head,
    dumps,
    loads,
    parse_post_head,
    query_instance,
)
from fastaphlict.ratelimit import Throttle

if TYPE_CHECKING:
    from fastaphlict.broker import Broker

__all__ = [
    "LINGER_BYTES",
    "LINGER_TIME",
    "MAX_BODY_SIZE",
    "AdminProtocol",
    "AiohttpLog",
    "accept_post",
    "make_app",
    "new_throttles",
    "refused_loopback",
]

log = logging.getLogger("fastaphlict.admin")

#: Largest accepted post body; bigger posts get 413, like Aphlict.
MAX_BODY_SIZE = 2 * 1024 * 1024
#: Largest request head the fast path reads; past it aiohttp decides.
MAX_HEAD_SIZE = 16 * 1024
#: Idle keep-alive connections are closed after this long, as aiohttp does.
KEEPALIVE_TIMEOUT = 75.0
#: After a 413 the rest of the body is read and dropped, as nginx's lingering
#: close does: closing with unread bytes makes the kernel send a reset, and a
#: client still sending (Python's http.client, curl without 100-continue)
#: then gets ECONNRESET instead of the answer. At most this many bytes...
LINGER_BYTES = 16 * 1024 * 1024
#: ...for at most this many seconds; then the connection is closed regardless,
#: so a client declaring a huge body and trickling it holds nothing for long.
LINGER_TIME = 5.0

HUB_KEY: web.AppKey[Hub] = web.AppKey("hub", Hub)
REGISTRY_KEY: web.AppKey[CollectorRegistry] = web.AppKey("metrics", CollectorRegistry)
THROTTLES_KEY: web.AppKey[dict[str, Throttle]] = web.AppKey("throttles", dict)


def new_throttles() -> dict[str, Throttle]:
    """One log-line budget per kind of refused admin request, for one listener.

    The admin port may be reachable by more than Phorge: a line per refused
    connection or request would let a client fill the disk.
    """
    return {
        kind: Throttle(kind, logger=log)
        for kind in ("refused connection", "rejected post", "post too large", "bad request")
    }


def _refusal(throttles: dict[str, Throttle] | None, kind: str) -> bool:
    """Whether to log one refusal of ``kind`` (always, without budgets)."""
    return throttles is None or throttles[kind].allow()


def accept_post(
    hub: Hub,
    instance: str,
    body: bytes,
    remote: object,
    throttles: dict[str, Throttle] | None = None,
) -> tuple[int, bytes]:
    """Decide one ``POST /``: publish a JSON object, refuse anything else.

    Returns the status and the response body. Shared by both HTTP paths so
    they can't disagree. ``remote`` (a peer name) is only formatted for a
    rejection's log line, never on the accepted path; those lines are kept
    within the ``rejected post`` budget of ``throttles``.

    A ``subscribers`` list longer than ``hub.max_subscribers`` gets 413: the
    message is well formed but more than this server takes (RFC 9110
    §15.5.14), where a 400 would send whoever reads the log looking for a
    malformed body. Phorge treats both alike: any non-2xx status fails the
    post, which it then tries on its next admin server, if any, and drops
    without a word (old Phabricator phlog()s it). This log line is the one
    trace, hence a warning, as for a body over its size; unlike that one,
    this body was read whole, so the connection stays open. A peer's relay
    is a post too: it gets the same check.
    """
    status, level = 400, logging.INFO
    if len(instance) > hub.max_instance_length:
        reason = "instance name too long"
    else:
        try:
            message = loads(body)
        except NestingTooDeep:
            reason = f"JSON nested deeper than {MAX_DEPTH}"
        except ValueError:
            reason = "body is not JSON"
        else:
            if not isinstance(message, dict):
                reason = "body is JSON but not an object"
            else:
                subscribers = message.get("subscribers")
                if not isinstance(subscribers, list) or len(subscribers) <= hub.max_subscribers:
                    hub.publish(instance or DEFAULT_INSTANCE, message)
                    return 200, hub.receipt
                status, level = 413, logging.WARNING
                reason = (
                    f"{len(subscribers)} subscribers, over the limit of {hub.max_subscribers}"
                    " (--max-subscribers)"
                )
    hub.reject_post()
    if _refusal(throttles, "rejected post"):
        log.log(level, "rejected post from %s: %s", format_address(remote), reason)
    if status == 413:
        return 413, b"too many subscribers\n"
    if reason == "instance name too long":
        return 400, b"instance name too long\n"
    return 400, b"body must be a JSON object\n"


def _instance(request: web.Request) -> str:
    """``?instance=NAME`` (decoded, first value wins); absent or empty is ``default``."""
    return request.query.get("instance") or DEFAULT_INSTANCE


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


async def handle_root(request: web.Request) -> web.StreamResponse:
    """``POST /``: accept one message; any other method is 405."""
    if request.method != "POST":
        return _text(405, "method not allowed")
    hub = request.app[HUB_KEY]
    throttles = request.app[THROTTLES_KEY]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        hub.reject_post()
        if throttles["post too large"].allow():
            log.warning(
                "rejected post over %d bytes from %s", request.client_max_size, request.remote
            )
        return await _too_large(request)
    except web.RequestPayloadError as exc:
        # A body aiohttp could not read (a bad chunk, a bad Content-Encoding):
        # the client's doing, answered 400 rather than aiohttp's 500.
        if throttles["bad request"].allow():
            log.info("rejected request from %s: %s", request.remote, _reason(exc))
        return await _refused_body(request)
    status, answer = accept_post(hub, _instance(request), body, request.remote, throttles)
    if status != 200:
        return web.Response(status=status, body=answer, content_type="text/plain")
    return web.Response(body=answer, content_type="application/json")


async def _too_large(request: web.Request) -> web.StreamResponse:
    """Answer 413 and close, after reading (and dropping) the rest of the body.

    The fast path's lingering close (see :data:`LINGER_BYTES`), for the
    requests aiohttp serves (chunked bodies, unusual heads). aiohttp would
    linger by itself, but for its ``lingering_time`` only, however many bytes
    arrive, and then keep the connection alive. The answer goes out first,
    so a client that reads while it sends stops early.
    """
    response = _text(413, "request body too large")
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_TIME
    budget = LINGER_BYTES
    content = request.content
    try:
        while budget > 0 and not content.is_eof():
            chunk = await asyncio.wait_for(content.readany(), deadline - loop.time())
            budget -= len(chunk)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    if not content.is_eof():
        # Over either bound: close now, not after aiohttp's own lingering.
        request.protocol.force_close()
    return response


async def _refused_body(request: web.Request) -> web.StreamResponse:
    """Answer 400 and close: the rest of a body that failed can't be read, nor lingered on."""
    response = _text(400, "bad request body")
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


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
    throttles: dict[str, Throttle] | None = None,
) -> web.Application:
    """The admin application. ``/status`` without its slash is a 404, as in Aphlict.

    ``throttles`` (:func:`new_throttles`) are the log-line budgets it shares
    with the listener's :class:`AdminProtocol`.
    """
    app = web.Application(client_max_size=max_body_size)
    app[HUB_KEY] = hub
    app[THROTTLES_KEY] = new_throttles() if throttles is None else throttles
    app[REGISTRY_KEY] = metrics.make_registry(hub, relay, broker)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_route("*", "/", handle_root)
    app.router.add_get("/status/", handle_status)
    app.router.add_get("/healthz", handle_healthz)
    dashboard.add_routes(app, hub, relay, broker)
    return app


def _reason(exc: BaseException) -> str:
    """The first line of why aiohttp refused a request, without its ``400, message:``."""
    text = str(exc.message) if isinstance(exc, HttpProcessingError) else str(exc)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not _STATUS_PREFIX.fullmatch(line)]
    return lines[0][:200].rstrip(":") if lines else "malformed"


_STATUS_PREFIX = re.compile(r"\d{3}, message:")


class AiohttpLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, with a client's malformed requests kept within a budget.

    aiohttp logs at ERROR, with a traceback, every request it can't parse, a
    body it can't read (a bad chunk or ``Content-Encoding``, seen both by the
    handler and by aiohttp's lingering read after it) and a client that left
    mid-body: lines a client gets for each bad request it sends. The first
    two become one short info line on ``fastaphlict.admin``, within the
    ``bad request`` budget; a client gone is a debug line. Anything else (a
    handler that raised) is logged by aiohttp as before.
    """

    def __init__(self, logger: logging.Logger, throttle: Throttle) -> None:
        super().__init__(logger, {})
        self._throttle = throttle

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if level >= logging.ERROR and isinstance(exc, _CLIENT_FAULTS):
            remote = args[0] if args else "unknown"
            if isinstance(exc, ConnectionError):
                log.debug("request from %s ended early: %s", remote, exc)
            elif self._throttle.allow():
                log.info("rejected request from %s: %s", remote, _reason(exc))
            return
        super().log(level, msg, *args, **kwargs)


#: What a client causes: a head or body aiohttp refuses, or leaving mid-request.
_CLIENT_FAULTS = (HttpProcessingError, web.RequestPayloadError, ConnectionError)


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
    ``Transfer-Encoding``, in strict RFC 9112 syntax. It keeps connections
    alive, answers curl's ``Expect: 100-continue`` and serves pipelined
    requests in order, reading no more while the client leaves its answers
    unread (write back-pressure, as aiohttp). The first request it does not
    take hands the connection, with the bytes already read, to an aiohttp
    handler for good.
    """

    def __init__(
        self,
        hub: Hub,
        fallback: Callable[[], asyncio.Protocol],
        connections: set[AdminProtocol],
        max_body_size: int = MAX_BODY_SIZE,
        allow: tuple[IPv4Network | IPv6Network, ...] = (),
        throttles: dict[str, Throttle] | None = None,
    ) -> None:
        self._hub = hub
        self._fallback = fallback
        self._connections = connections
        self._max_body = max_body_size
        self._allow = allow
        # One budget per listener and kind of refusal (new_throttles): an
        # outsider hammering the port must not fill the disk.
        self._throttles = throttles
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._continued = False  # 100 Continue already sent for the current request
        self._idle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._active_at = 0.0  # loop time of the last answered request
        self._remote: object = None
        self._discard = 0  # body bytes still to drop after a 413 (lingering close)
        self._linger: asyncio.TimerHandle | None = None
        self._paused = False  # the client isn't reading: neither is this side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._remote = transport.get_extra_info("peername")
        if self._allow and not _allowed(self._remote, self._allow):
            if _refusal(self._throttles, "refused connection"):
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
        if self._linger is not None:
            self._linger.cancel()
        self._transport = None

    def close(self) -> None:
        """Close this connection (shutdown); a request being read is abandoned."""
        if self._transport is not None:
            self._transport.close()

    def _give_up(self) -> None:
        """Close; abort instead if answers wait unread, which would hold the close open."""
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _arm_idle(self) -> None:
        # One timer per connection, re-armed lazily when it fires: requests
        # only stamp _active_at, so a busy connection costs no timer churn.
        self._active_at = self._loop.time()
        self._idle = self._loop.call_at(self._active_at + KEEPALIVE_TIMEOUT, self._on_idle)

    def _on_idle(self) -> None:
        deadline = self._active_at + KEEPALIVE_TIMEOUT
        if self._loop.time() >= deadline:
            self._give_up()
        else:
            self._idle = self._loop.call_at(deadline, self._on_idle)

    def pause_writing(self) -> None:
        # The client isn't reading its answers: stop reading its requests, as
        # aiohttp does, so a pipeliner that never reads can't grow the write
        # buffer (and the server) without bound. The kernel's buffers then
        # push back on its sends.
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is None or self._transport.is_closing():
            return
        self._active_at = self._loop.time()  # the client read its answers
        self._transport.resume_reading()
        self._serve()  # requests read before the pause

    def data_received(self, data: bytes) -> None:
        if self._discard:
            self._drop(len(data))
            return
        self._buffer += data
        self._serve()

    def _serve(self) -> None:
        """Answer the complete requests in the buffer, in order, while the client reads."""
        buffer = self._buffer
        while buffer and not self._paused:
            transport = self._transport
            # A failed write (a reset) leaves the transport closing until
            # connection_lost runs: nothing more is answered or handed off.
            if transport is None or transport.is_closing():
                return
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE)
            if end < 0:
                if len(buffer) >= MAX_HEAD_SIZE or not could_be_plain_head(buffer):
                    self._hand_off()
                return
            parsed = parse_post_head(bytes(buffer[:end]))
            if parsed is None:
                self._hand_off()
                return
            target, length, expect_continue, close = parsed
            start = end + 4
            if length > self._max_body:
                self._hub.reject_post()
                if _refusal(self._throttles, "post too large"):
                    log.warning(
                        "rejected post over %d bytes from %s",
                        self._max_body,
                        format_address(self._remote),
                    )
                transport.write(_response(413, b"request body too large\n", close=True))
                self._linger_close(length - (len(buffer) - start))
                return
            if len(buffer) - start < length:
                if expect_continue and not self._continued:
                    self._continued = True
                    transport.write(_CONTINUE)
                return
            body = bytes(buffer[start : start + length])
            del buffer[: start + length]
            self._continued = False
            try:
                status, answer = accept_post(
                    self._hub, query_instance(target), body, self._remote, self._throttles
                )
            except Exception:
                # The boundary of one request, as aiohttp's is: log it, answer
                # 500 and close, rather than let the loop drop the connection
                # with no answer at all.
                log.exception("post from %s failed", format_address(self._remote))
                transport.write(_response(500, b"internal error\n", close=True))
                transport.close()
                return
            transport.write(_response(status, answer, close=close))
            if close:
                transport.close()
                return
            if not transport.get_write_buffer_size():
                # Activity is what the client takes: answers piling up in the
                # buffer don't keep a connection that never reads alive.
                self._active_at = self._loop.time()

    def _linger_close(self, unread: int) -> None:
        """Close after the 413 once the body's ``unread`` bytes are dropped (or bounds pass).

        The answer is already written; half-closing tells the client so. The
        connection stays in ``_connections``, so shutdown still closes it.
        """
        transport = self._transport
        assert transport is not None
        self._buffer.clear()
        self._discard = min(unread, LINGER_BYTES)
        if self._discard <= 0:
            transport.close()
            return
        if transport.can_write_eof():  # TLS can't half-close: the client reads by length
            transport.write_eof()
        self._linger = self._loop.call_later(LINGER_TIME, self._give_up)

    def _drop(self, size: int) -> None:
        self._discard = max(0, self._discard - size)
        if not self._discard:
            self.close()

    def _hand_off(self) -> None:
        """Give this connection, and what it sent so far, to aiohttp for good."""
        transport = self._transport
        if transport is None or transport.is_closing():
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
