"""The admin port: where Phorge's PHP posts messages and reads status (aiohttp).

Phorge posts the raw JSON body with curl's default form content type, so the
body is JSON whatever the ``Content-Type`` says: it is never parsed as a form.
PHP only looks at status codes and gives up after 2 s, so every answer here is
immediate; relaying to peers happens behind the hub, asynchronously.

This module only translates HTTP to hub calls; it never touches sockets.
"""

from __future__ import annotations

import logging

from aiohttp import web

from fastaphlict.hub import DEFAULT_INSTANCE, Hub, dumps, loads

__all__ = ["MAX_BODY_SIZE", "make_app"]

log = logging.getLogger("fastaphlict.admin")

#: Largest accepted post body; bigger posts get 413, like Aphlict.
MAX_BODY_SIZE = 2 * 1024 * 1024

HUB_KEY: web.AppKey[Hub] = web.AppKey("hub", Hub)


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
        log.warning("rejected post over %d bytes from %s", MAX_BODY_SIZE, request.remote)
        return _text(413, "request body too large")
    try:
        message = loads(body)
    except (ValueError, RecursionError):
        log.info("rejected post from %s: body is not JSON", request.remote)
        return _text(400, "body must be a JSON object")
    if not isinstance(message, dict):
        log.info("rejected post from %s: body is JSON but not an object", request.remote)
        return _text(400, "body must be a JSON object")
    hub.publish(_instance(request), message)
    return web.Response(body=hub.receipt, content_type="application/json")


async def handle_status(request: web.Request) -> web.Response:
    """``GET``/``HEAD /status/``: Aphlict's flat status object for one instance."""
    status = request.app[HUB_KEY].status(_instance(request))
    return web.Response(body=dumps(status), content_type="application/json")


async def handle_healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness for containers and load balancers."""
    return web.Response(text="ok\n")


def make_app(hub: Hub, *, max_body_size: int = MAX_BODY_SIZE) -> web.Application:
    """The admin application. ``/status`` without its slash is a 404, as in Aphlict."""
    app = web.Application(client_max_size=max_body_size)
    app[HUB_KEY] = hub
    app.router.add_route("*", "/", handle_root)
    app.router.add_get("/status/", handle_status)
    app.router.add_get("/healthz", handle_healthz)
    return app
