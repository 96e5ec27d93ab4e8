"""Test helpers for Redis: a real ``redis-server`` per test, a RESP client, a stalling proxy.

The Redis tests run real ``redis-server`` processes (Debian's package, which
``tests/install-deps.sh`` installs), never a mock: what a broker must survive
(a restart with its append-only file, a paused or killed server, a connection
that stays up but stops delivering) is what a real server and a real socket
do. Each test starts its own server on a free loopback port in its own
directory, so tests share nothing and may run in any order.

- :class:`RedisServer` starts, stops, restarts (same port, same data), kills,
  pauses and resumes one server, and sends it commands.
- :class:`RespClient` is a tiny synchronous RESP2 client over one socket,
  independent of the client library under test (``redis-py``): a mistake in
  that library cannot hide the same mistake in the check.
- :class:`StallProxy` sits between a client and a server in the test's event
  loop and can stop delivering without closing anything, as a connection does
  after a failover or a network partition, or cut every connection at once.
- :class:`SentinelServer` is one Redis Sentinel (``redis-server --sentinel``,
  the same Debian binary) watching a primary; :func:`wait_replicating` and
  :func:`wait_sentinels_ready` bring a primary, a replica and its sentinels
  to the state a failover needs, and :func:`sentinel_url` names them for a node.

Every time bound goes through :func:`support.scaled`, as in ``support.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from support import (
    TIMEOUT,
    ServerProcess,
    eventually,
    free_ports,
    metric,
    require,
    scaled,
    wait_healthy,
)

#: The ``redis-server`` the tests run, or None where it is not installed.
REDIS_SERVER = shutil.which("redis-server")
#: Deadline for a started server to answer PING (it may first replay its append-only file).
REDIS_STARTUP = scaled(10.0)
#: Deadline for a server to exit after SIGTERM before it is killed.
REDIS_SHUTDOWN = scaled(10.0)
#: Lines of the server's log quoted when it fails to start.
LOG_TAIL = 30
#: The longest unix socket path the kernel takes (``sun_path`` is 108 bytes, NUL included).
UNIX_PATH_MAX = 107


def require_redis() -> str:
    """The path of ``redis-server``; skips the test without it (fails it under ``CI``)."""
    require(
        REDIS_SERVER is not None,
        "redis-server is not installed (Debian: apt-get install redis-server, "
        "or sh tests/install-deps.sh)",
        "the tests that need Redis",
    )
    assert REDIS_SERVER is not None
    return REDIS_SERVER


# -- RESP2: encoding commands, parsing replies -------------------------------------


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``, ``-NOAUTH ...``): its text is the exception's message."""


class _Incomplete(Exception):
    """The buffer ends before the reply does: read more."""


