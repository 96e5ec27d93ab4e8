"""An open WebSocket, read as JX.Aphlict reads it: frames until the one awaited, or a cut.

The session goes through aiohttp's client (answering the server's pings as a
browser does, sending none of its own). Every read is bounded; a socket
that closes is a failure with its own sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from fastaphlict.doctor.meanings import NGINX_SECTION, Failure, idle_cut

__all__ = ["ENDED", "PING", "PONG", "hold_idle", "key_of", "until"]

PING = '{"command":"ping","data":null}'
PONG = '{"type":"pong"}'
#: What aiohttp hands back when the socket is gone.
ENDED = (
    aiohttp.WSMsgType.CLOSE,
    aiohttp.WSMsgType.CLOSING,
    aiohttp.WSMsgType.CLOSED,
    aiohttp.WSMsgType.ERROR,
)


def key_of(frame: str) -> Any:
    """The ``key`` of a delivered message, or None."""
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(frame).get("key")
    return None


async def until(
    ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[str], bool], what: str, timeout: float
) -> list[str]:
    """The text frames up to and including the one ``wanted``; Failure after ``timeout``."""
    frames: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            message = await ws.receive(timeout=max(left, 0.001))
        except asyncio.TimeoutError as exc:
            raise Failure(
                f"no {what} within {timeout:g} s.",
                "check the server's log; a proxy may be buffering the socket.",
            ) from exc
        if message.type == aiohttp.WSMsgType.TEXT:
            frames.append(message.data)
            if wanted(message.data):
                return frames
        elif message.type in ENDED:
            raise Failure(
                f"the socket closed while waiting for {what}.",
                f"check the server's log and the proxy ({NGINX_SECTION}).",
            )


async def hold_idle(ws: aiohttp.ClientWebSocketResponse, seconds: float, timeout: float) -> str:
    """Send nothing for ``seconds``; then a ping must still get its pong.

    What cuts a quiet socket (nginx's ``proxy_read_timeout``, a load
    balancer's idle timeout) closes it meanwhile: the failure says after how long.
    """
    started = time.monotonic()
    deadline = started + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if message.type in ENDED:
            raise Failure(*idle_cut(time.monotonic() - started))
    await ws.send_str(PING)
    await until(ws, lambda frame: frame == PONG, "pong after the idle time", timeout)
    return f"held {seconds:g} s idle, still answers"
