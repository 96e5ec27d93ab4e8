"""The browser's WebSocket opening handshake, sent and read by hand.

A WebSocket library would only say "the handshake failed"; the doctor must
say what came back instead of 101 (a page, a 404, a 501 from a server that
never saw ``Upgrade``) and what that means, so it writes the request itself
and reads the status line, the headers and the start of the body. After a
101 it checks ``Sec-WebSocket-Accept`` and hangs up: the session itself goes
through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from dataclasses import dataclass

from fastaphlict.doctor.meanings import NGINX_SECTION, Failure
from fastaphlict.doctor.targets import Target

__all__ = ["Answer", "accept_for", "handshake", "parse_head", "request_for"]

#: RFC 6455's GUID for ``Sec-WebSocket-Accept``.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class Answer:
    code: int
    headers: dict[str, str]  # names in lower case
    body: bytes  # its first 2 KiB, when not 101

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").lower()


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()


def request_for(target: Target, key: str, origin: str | None) -> bytes:
    """What a browser sends to open ``target``: its path and query, its Host, its Origin."""
    default = 443 if target.secure else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != default:
        host += f":{target.port}"
    return (
        f"GET {target.path} HTTP/1.1\r\nHost: {host}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Origin: {origin}\r\n" if origin else "")
        + "\r\n"
    ).encode()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status code and headers of an HTTP response head; Failure if it is not HTTP."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        code = int(parts[1])
    except (IndexError, ValueError):
        raise Failure(
            f"not an HTTP answer: {lines[0][:80]!r}.",
            "check that this port serves HTTP (and TLS when the entry says https).",
        ) from None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return code, headers


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: Target,
    origin: str | None,
    timeout: float,
) -> Answer:
    """Send the upgrade, read the answer; Failure for no answer or a 101 with a wrong accept."""
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(request_for(target, key, origin))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.TimeoutError as exc:
        raise Failure(
            f"the upgrade request got no answer within {timeout:g} s: something accepts "
            "connections here but does not answer (a hung server, or a proxy waiting on its "
            "upstream).",
            f"check what listens on {target.host}:{target.port} (curl -i {target.http_url}).",
        ) from exc
    except asyncio.LimitOverrunError as exc:
        raise Failure(
            "the answer to the upgrade has over 64 KiB of headers; browsers and proxies "
            "refuse such an answer.",
            f"check what answers on {target.host}:{target.port} (curl -i {target.http_url}).",
        ) from exc
    except (asyncio.IncompleteReadError, OSError) as exc:
        raise Failure(
            f"the connection closed before an HTTP answer to the upgrade ({exc}).",
            "check that this port serves HTTP (and TLS when the entry says https).",
        ) from exc
    code, headers = parse_head(head)
    if code == 101:
        if headers.get("sec-websocket-accept") != accept_for(key):
            raise Failure(
                "101 without the right Sec-WebSocket-Accept: browsers drop this socket.",
                f"check the proxy in front of the server ({NGINX_SECTION}).",
            )
        return Answer(code, headers, b"")
    body = b""
    with contextlib.suppress(asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
        body = await asyncio.wait_for(reader.read(2048), min(1.0, timeout))
    return Answer(code, headers, body)
