"""Lifecycle: build the hub, open every configured listener, run, shut down.

This is the only module that installs signal handlers or starts the event
loop. One :class:`Server` owns one hub shared by all its client and admin
listeners and by the peer relay; tests run it in-process on port 0 and read
the bound ports back from :attr:`Server.client_ports` / :attr:`Server.admin_ports`.

Shutdown order matters for browsers and for Phorge: stop accepting, tell every
WebSocket "going away" (1001) so browsers reconnect at once, let in-flight
admin requests finish, give peer queues and the broker's buffer a short
deadline; what the broker could not publish is kept in the state directory
for the next start (first: it can be recovered from nowhere else), or
counted as dropped; then the histories are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from picows import ws_create_server

from fastaphlict import admin, client, state, systemd
from fastaphlict.address import format_address
from fastaphlict.broker import Broker
from fastaphlict.config import (
    BrokerConfig,
    Config,
    ConfigError,
    Limits,
    ServerConfig,
    unsafe_directory,
)
from fastaphlict.hub import Hub
from fastaphlict.peers import PeerRelay, new_fingerprint
from fastaphlict.tls import client_context, server_context

__all__ = ["Limits", "Server", "run"]

log = logging.getLogger("fastaphlict.server")


#: Listen backlog: a restart makes every open tab reconnect at once.
BACKLOG = 4096
#: Seconds between rounds that expire idle histories and drop empty instances.
EXPIRE_INTERVAL = 5.0
#: Items (sockets, instances) handled per slice of periodic work before the
#: loop gets control back: a few milliseconds at most, with 15000 sockets.
HOUSEKEEPING_BATCH = 500
#: Seconds between two summary lines at info (connections, traffic, disconnects).
SUMMARY_INTERVAL = 300.0
#: Hub counters the summary line reports, as (attribute, words).
_SUMMARY_COUNTERS = (
    ("messages_in", "message(s) in"),
    ("messages_out", "deliveries"),
    ("replays", "replay(s)"),
    ("slow_disconnects", "slow disconnect(s)"),
    ("dead_disconnects", "dead disconnect(s)"),
    ("frames_rejected", "frame(s) rejected"),
    ("posts_rejected", "post(s) rejected"),
)
#: Seconds between two notes in the state directory that the broker is in sync.
ALIVE_INTERVAL = 5.0
#: Milliseconds the note is set back: a message other nodes accepted just
#: before it may still be on its way here (the merge skips what was had).
ALIVE_MARGIN_MS = 2000.0
#: Initial picows read buffer per socket (picows never goes below 2 KiB).
READ_BUFFER_SIZE = 2048
_PICOWS_LOG = client.PicowsLog(logging.getLogger("picows.server"), {})


class Server:
    """Everything one fastaphlict process serves, started and stopped as a unit."""

    def __init__(
        self,
        config: Config,
        *,
        debug: bool = False,
        reuse_port: bool = False,
        limits: Limits | None = None,
        peer_ca_file: str | None = None,
        state_dir: str | None = None,
        inherited: dict[int, systemd.Inherited] | None = None,
        broker: BrokerConfig | None = None,
        broker_ca_file: str | None = None,
    ):
        self.config = config
        #: Sockets systemd passed in, by index in ``config.servers``; served instead of binding.
        self.inherited = inherited or {}
        self.debug = debug
        #: Bind with SO_REUSEPORT: other processes of this user may serve the same ports.
        self.reuse_port = reuse_port
        self.limits = limits or Limits()
        self.fingerprint = new_fingerprint()
        self.hub = Hub(
            self.fingerprint,
            debug=debug,
            max_subscriptions=self.limits.max_subscriptions,
            max_phid_length=self.limits.max_phid_length,
            max_instance_length=self.limits.max_instance_length,
            max_buffered=self.limits.max_buffered,
            max_subscribers=self.limits.max_subscribers,
        )
        self.relay = PeerRelay(
            config.cluster,
            timeout=self.limits.relay_timeout,
            queue_limit=self.limits.relay_queue,
            ssl_context=client_context(peer_ca_file) if peer_ca_file else None,
        )
        self.hub.add_relay(self.relay)
        self.broker: Broker | None = None
        if broker is not None:
            self.broker = Broker(
                self.hub,
                broker,
                timeout=self.limits.broker_timeout,
                buffer_limit=self.limits.broker_buffer,
                buffer_bytes=self.limits.broker_buffer_bytes,
                probe_interval=self.limits.broker_probe_interval,
                ca_file=broker_ca_file,
            )
            self.hub.add_relay(self.broker)
            self.hub.join_cluster(self.broker.is_member)
            self.relay.join_cluster(self.broker.members)
        self.client_ports: list[int] = []
        self.admin_ports: list[int] = []
        self._client_servers: list[asyncio.AbstractServer] = []
        self._admin_runners: list[web.AppRunner] = []
        self._admin_servers: list[asyncio.AbstractServer] = []
        self._admin_connections: set[admin.AdminProtocol] = set()
        self._stopped = asyncio.Event()
        self._closing = False
        self._periodic: list[asyncio.Future[None]] = []
        self.state_dir = state_dir
        # Set once start() has finished: a start that failed (a port in use,
        # say) must not overwrite the saved histories.
        self._save_state = self._save_pending = False
        self._pending_kept = False
        #: The state directory's lock, held for the process's life.
        self._lock_fd: int | None = None
        #: When the stop began, if the broker was in sync then (for the alive note).
        self._in_sync_at: float | None = None

    async def start(self) -> None:
        """Bind every listener; raise (and close what was opened) if one fails."""
        log.info("fingerprint %s", self.fingerprint)
        if self.reuse_port:
            log.info(
                "--reuse-port: client and admin ports are shared (SO_REUSEPORT) with other"
                " fastaphlict processes; the kernel spreads connections over them"
            )
        try:
            # Before any listener: a tab's first replay must find the history.
            self._load_state()
            if self.broker is not None:
                if self.state_dir is not None:
                    self._restore_pending()
                # Warmed from Redis (or given up on) before any tab can replay.
                await self.broker.start()
            await self.relay.start()
            for index, entry in enumerate(self.config.servers):
                try:
                    if entry.type == "client":
                        await self._start_client(entry)
                    else:
                        await self._start_admin(entry)
                except OSError as exc:
                    # Name the entry: "address in use" alone doesn't say which port.
                    raise OSError(
                        f'{entry.type} server (at index "{index}") cannot listen on '
                        f"{format_address(entry.listen, entry.port)}: {_reason(exc)}"
                    ) from exc
            if self.limits.ping_interval > 0:
                self._periodic.append(
                    asyncio.ensure_future(self._housekeeping(self.limits.ping_interval, sweep=True))
                )
            self._periodic.append(
                asyncio.ensure_future(self._housekeeping(EXPIRE_INTERVAL, expire=True))
            )
            self._periodic.append(asyncio.ensure_future(self._summaries(SUMMARY_INTERVAL)))
            if self.broker is not None and self.state_dir is not None:
                self._periodic.append(asyncio.ensure_future(self._note_alive(ALIVE_INTERVAL)))
            self._save_state = self._save_pending = self.state_dir is not None
        except BaseException:
            await self.close()
            raise

    async def _start_client(self, entry: ServerConfig) -> None:
        where = self._where(entry)
        server = await ws_create_server(
            client.listener_factory(
                self.hub,
                client.Options(self.debug, self.limits, _connection_cap(self.limits)),
            ),
            ssl=server_context(entry),
            websocket_handshake_timeout=self.limits.handshake_timeout,
            # Oversized frames are closed with 1009 by picows itself.
            max_frame_size=self.limits.max_frame_size,
            # The listener answers pings itself, once it has checked the frame.
            enable_auto_pong=False,
            # An adapter, not a Logger: picows builds a child Logger for every
            # connection when given a Logger, a cost paid by every idle tab.
            logger_name=_PICOWS_LOG,
            # picows' default 16 KiB read buffer per socket dominates an idle
            # tab's memory; commands are tiny, and the buffer grows on demand.
            read_buffer_init_size=READ_BUFFER_SIZE,
            # uvloop's own transports: lighter per idle socket than aiofastnet.
            use_aiofastnet=False,
            # After a restart every open tab reconnects at once.
            backlog=BACKLOG,
            **where,
        )
        self._client_servers.append(server)
        port = server.sockets[0].getsockname()[1]
        self.client_ports.append(port)
        log.info(
            "client server listening on %s%s%s",
            format_address(entry.listen, port),
            " (tls)" if entry.tls else "",
            self._shared(entry),
        )

    async def _start_admin(self, entry: ServerConfig) -> None:
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
        self._admin_runners.append(runner)
        fallback = runner.server
        assert fallback is not None
        allow = self.limits.admin_networks()
        where = self._where(entry)
        server = await asyncio.get_running_loop().create_server(
            lambda: admin.AdminProtocol(
                self.hub,
                fallback,
                self._admin_connections,
                max_body_size=self.limits.max_body_size,
                allow=allow,
                throttles=throttles,
            ),
            ssl=server_context(entry),
            backlog=BACKLOG,
            **where,
        )
        self._admin_servers.append(server)
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

    async def _housekeeping(
        self, interval: float, *, sweep: bool = False, expire: bool = False
    ) -> None:
        """Every ``interval``: ping quiet sockets (``sweep``) or expire histories (``expire``).

        The hub hands the work over in slices; the loop serves everyone else
        between two of them.
        """
        while True:
            await asyncio.sleep(interval)
            dead = 0
            try:
                for found in self.hub.housekeeping(HOUSEKEEPING_BATCH, sweep=sweep, expire=expire):
                    dead += found
                    await asyncio.sleep(0)
            except Exception:  # a boundary: housekeeping must outlive any bug
                log.exception("periodic %s failed", "ping sweep" if sweep else "expiry")
            if dead:
                log.info("closed %d socket(s) that stopped answering pings", dead)

    async def _summaries(self, interval: float) -> None:
        """Every ``interval``, one info line of what happened since the last one.

        The per-connection lines are at debug; this is what an operator reads
        at the default level to see the server is alive and busy.
        """
        hub = self.hub
        last = [getattr(hub.stats, name) for name, _ in _SUMMARY_COUNTERS]
        while True:
            await asyncio.sleep(interval)
            now = [getattr(hub.stats, name) for name, _ in _SUMMARY_COUNTERS]
            parts = [
                f"{new - old} {words}"
                for (_, words), new, old in zip(_SUMMARY_COUNTERS, now, last, strict=True)
            ]
            log.info(
                "last %.0fs: %d socket(s) open, %s", interval, hub.clients_active, ", ".join(parts)
            )
            last = now

    def _load_state(self) -> None:
        """Lock the state directory (creating it if missing) and load its histories."""
        if self.state_dir is None:
            return
        try:
            state.check_writable(self.state_dir)
        except OSError as exc:
            raise OSError(
                f'state directory "{self.state_dir}" can not be written: {_reason(exc)}'
            ) from exc
        # Before anything is read: a sibling's files are not ours to take.
        self._lock_fd = state.lock(self.state_dir)
        alive = state.read_alive(self.state_dir)
        if alive is not None and self.broker is not None:
            # A clock that ran ahead then must not hide what came since.
            self.broker.deliver_from(min(alive, time.time() * 1000))
        instances = entries = 0
        for name, saved in state.read_dir(self.state_dir):
            loaded = self.hub.import_state(name, saved)
            instances += loaded > 0
            entries += loaded
        log.info(
            "state: loaded %d message(s) of %d instance(s) from %s",
            entries,
            instances,
            self.state_dir,
        )

    def _restore_pending(self) -> None:
        """Queue what the previous process could not publish; its file goes once Redis has it.

        Until then the file stays: a crash, an OOM kill or a stop during the
        start wait finds them again (Redis refuses a message it already has).
        """
        assert self.broker is not None and self.state_dir is not None
        pending = state.read_pending(self.state_dir)
        self.broker.on_restored = self._pending_published
        if not self.broker.restore(pending) and pending:
            self._pending_published()  # all past the window: nothing left to keep
        # From here the stop writes what is left (none: the file goes).
        self._save_pending = True

    def _pending_published(self) -> None:
        """Every restored message is in Redis (or dropped): the saved file has done its job."""
        if self._closing or self.state_dir is None:
            return  # the stop writes what is left
        try:
            state.remove_pending(self.state_dir)
        except OSError as exc:
            log.error("cannot remove %s: %s", state.PENDING_FILE, _reason(exc))

    async def _note_alive(self, interval: float) -> None:
        """While the broker is in sync, note the time: what a killed process had delivered.

        The next start delivers what other nodes accepted after it (see
        :meth:`Broker.deliver_from`); a node out of sync notes nothing, so
        what it missed counts as missed.
        """
        while True:
            self._write_alive(durable=False)
            await asyncio.sleep(interval)

    def _write_alive(self, *, durable: bool, at: float | None = None) -> None:
        """Note ``at`` (default now, if the broker is in sync) in the state directory."""
        if self.broker is None or self.state_dir is None:
            return
        if at is None:
            if not self.broker.up:
                return
            at = time.time() * 1000
        try:
            state.write_alive(self.state_dir, at - ALIVE_MARGIN_MS, durable=durable)
        except OSError as exc:
            log.error("cannot write state to %s: %s", self.state_dir, _reason(exc))

    def write_state(self) -> None:
        """Write every history to the state directory, once; a failure is one error line."""
        if not self._save_state or self.state_dir is None:
            return
        self._save_state = False
        try:
            histories = self.hub.export_state()
            written = state.write_dir(self.state_dir, histories)
        except OSError as exc:
            log.error("cannot write state to %s: %s", self.state_dir, _reason(exc))
            return
        except Exception:  # a boundary: the stop must go on to its end
            log.exception("cannot write state to %s", self.state_dir)
            return
        if self._in_sync_at is not None:
            self._write_alive(durable=True, at=self._in_sync_at)
        log.info(
            "state: wrote %d message(s) of %d instance(s) to %s",
            written,
            len(histories),
            self.state_dir,
        )

    def keep_pending(self, pending: list[state.Pending]) -> None:
        """What the broker could not publish: to the state directory, or counted dropped."""
        if self.broker is None or self._pending_kept:
            return
        self._pending_kept = True
        if self.state_dir is not None and self._save_pending:
            try:
                # None left: every restored message is published, the file goes.
                state.write_pending(self.state_dir, pending)
            except Exception as exc:  # a boundary: the stop must go on to its end
                log.error("cannot write state to %s: %s", self.state_dir, exc)
            else:
                if pending:
                    log.warning(
                        "broker: %d unpublished message(s) kept in %s for the next start",
                        len(pending),
                        self.state_dir,
                    )
                return
        if not pending:
            return
        self.broker.drop_unsaved(len(pending))
        log.warning(
            "broker: %d unpublished message(s) dropped at stop (no state directory to keep them);"
            " other nodes' tabs miss them",
            len(pending),
        )

    def status_line(self) -> str:
        """The one-line summary ``systemctl status`` shows while serving."""
        clients = ", ".join(map(str, self.client_ports))
        admins = ", ".join(map(str, self.admin_ports))
        return f"serving clients on port(s) {clients}, admin on {admins}"

    async def close(self) -> None:
        """Stop accepting, say 1001 to every socket, drain admin and peers. Idempotent."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        for task in self._periodic:
            task.cancel()
        for server in (*self._client_servers, *self._admin_servers):
            server.close()
        closed = client.close_all(self.hub)
        if closed:
            log.info("sent going-away to %d socket(s)", closed)
        for connection in list(self._admin_connections):
            connection.close()  # fast-path requests finish synchronously: none is in flight
        for runner in self._admin_runners:
            await runner.cleanup()
        drain = self.limits.relay_drain_timeout
        if self.broker is not None:
            if self.broker.up:
                self._in_sync_at = time.time() * 1000
            _, left = await asyncio.gather(
                self.relay.close(timeout=drain), self.broker.close(drain)
            )
            # First: unpublished messages can be recovered from nowhere else.
            self.keep_pending(left)
        else:
            await self.relay.close(timeout=drain)
        # Every accepted post is in the history now; peers' queues are not ours to keep.
        self.write_state()
        # Give close frames a moment to flush, then drop what is left.
        await asyncio.sleep(0)
        for inst in self.hub.instances():
            for sub in inst.channel.subscribers():
                sub.transport.disconnect()
        for server in self._client_servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._stopped.set()

    async def serve(self, *, on_reload: Callable[[], None] | None = None) -> None:
        """Start, then run until SIGTERM or SIGINT (production entry).

        The first signal drains (see :meth:`close`), bounded by
        ``limits.shutdown_timeout``; a second one stops waiting at once.
        SIGHUP calls ``on_reload`` (the CLI reopens log files there, for
        logrotate).
        """
        # Handlers first: a signal during start-up must not kill the process
        # with its default action (SIGHUP's is to terminate).
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        force = asyncio.Event()
        signals = [signal.SIGTERM, signal.SIGINT]

        def on_stop_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
                force.set()
            stop.set()

        for sig in signals:
            loop.add_signal_handler(sig, on_stop_signal, sig)
        if on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload, on_reload)
            signals.append(signal.SIGHUP)
        pidfile = PidFile(self.config.pidfile) if self.config.pidfile else None
        try:
            try:
                if pidfile is not None:
                    pidfile.check()
                await self.start()
                if pidfile is not None:
                    pidfile.write()
            except BaseException:
                # Close the listeners and the relay's HTTP session, or asyncio
                # adds an "Unclosed client session" error to our one line.
                await self.close()
                raise
            _tune_gc()
            log.info("ready")
            systemd.notify(f"READY=1\nSTATUS={self.status_line()}")
            await stop.wait()
            systemd.notify("STOPPING=1\nSTATUS=shutting down")
            log.info("shutting down (up to %.1fs)", self.limits.shutdown_timeout)
            closing = asyncio.ensure_future(self.close())
            forced = asyncio.ensure_future(force.wait())
            done, _ = await asyncio.wait(
                {closing, forced},
                timeout=self.limits.shutdown_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            forced.cancel()
            if closing not in done:
                closing.cancel()
                # A second signal or the deadline skips the waits, not the state.
                if self.broker is not None:
                    self.keep_pending(self.broker.abandon())
                self.write_state()
                log.warning("shutdown did not finish in time; exiting anyway")
            else:
                log.info("stopped")
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if pidfile is not None:
                pidfile.remove()


def _connection_cap(limits: Limits) -> int:
    """The configured cap, or the open-file limit less a reserve for logs and peers."""
    if limits.max_connections:
        return limits.max_connections
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(soft - 256, 64)


def _tune_gc() -> None:
    """Keep the cyclic GC off the hot path.

    Everything built at start-up is frozen out of collections, and the young
    generation is collected every 50000 allocations instead of 700: a publish
    allocates a few dozen short-lived, acyclic objects, and the default turned
    that into a collection every few messages (about 2% of server CPU in the
    targeted benchmark's profile).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(50_000, second, third)


def _reload(on_reload: Callable[[], None]) -> None:
    try:
        on_reload()
        log.info("SIGHUP: log files reopened")
    except Exception:
        log.exception("SIGHUP: reopening log files failed")


class PidFile:
    """Aphlict's pidfile, without its classic traps.

    A pidfile left behind by a crash or a reboot used to block Aphlict from
    starting. Here a pidfile whose process is gone, or is not an Aphlict or
    a fastaphlict (after a reboot the number may belong to anything), is
    replaced with a warning; only a live server refuses the start.

    Phorge's default place, ``/var/tmp/aphlict/pid/``, may have been made
    first by any local user: a directory another user owns (or may write,
    without the sticky bit) is refused, and the file is written through a
    new temporary file that is never an existing one nor a symlink.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def check(self) -> None:
        """Raise :class:`PidFileError` if a live server owns the pidfile, or it is unsafe."""
        problem = unsafe_directory(os.path.dirname(os.path.abspath(self.path)))
        if problem:
            raise PidFileError(f"refusing pidfile {self.path}: {problem}")
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PidFileError(f"cannot read pidfile {self.path}: {exc.strerror}") from exc
        pid = int(text) if text.isdigit() else 0
        if pid and pid != os.getpid() and _is_server(pid):
            raise PidFileError(
                f"pidfile {self.path} names process {pid}, which is still running: "
                "is another fastaphlict using this config? Stop it first, or give each"
                " process its own --pidfile."
            )
        log.warning(
            "replacing stale pidfile %s (process %s is gone or is not aphlict nor fastaphlict)",
            self.path,
            text or "?",
        )

    def write(self) -> None:
        """Write our pid atomically (creating the directory), never through a symlink."""
        directory = os.path.dirname(os.path.abspath(self.path))
        problem = unsafe_directory(directory)
        if problem:
            raise PidFileError(f"refusing pidfile {self.path}: {problem}")
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(  # O_CREAT | O_EXCL | O_NOFOLLOW, a random name
                prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
            )
        except OSError as exc:
            raise PidFileError(f"cannot write pidfile {self.path}: {_reason(exc)}") from exc
        try:
            with open(fd, "w") as f:
                os.fchmod(fd, 0o644)  # readable by the tools that read it, as Aphlict's
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, self.path)  # replaces a symlink there, never its target
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidFileError(f"cannot write pidfile {self.path}: {_reason(exc)}") from exc

    def remove(self) -> None:
        """Remove the pidfile if it is still ours."""
        try:
            with open(self.path) as f:
                if f.read().strip() != str(os.getpid()):
                    return
            os.unlink(self.path)
        except OSError:
            pass