def encode_command(*args: str | bytes | int | float) -> bytes:
    """One command as a RESP array of bulk strings (strings as UTF-8, numbers as text)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One RESP2 reply from ``buf`` at ``pos``: ``(value, position after it)``.

    Simple strings come back as ``str``, bulk strings as ``bytes`` (they may be
    binary), integers as ``int``, arrays as lists, the null bulk string and the
    null array as None, and error replies as :class:`RedisReplyError`
    *instances* (the caller raises a top-level one). Raises ``_Incomplete``
    when ``buf`` holds only part of the reply, so nothing is consumed until
    the whole reply has arrived.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line, pos = buf[pos : pos + 1], bytes(buf[pos + 1 : end]), end + 2
    if kind == b"+":
        return line.decode(errors="replace"), pos
    if kind == b"-":
        return RedisReplyError(line.decode(errors="replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse_reply(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP2 reply: {bytes(buf[pos - len(line) - 3 :])[:80]!r}")


class RespClient:
    """A synchronous RESP2 client over one socket, with a time bound on every reply.

    ``address`` is ``(host, port)`` or the path of a unix socket. With
    ``password`` the connection authenticates first. A reply that times out
    (``TimeoutError``) is not lost: bytes already received stay buffered, and
    a later :meth:`read_reply` returns the reply once it has arrived, which
    is how a test sees a held reply come through. The server closing the
    connection raises ``ConnectionError``.

    Blocking: from an asyncio test whose event loop must keep running (a
    :class:`StallProxy` in between), call it through ``asyncio.to_thread``.
    """

    def __init__(
        self,
        address: tuple[str, int] | str | Path,
        *,
        password: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self._buf = bytearray()
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(address))
            except BaseException:
                self.sock.close()
                raise
        if password is not None:
            try:
                self.command("AUTH", password)
            except BaseException:
                self.close()
                raise

    def send(self, *args: str | bytes | int | float) -> None:
        """Send one command without waiting for its reply."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(encode_command(*args))

    def read_reply(self, timeout: float | None = None) -> Any:
        """The next reply, within ``timeout`` (default: the client's); raises an error reply."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                value, used = parse_reply(self._buf)
            except _Incomplete:
                pass
            else:
                del self._buf[:used]
                if isinstance(value, RedisReplyError):
                    raise value
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete reply from Redis in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError as exc:
                raise TimeoutError("no complete reply from Redis in time") from exc
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self._buf += chunk

    def command(self, *args: str | bytes | int | float, timeout: float | None = None) -> Any:
        """Send one command and return its reply (see :func:`parse_reply` for the types)."""
        self.send(*args)
        return self.read_reply(timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a real redis-server ----------------------------------------------------------


class RedisStartError(AssertionError):
    """``redis-server`` exited or never answered PING; the message ends with its log."""


#: Every server started and not yet stopped: killed at exit if a test leaked one.
_LIVE: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()


#: libc's ``prctl``, looked up here: the child between fork and exec only calls it.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``).

    So that not even a pytest killed with SIGKILL leaves a server behind. The
    kernel tracks the parent *thread*: start servers from a thread that
    outlives them (the main thread, as tests do).
    """
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class RedisServer:
    """One ``redis-server`` on a free ``127.0.0.1`` port, in ``directory``, append-only.

    Configured on the command line only (no config file): ``--appendonly yes
    --appendfsync always`` so that every acknowledged write is on disk and
    survives a restart, even after :meth:`kill`; ``--save ""`` (no RDB
    snapshots); the log at ``directory/redis.log``, where the server's stdout
    and stderr go too (errors before it opens its log). ``password`` sets
    ``--requirepass``; ``unixsocket`` (a path, at most 107 bytes) adds a unix
    socket; ``args`` are more ``--directive value`` words.

    :meth:`start` waits until the server answers PING. :meth:`stop` then
    :meth:`start` again runs it on the same port and directory, so the data
    is there again. A server is never left behind: the context manager, the
    ``redis_server`` fixture, an ``atexit`` hook and ``PR_SET_PDEATHSIG``
    each stop it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        unixsocket: Path | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.executable = require_redis()
        self.directory = Path(directory)
        self.password = password
        self.unixsocket = unixsocket
        if unixsocket is not None and len(os.fsencode(unixsocket)) > UNIX_PATH_MAX:
            raise ValueError(f"unix socket path longer than {UNIX_PATH_MAX} bytes: {unixsocket}")
        self._port = port
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"

    # -- where it listens

    @property
    def port(self) -> int:
        assert self._port is not None, "not started yet"
        return self._port

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``, the password URL-quoted."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://[:password@]/path?db=0`` (redis-py's form), with ``unixsocket`` set."""
        assert self.unixsocket is not None, "started without a unix socket"
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"unix://{auth}{self.unixsocket}?db=0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    # -- life cycle

    def command_line(self) -> list[str]:
        line = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.password is not None:
            line += ["--requirepass", self.password]
        if self.unixsocket is not None:
            line += ["--unixsocket", str(self.unixsocket), "--unixsocketperm", "700"]
        return [*line, *self.args]

    def start(self, within: float = REDIS_STARTUP) -> RedisServer:
        """Start (or start again, same port and directory) and wait until it answers PING.

        The first start picks a free port; should another process take it
        before Redis binds it, a new one is picked, twice at most. Raises
        :class:`RedisStartError` with the end of the log when the server exits
        or does not answer within ``within``.
        """
        assert not self.running, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        pick = self._port is None
        for attempt in range(3):
            if pick:
                self._port = free_ports(1)[0]
            try:
                self._spawn_and_wait(within)
                return self
            except RedisStartError as exc:
                if not (pick and attempt < 2 and "Address already in use" in str(exc)):
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, within: float) -> None:
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + within
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                _LIVE.discard(self)
                raise RedisStartError(f"redis-server exited with {code}:\n{self._tail(mark)}")
            try:
                if self.command("PING", timeout=scaled(1.0)) == "PONG":
                    return
            except (OSError, RedisReplyError):  # not listening yet; -LOADING its AOF
                pass
            if time.monotonic() >= deadline:
                self.kill()
                raise RedisStartError(
                    f"redis-server did not answer PING within {within:g} s:\n{self._tail(mark)}"
                )
            time.sleep(0.01)

    def _tail(self, mark: int) -> str:
        """The end of what this start wrote to the log (from byte ``mark`` on)."""
        with self.log_path.open("rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-LOG_TAIL:])

    def stop(self, within: float = REDIS_SHUTDOWN) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), SIGKILL after ``within``.

        Also stops a paused server (SIGCONT follows the SIGTERM). Does nothing
        when it is not running.
        """
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(within)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(scaled(5.0))
        self._reaped()

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, but every acknowledged write is already on disk."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(scaled(5.0))
        self._reaped()

    def _reaped(self) -> None:
        _LIVE.discard(self)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and connects still succeed, but nothing answers."""
        assert self.proc is not None and self.running, "not running"
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the server answers again, what was sent meanwhile included."""
        assert self.proc is not None and self.running, "not running"
        self.proc.send_signal(signal.SIGCONT)

    # -- talking to it

    def client(self, *, timeout: float = TIMEOUT, auth: bool = True) -> RespClient:
        """A :class:`RespClient` connected over TCP (authenticated unless ``auth`` is false)."""
        return RespClient(
            ("127.0.0.1", self.port), password=self.password if auth else None, timeout=timeout
        )

    def command(
        self, *args: str | bytes | int | float, timeout: float = TIMEOUT, auth: bool = True
    ) -> Any:
        """One command on a fresh connection, its reply within ``timeout`` (else TimeoutError).

        An error reply raises :class:`RedisReplyError`. ``auth=False`` skips the
        AUTH that a password otherwise brings.
        """
        with self.client(timeout=timeout, auth=auth) as client:
            return client.command(*args)

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.directory} port={self._port} {state}>"


# -- Redis Sentinel ---------------------------------------------------------------

#: The service name the sentinels of a test monitor.
SERVICE = "mymaster"


class SentinelServer(RedisServer):
    """One Redis Sentinel on a free ``127.0.0.1`` port, monitoring ``127.0.0.1:primary_port``.

    ``redis-server CONF --sentinel`` (Debian's ``redis-sentinel`` is the same
    binary): Sentinel needs a config file it can rewrite, written at the
    first start (a restart keeps what it learnt). ``quorum`` sentinels must
    agree the primary is down; ``down_after_ms`` is how long it must be
    silent. ``password`` is the sentinel's own (``requirepass``);
    ``auth_pass`` is the data password it uses on the primary and replicas.
    ``conf`` replaces the ``sentinel ...`` lines built from those (a config
    as docs/clusters.md shows it); ``password`` must then repeat its ``requirepass``.
    """

    def __init__(
        self,
        directory: Path,
        primary_port: int,
        *,
        service: str = SERVICE,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        auth_pass: str | None = None,
        conf: Sequence[str] | None = None,
    ) -> None:
        super().__init__(directory, password=password)
        #: Sentinel config lines used instead of the ones built from the
        #: arguments (the port, the directory and the log file are added).
        self.conf = None if conf is None else tuple(conf)
        self.primary_port = primary_port
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.auth_pass = auth_pass
        self.conf_path = self.directory / "sentinel.conf"
        self._conf_port: int | None = None

    def command_line(self) -> list[str]:
        if self._conf_port != self.port:
            lines = [
                f"port {self.port}",
                "bind 127.0.0.1",
                "daemonize no",
                "protected-mode no",
                f"dir {self.directory}",
                f"logfile {self.log_path}",
            ]
            if self.conf is not None:
                lines += self.conf
            else:
                lines += self._monitor_lines()
            self.conf_path.write_text("\n".join(lines) + "\n")
            self._conf_port = self.port
        return [self.executable, str(self.conf_path), "--sentinel"]

    def _monitor_lines(self) -> list[str]:
        lines = [
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        if self.auth_pass is not None:
            lines.append(f"sentinel auth-pass {self.service} {self.auth_pass}")
        return lines

    def primary(self) -> tuple[str, int]:
        """Where this sentinel says the primary is."""
        host, port = self.command("SENTINEL", "get-master-addr-by-name", self.service)
        return host.decode(), int(port)

    def known(self) -> tuple[int, int]:
        """How many replicas and other sentinels this sentinel knows of."""
        replicas = self.command("SENTINEL", "replicas", self.service)
        sentinels = self.command("SENTINEL", "sentinels", self.service)
        return len(replicas), len(sentinels)


def wait_replicating(replica: RedisServer, within: float = REDIS_STARTUP) -> None:
    """Until ``replica``'s link to its primary is up and the first sync is done."""
    deadline = time.monotonic() + within
    while True:
        info = replica.command("INFO", "replication").decode()
        if "master_link_status:up" in info and "master_sync_in_progress:0" in info:
            return
        assert time.monotonic() < deadline, f"replica not in sync within {within:g} s:\n{info}"
        time.sleep(0.02)


