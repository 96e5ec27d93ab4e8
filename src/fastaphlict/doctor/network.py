"""Reaching a server: name resolution, a TCP connect, a TLS handshake, each bounded in time.

Each step returns its figure (what it found, how long it took) or raises
:class:`~fastaphlict.doctor.meanings.Failure` with what went wrong and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

from fastaphlict.doctor.meanings import Failure, connect_failure, tls_failure
from fastaphlict.doctor.targets import Target

__all__ = ["close", "dns", "ms", "open_to", "tcp", "tls"]


def ms(since: float) -> str:
    """The time since ``since`` (a ``time.monotonic()``), in milliseconds."""
    return f"{(time.monotonic() - since) * 1000:.1f} ms"


async def dns(target: Target, timeout: float) -> str:
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), timeout
        )
    except socket.gaierror as exc:
        raise Failure(
            f"the name {target.host} does not resolve ({exc.strerror}).",
            "check this entry's host in notification.servers, and its DNS record.",
        ) from exc
    except asyncio.TimeoutError as exc:
        raise Failure(
            f"resolving {target.host} took over {timeout:g} s.",
            "check the resolvers of this host (/etc/resolv.conf).",
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return f"{', '.join(addresses[:3])} in {ms(started)}"


async def open_to(
    target: Target, context: ssl.SSLContext | None, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``target``, through TLS with ``context`` when given.

    Happy Eyeballs (RFC 8305), as browsers connect: on a dual-stack host an
    address that does not answer (IPv6 without a route, say) holds the next
    one back 0.25 s, not the whole time limit.
    """
    return await asyncio.wait_for(
        asyncio.open_connection(
            target.host,
            target.port,
            ssl=context,
            server_hostname=target.host if context else None,
            happy_eyeballs_delay=0.25,
        ),
        timeout,
    )


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def tcp(target: Target, timeout: float) -> str:
    started = time.monotonic()
    where = f"{target.host}:{target.port}"
    try:
        _, writer = await open_to(target, None, timeout)
    except asyncio.TimeoutError as exc:
        raise Failure(*connect_failure(where, target.kind, None)) from exc
    except ConnectionRefusedError as exc:
        raise Failure(*connect_failure(where, target.kind, "connection refused")) from exc
    except OSError as exc:
        raise Failure(*connect_failure(where, target.kind, exc.strerror or str(exc))) from exc
    peer = writer.get_extra_info("peername")
    to = f" to {peer[0]}" if peer else ""
    figure = f"connected{to} in {ms(started)}"
    await close(writer)
    return figure


async def tls(target: Target, context: ssl.SSLContext, timeout: float) -> str:
    """The handshake, the chain (system CAs or ``--ca-file``) and the name, as a browser checks."""
    started = time.monotonic()
    try:
        _, writer = await open_to(target, context, timeout)
    except ssl.SSLCertVerificationError as exc:
        raise Failure(*tls_failure(target.host, exc.verify_message, str(exc))) from exc
    except ssl.SSLError as exc:
        raise Failure(*tls_failure(target.host, None, exc.reason or str(exc))) from exc
    except asyncio.TimeoutError as exc:
        raise Failure(
            f"the TLS handshake got no answer within {timeout:g} s.",
            'make the entry\'s "protocol" match what the port serves (http or https).',
        ) from exc
    except OSError as exc:
        raise Failure(*tls_failure(target.host, None, exc.strerror or str(exc))) from exc
    figure = f"handshake in {ms(started)}"
    session = writer.get_extra_info("ssl_object")
    if session is not None:
        cert = session.getpeercert() or {}
        expires = cert.get("notAfter")
        left = ""
        if isinstance(expires, str):
            days = int((ssl.cert_time_to_seconds(expires) - time.time()) // 86400)
            left = f", certificate valid {days} more days"
        figure = f"{session.version()}, chain and name verified{left}, {figure}"
    await close(writer)
    return figure