class PidFileError(OSError):
    """The pidfile cannot be used: a live server owns it, or it cannot be written safely."""


def _is_server(pid: int) -> bool:
    """Whether ``pid`` is alive and an Aphlict or a fastaphlict (see :func:`is_server_command`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # alive and unreadable: assume the worst, refuse
    return is_server_command(cmdline.rstrip(b"\0").split(b"\0"))


def is_server_command(argv: list[bytes]) -> bool:
    """Whether a command line is Aphlict (node running ``aphlict_server.js``) or fastaphlict.

    Not any command that merely mentions aphlict (``tail -f aphlict.log``):
    the program, or the script or module an interpreter runs, must be one.
    """
    if not argv:
        return False
    program = os.path.basename(argv[0])
    if program.startswith(b"fastaphlict"):
        return True
    if program in (b"node", b"nodejs"):
        return any(os.path.basename(arg) == b"aphlict_server.js" for arg in argv[1:])
    if program.startswith(b"python"):
        words = iter(argv[1:])
        for arg in words:
            if arg in (b"-X", b"-W"):
                next(words, None)  # the option's argument (-X dev, -W ignore)
            elif arg == b"-m":
                return next(words, None) == b"fastaphlict"
            elif arg == b"-c":
                return False
            elif not arg.startswith(b"-"):
                return os.path.basename(arg).startswith(b"fastaphlict")
    return False


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: each browser tab is a socket.

    With the common soft default of 1024 the server would stop accepting at
    about a thousand tabs while the hard limit allows far more.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
            return
    log.info("open-file limit %d", hard)


def run(
    config: Config,
    *,
    debug: bool = False,
    reuse_port: bool = False,
    limits: Limits | None = None,
    on_reload: Callable[[], None] | None = None,
    peer_ca_file: str | None = None,
    state_dir: str | None = None,
    broker: BrokerConfig | None = None,
    broker_ca_file: str | None = None,
) -> int:
    """Run the server on uvloop until SIGTERM/SIGINT; return the exit code."""
    import uvloop

    raise_open_file_limit()
    try:
        server = Server(
            config,
            debug=debug,
            reuse_port=reuse_port,
            limits=limits,
            peer_ca_file=peer_ca_file,
            state_dir=state_dir,
            inherited=systemd.adopt(config.servers),
            broker=broker,
            broker_ca_file=broker_ca_file,
        )
        uvloop.run(server.serve(on_reload=on_reload))
    except (OSError, ConfigError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


def _reason(exc: OSError) -> str:
    """The system's words for an OSError, without the address tuple uvloop adds."""
    return os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