def wait_sentinels_ready(
    sentinels: Sequence[SentinelServer], replicas: int = 1, within: float = scaled(20.0)
) -> None:
    """Until every sentinel knows the ``replicas`` and all the other sentinels.

    Sentinels find each other through hello messages on the primary (every
    2 s): before that, a failover cannot gather its quorum.
    """
    deadline = time.monotonic() + within
    wanted = (replicas, len(sentinels) - 1)
    while True:
        seen = [s.known() for s in sentinels]
        if all(known == wanted for known in seen):
            return
        assert time.monotonic() < deadline, (
            f"sentinels not ready within {within:g} s: (replicas, sentinels) {seen},"
            f" wanted {wanted}"
        )
        time.sleep(0.05)


def sentinel_url(
    sentinels: Sequence[SentinelServer],
    *,
    db: int = 0,
    password: str | None = None,
    scheme: str = "redis+sentinel",
) -> str:
    """``redis+sentinel://[:password@]127.0.0.1:p1,127.0.0.1:p2,.../SERVICE/db``."""
    auth = "" if password is None else f":{quote(password, safe='')}@"
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    return f"{scheme}://{auth}{hosts}/{sentinels[0].service}/{db}"


# -- a proxy that can stop delivering without closing -----------------------------


class StallProxy:
    """A TCP proxy on a free ``127.0.0.1`` port to ``host:port``, run by the test's event loop.

    Between a client and Redis it makes the failures a broker must notice by
    itself, where nothing closes:

    - :meth:`stall` stops forwarding in both directions and closes nothing.
      Data is **held, not dropped**: the proxy stops reading, so bytes wait
      in the proxy (at most one chunk per direction) and in the kernel's
      buffers, and the sender's writes block once those are full, as over a
      partitioned network. A connection accepted while stalled connects to
      the target only on :meth:`unstall`.
    - :meth:`unstall` delivers what was held, in order, and forwards again.
    - :meth:`cut` resets every proxied connection at once (RST on both sides,
      as when a peer vanishes, held data dropped); the proxy keeps accepting
      new ones. It does not change whether the proxy is stalled.
    - :meth:`close` stops listening and cuts everything.

    ``await StallProxy(host, port).start()``, or ``async with StallProxy(host, port)``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.target_port = port
        self._server: asyncio.AbstractServer | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        #: Proxied connections currently open (both sides connected).
        self.connections = 0
        #: Connections accepted so far.
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    async def start(self) -> StallProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Reset every proxied connection, client and target side alike."""
        for link in list(self._links):
            link.cut()

    async def close(self) -> None:
        """Stop listening, cut every connection, and wait until their handlers have ended."""
        if self._server is not None:
            self._server.close()
        self.cut()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=TIMEOUT)
            assert not pending, f"proxy handlers still running after {TIMEOUT:g} s"
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), TIMEOUT)

    async def __aenter__(self) -> StallProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client: wait while stalled, connect to the target, pump both ways until done.

        Never cancelled (asyncio logs a cancelled connection handler as an
        error): :meth:`cut` ends it by cancelling its pumps instead.
        """
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        link = _Link(writer)
        self._links.add(link)
        self.accepted += 1
        try:
            if not await link.until(self._flowing):
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.target_port), TIMEOUT
                )
            except (OSError, asyncio.TimeoutError):
                _reset(writer)
                return
            if link.is_cut:
                _reset(up_writer)
                return
            link.writers.append(up_writer)
            self.connections += 1
            link.pumps = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(link.pumps)
            finally:
                self.connections -= 1
                for pump in link.pumps:
                    pump.cancel()
                for side in link.writers:
                    side.close()
        finally:
            self._links.discard(link)
            self._handlers.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` to ``writer`` while flowing; pass an end of stream on."""
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(1 << 16)
                await self._flowing.wait()  # held across a stall, not dropped
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):  # reset, or written to after its cut
            _reset(writer)


