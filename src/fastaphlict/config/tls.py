"""TLS contexts: the TLS files the config names, loaded for listeners and https peers.

Aphlict turns TLS on for a server entry that sets ``ssl.key`` and
``ssl.cert``, appending ``ssl.chain`` to the certificate, so ``wss://`` works
without a proxy in front. Relays to ``"protocol": "https"`` peers verify the
peer's certificate, against the system's CAs or a CA file the operator names.

:func:`~fastaphlict.config.preflight.preflight` loads every one of them
before anything starts (``--test`` and start alike), so a bad key or a
certificate that does not match it fails early with the entry named; the
server then loads its own from the same files.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from fastaphlict.config.aphlict import ServerConfig
from fastaphlict.config.errors import ConfigError

__all__ = ["client_context", "server_context"]


def server_context(server: ServerConfig, index: int | None = None) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when the entry has no ``ssl.key``/``ssl.cert``.

    ``load_cert_chain`` wants one PEM file, leaf first then its chain, so
    with ``ssl.chain`` both are joined in a private temporary file that
    exists only while loading. Raises :class:`ConfigError` naming the entry.
    """
    if not server.tls:
        return None
    assert server.ssl_cert is not None and server.ssl_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        if server.ssl_chain:
            with open(server.ssl_cert, "rb") as cert, open(server.ssl_chain, "rb") as chain:
                combined = cert.read().rstrip(b"\n") + b"\n" + chain.read()
            fd, path = tempfile.mkstemp(suffix=".pem")
            try:
                with os.fdopen(fd, "wb") as tmp:
                    tmp.write(combined)
                ctx.load_cert_chain(path, server.ssl_key)
            finally:
                os.unlink(path)
        else:
            ctx.load_cert_chain(server.ssl_cert, server.ssl_key)
    except (OSError, ssl.SSLError) as exc:
        where = (
            f'Server (at index "{index}", on port "{server.port}")'
            if index is not None
            else (f'Server on port "{server.port}"')
        )
        raise ConfigError(
            f"{where} has a TLS key, certificate or chain that can not be loaded: {exc}."
        ) from exc
    return ctx


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The context relays use for https peers: verification on, system CAs or ``ca_file``."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f'Peer CA file "{ca_file}" can not be loaded: {exc}.') from exc
