"""The live status page on the admin port: ``GET /dashboard`` and ``GET /dashboard.json``.

The page (``dashboard.html``, package data, read once at import) is one
self-contained file: its CSS, its script and its chart are inline, so it
works offline, behind any proxy, with no CDN and no build step. Every second
it reads :func:`snapshot` as JSON; the rates and the 5-minute chart are
computed in the browser from successive counter readings. The server keeps no
timer, no sample and no history for it: nobody looking costs nothing, and
each reading costs one pass over the instances, as a scrape does.

A reading never writes: histories are counted as expiry would leave them
(:meth:`Hub.held`, ``History.live``), nothing is expired or created. It
names instances, peers' URLs and the broker by its display name (operator
data, as ``/status/?instance=`` and ``/metrics`` already show them to the
admin allow-list) and never a PHID or a message's contents.
"""

from __future__ import annotations

import heapq
import os
import time
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fastaphlict import __version__
from fastaphlict import hub as hub_clock
from fastaphlict.hub import Hub
from fastaphlict.peers import PeerRelay
from fastaphlict.protocol import dumps

if TYPE_CHECKING:
    from fastaphlict.broker import Broker

__all__ = ["PAGE", "TOP_INSTANCES", "add_routes", "snapshot"]

#: Instances listed by name, the ones with the most open tabs; the rest are summed.
TOP_INSTANCES = 10
#: The page, read once: a server that starts can serve it.
PAGE = files("fastaphlict").joinpath("dashboard.html").read_bytes()
#: The page runs its own inline script and reads only this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline';"
    " style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
_JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def snapshot(hub: Hub, relay: PeerRelay | None = None, broker: Broker | None = None) -> dict:
    """Everything the page shows, read from the hub, the relay and the broker; changes nothing."""
    stats = hub.stats
    now = time.monotonic()
    return {
        "version": __version__,
        "uptime": round(now - hub.started, 3),
        "tabs": hub.clients_active,
        "counters": {
            "messages_in": stats.messages_in,
            "deliveries": stats.messages_out,
            "replays": stats.replays,
            "replayed": stats.replayed,
            "slow_disconnects": stats.slow_disconnects,
            "dead_disconnects": stats.dead_disconnects,
            "rejected_frames": stats.frames_rejected,
            "rejected_posts": stats.posts_rejected,
        },
        "instances": _instances(hub),
        "peers": [] if relay is None else _peers(relay),
        "broker": None if broker is None else _broker(broker, now),
        "process": _process(),
    }


def _instances(hub: Hub) -> dict[str, Any]:
    """The :data:`TOP_INSTANCES` with the most tabs (then history), and the rest summed."""
    held = hub.held()
    top = heapq.nlargest(TOP_INSTANCES, held, key=lambda item: (item[0].channel.size, item[1]))
    now = hub_clock.now_ms()
    listed = []
    for inst, size in top:
        oldest = inst.history.live(now)[1] if size else None
        listed.append(
            {
                "name": inst.name,
                "tabs": inst.channel.size,
                "history_size": size,
                # The wall clock can step back (NTP): an age is never negative.
                "history_age": None if oldest is None else max(0, round(now - oldest)),
            }
        )
    return {
        "count": len(held),
        "top": listed,
        "other_tabs": sum(inst.channel.size for inst, _ in held) - sum(i["tabs"] for i in listed),
        "other_history": sum(size for _, size in held) - sum(i["history_size"] for i in listed),
    }


def _peers(relay: PeerRelay) -> list[dict[str, Any]]:
    out = []
    for peer in relay.peers:
        latency = peer.latency
        out.append(
            {
                "url": peer.url,
                "healthy": not peer.failing,
                "fingerprint_known": peer.fingerprint is not None,
                "sent": peer.sent,
                "failed": peer.failed,
                "dropped": peer.dropped,
                "queued": peer.queued,
                "latency_ms": round(latency.sum / latency.count * 1000, 2)
                if latency.count
                else None,
                "last_error": peer.last_error if peer.failing else None,
            }
        )
    return out


def _broker(broker: Broker, now: float) -> dict[str, Any]:
    last = broker.last_catch_up
    return {
        "display": broker.display,
        "up": broker.up,
        "nodes": len(broker.members()) + 1,  # the others seen recently, and this one
        "buffered": broker.buffered,
        "published": broker.stats.published,
        "received": broker.stats.received,
        "dropped": broker.stats.dropped,
        "reconnects": broker.stats.reconnects,
        "last_catch_up": None
        if last is None
        else {"messages": last[0], "seconds": round(last[1], 4), "ago": round(now - last[2], 1)},
    }


def _process() -> dict[str, Any]:
    """This process's resident memory (Linux; else ``None``) and CPU seconds so far."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            rss: int | None = int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        rss = None
    times = os.times()
    return {"pid": os.getpid(), "rss_bytes": rss, "cpu_seconds": round(times[0] + times[1], 3)}


def add_routes(
    app: web.Application, hub: Hub, relay: PeerRelay | None, broker: Broker | None
) -> None:
    """Serve the page and its JSON from ``app`` (the admin application, behind its allow-list)."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            body=PAGE, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS
        )

    async def reading(request: web.Request) -> web.Response:
        body = dumps(snapshot(hub, relay, broker))
        return web.Response(body=body, content_type="application/json", headers=_JSON_HEADERS)

    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard.json", reading)
