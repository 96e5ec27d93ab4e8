"""Addresses in log lines: one format, for every room.

Apart from the hub so that the listeners, the server and socket activation
can name an address without importing the hub (or anything else of ours).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from picows import WSTransport

__all__ = ["describe", "format_address"]


def format_address(host: object, port: object = None) -> str:
    """The one address format of log lines: ``127.0.0.1:44846``, ``[::1]:44846``.

    Also takes a socket name tuple as ``host`` (IPv6 ones have four fields).
    """
    if isinstance(host, (tuple, list)) and host:
        host, port = host[0], host[1] if len(host) > 1 else None
    text = str(host)
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"
    return text if port is None else f"{text}:{port}"


def describe(transport: WSTransport) -> str:
    """The remote address of a socket, for log lines."""
    try:
        peername = transport.underlying_transport.get_extra_info("peername")
    except Exception:
        return "?"
    return format_address(peername) if peername else "?"
