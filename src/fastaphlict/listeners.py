"""Listeners: the client and admin servers of one process, opened and closed in order.

Each entry of the config is one listener on the shared hub: a picows
WebSocket server for a client entry, the admin fast path (with aiohttp behind
it) for an admin one; a socket systemd passed in is served instead of a bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from fastaphlict import admin, client, paced, systemd
from fastaphlict._protocol import protocol_factory
from fastaphlict.address import format_address
from fastaphlict.broker import Broker
from fastaphlict.config import ServerConfig, Settings
from fastaphlict.config.tls import server_context
from fastaphlict.hub import Hub
from fastaphlict.peers import PeerRelay
from fastaphlict.process import connection_cap, os_reason

__all__ = ["BACKLOG", "Listeners"]

# The listening lines have always come from the server's logger.
log = logging.getLogger("fastaphlict.server")

#: Listen backlog: a restart makes every open tab reconnect at once (the
#: kernel caps it at net.core.somaxconn; contrib/60-fastaphlict.conf raises that).
BACKLOG = 16384
_PICOWS_LOG = client.PicowsLog(logging.getLogger("picows.server"), {})


class Listeners:
    """Every listener of one server, and the ports they are bound to (in config order)."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        relay: PeerRelay,
        broker: Broker | None,
        inherited: dict[int, systemd.Inherited],
    ) -> None:
        self.config = settings.config
        self.limits = settings.limits
        self.debug = settings.debug
        self.reuse_port = settings.reuse_port
        self.hub = hub
        self.relay = relay
        self.broker = broker
        #: Sockets systemd passed in, by index in ``config.servers``; served instead of binding.
        self.inherited = inherited
        self.client_ports: list[int] = []
        self.admin_ports: list[int] = []
        self.client_servers: list[asyncio.AbstractServer] = []
        self.admin_runners: list[web.AppRunner] = []
        self.admin_servers: list[asyncio.AbstractServer] = []
        self.admin_connections: set[admin.AdminProtocol] = set()

    async def open(self) -> None:
        """Open every listener of the config; raise naming the entry that failed."""
        for index, entry in enumerate(self.config.servers):
            try:
                if entry.type == "client":
                    await self._open_client(entry)
                else:
                    await self._open_admin(entry)
            except OSError as exc:
                # Name the entry: "address in use" alone doesn't say which port.
                raise OSError(
                    f'{entry.type} server (at index "{index}") cannot listen on '
                    f"{format_address(entry.listen, entry.port)}: {os_reason(exc)}"
                ) from exc

    def stop_accepting(self) -> None:
        for server in (*self.client_servers, *self.admin_servers):
            server.close()

    async def close_admin(self) -> None:
        """End the admin connections; in-flight aiohttp requests get their shutdown timeout."""
        for connection in list(self.admin_connections):
            connection.close()  # fast-path requests finish synchronously: none is in flight
        for runner in self.admin_runners:
            await runner.cleanup()

    async def wait_closed(self) -> None:
        for server in self.client_servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _open_client(self, entry: ServerConfig) -> None:
        where = self._where(entry)
        # Our own picows protocol: picows' ws_create_server builds one whose
        # set-up makes eight system calls per connection (fastaphlict._protocol).
        factory = protocol_factory(
            client.listener_factory(
                self.hub,
                client.Options(self.debug, self.limits, connection_cap(self.limits)),
            ),
            # An adapter, not a Logger: picows would build a child Logger per
            # connection from a Logger.
            _PICOWS_LOG,
            self.limits.handshake_timeout,
            # Oversized frames are closed with 1009 by picows itself.
            self.limits.max_frame_size,
        )
        context = server_context(entry)
        server: asyncio.AbstractServer
        if context is None:
            # On uvloop's own transports (lighter per idle socket than aiofastnet).
            server = await asyncio.get_running_loop().create_server(
                factory,
                # After a restart every open tab reconnects at once.
                backlog=BACKLOG,
                **where,
            )
        else:
            # A TLS handshake costs ~0.25-0.7 ms of the loop: accepted a few
            # at a time, so that a storm's handshakes do not stall the tabs.
            server = await paced.serve(
                factory,
                context,
                backlog=BACKLOG,
                # The TLS handshake gets the WebSocket handshake's limit, once
                # more: a socket that never sends a ClientHello is dropped too.
                handshake_timeout=self.limits.handshake_timeout,
                **where,
            )
        self.client_servers.append(server)
        port = server.sockets[0].getsockname()[1]
        self.client_ports.append(port)
        log.info(
            "client server listening on %s%s%s",
            format_address(entry.listen, port),
            " (tls)" if entry.tls else "",
            self._shared(entry),
        )

    async def _open_admin(self, entry: ServerConfig) -> None:
        throttles = admin.new_throttles()
        runner = web.AppRunner(
            admin.make_app(
                self.hub,
                relay=self.relay,
                broker=self.broker,
                max_body_size=self.limits.max_body_size,
                throttles=throttles,
            ),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.limits.shutdown_timeout / 2,
            # A malformed request is a client's doing: within a budget, not a traceback.
            logger=admin.AiohttpLog(logging.getLogger("aiohttp.server"), throttles["bad request"]),
            # aiohttp reads and drops a body its handler left unread (a 404,
            # a 405): no longer than the fast path lingers after a 413.
            lingering_time=admin.LINGER_TIME,
        )
        await runner.setup()
        self.admin_runners.append(runner)
        fallback = runner.server
        assert fallback is not None
        allow = self.limits.admin_networks()
        where = self._where(entry)
        server = await asyncio.get_running_loop().create_server(
            lambda: admin.AdminProtocol(
                self.hub,
                fallback,
                self.admin_connections,
                max_body_size=self.limits.max_body_size,
                allow=allow,
                throttles=throttles,
            ),
            ssl=server_context(entry),
            backlog=BACKLOG,
            **where,
        )
        self.admin_servers.append(server)
        port = server.sockets[0].getsockname()[1]
        self.admin_ports.append(port)
        refused = admin.refused_loopback(entry.listen, allow)
        if refused:
            log.warning(
                "--admin-allow=%s refuses %s: health checks and a Phorge on this host"
                " get 403 from the admin server on %s",
                ",".join(self.limits.admin_allow),
                " and ".join(refused),
                format_address(entry.listen, port),
            )
        log.info(
            "admin server listening on %s%s%s",
            format_address(entry.listen, port),
            " (tls)" if entry.tls else "",
            self._shared(entry),
        )

    def _where(self, entry: ServerConfig) -> dict[str, Any]:
        """Where a listener accepts: systemd's inherited socket for it, or a bind.

        An inherited socket is served as it is: its address was systemd's
        choice, so the config's ``listen`` is only compared, for the log.
        Closing our listener later closes only this process's copy; systemd's
        stays open, and with it the backlog the next process will serve.
        """
        inherited = self.inherited.get(self.config.servers.index(entry))
        if inherited is None:
            return {
                "host": entry.listen,
                "port": entry.port,
                "reuse_address": True,
                "reuse_port": self.reuse_port,
            }
        log.info("%s server uses inherited socket %s", entry.type, inherited.describe())
        if self.reuse_port:
            # systemd made the socket; its options are the socket unit's (ReusePort=).
            log.info("--reuse-port does not apply to inherited socket %s", inherited.describe())
        if entry.listen != inherited.host:
            log.info(
                "the config's listen address %s does not apply to inherited socket %s",
                entry.listen,
                inherited.describe(),
            )
        return {"sock": inherited.sock}

    def _shared(self, entry: ServerConfig) -> str:
        """The listening line's note that other processes may accept on this port too."""
        if self.reuse_port and self.config.servers.index(entry) not in self.inherited:
            return " (shared port, SO_REUSEPORT)"
        return ""