class _Link:
    """One proxied connection: its two sockets' writers and the pumps between them."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers = [client]
        self.pumps: list[asyncio.Task[None]] = []
        self._cut = asyncio.Event()

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    async def until(self, flowing: asyncio.Event) -> bool:
        """Wait until ``flowing`` is set (True) or this link is cut (False)."""
        if not flowing.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (flowing, self._cut)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        return not self.is_cut

    def cut(self) -> None:
        self._cut.set()
        for writer in self.writers:
            _reset(writer)
        for pump in self.pumps:
            pump.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (``SO_LINGER`` 0), dropping whatever is still buffered."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    writer.transport.abort()


# -- waiting for a broker node -------------------------------------------------------

#: Fast failure detection for tests: probes every 0.2 s, 0.5 s per Redis call.
FAST = ("--broker-probe-interval=0.2", "--broker-timeout=0.5")
#: How long a node may take to notice Redis is back and catch up (backoff caps at 2 s).
RECOVERY = scaled(15.0)


async def broker_up(session: aiohttp.ClientSession, server: ServerProcess) -> float:
    return await metric(session, server.admin_url, "fastaphlict_broker_up")


async def until_metric(
    session: aiohttp.ClientSession, server: ServerProcess, name: str, wanted: float
) -> None:
    """Until ``server``'s metric ``name`` reads ``wanted`` (its log in the failure)."""

    async def check() -> bool:
        return await metric(session, server.admin_url, name) == wanted

    await eventually(
        check,
        RECOVERY,
        f"{name} == {wanted:g} on {server.log_path.stem}\n{server.log()}",
        every=0.02,
    )


async def until_up(session: aiohttp.ClientSession, *servers: ServerProcess) -> None:
    for server in servers:
        await wait_healthy(server, session)
        await until_metric(session, server, "fastaphlict_broker_up", 1)


async def until_down(session: aiohttp.ClientSession, server: ServerProcess) -> None:
    await until_metric(session, server, "fastaphlict_broker_up", 0)
