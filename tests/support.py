"""Test helpers: a real server on free ports, Phorge-style posts, a real WebSocket client.

Tests start a server one of two ways, both from :class:`Settings` as the
command line resolves them: :func:`run` in this process
(``async with run(settings(["--max-subscribers=8"])) as srv``, a broker
included) or :func:`spawn` as a ``python -m fastaphlict`` process (also a
context manager); :func:`activated` is the systemd form of the latter. They
wait one way, :func:`eventually`. ``test_support`` fails a test module that
starts one otherwise in a way it can see in the source (a reference to
``Server`` or ``run``, a ``fastaphlict`` command line, ``cli.main`` without
``--test``, ``ServerProcess``/``_popen`` outside this module), bar its
allow-list that names each exception and why; it also fails a loop that
polls a clock and sleeps (a hand-written wait) outside the support modules.

The WebSocket client is the ``websockets`` library, an implementation
independent of the picows server under test, so a frame-level mistake on our
side cannot be hidden by the same mistake on the client side.

Every time bound in the tests (waits, deadlines, latency bounds, pytest-timeout
limits) goes through :func:`scaled`, which multiplies it by
``FASTAPHLICT_TESTS_TIMEOUT_FACTOR`` (a float, default 1): a slow or loaded
machine raises the factor instead of editing the bounds. Values handed to the
server as its own settings (a ping interval, a relay timeout) are behaviour
under test, not bounds, and stay as they are.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import functools
import http.client
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from picows import WSTransport
from websockets.asyncio.client import ClientConnection, connect

from fastaphlict.config import Config, PeerConfig, ServerConfig, Settings, resolve
from fastaphlict.server import Server
from fastaphlict.systemd import LISTEN_FDS_START


def _timeout_factor() -> float:
    """``FASTAPHLICT_TESTS_TIMEOUT_FACTOR``, checked: a typo must not silently mean 1."""
    raw = os.environ.get("FASTAPHLICT_TESTS_TIMEOUT_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        factor = float("nan")
    if not factor > 0 or factor == float("inf"):
        raise ValueError(f"FASTAPHLICT_TESTS_TIMEOUT_FACTOR must be a positive number, not {raw!r}")
    return factor


#: How much longer than nominal every time bound of the tests may be.
TIMEOUT_FACTOR = _timeout_factor()


def scaled(seconds: float) -> float:
    """A time bound for this machine: ``seconds`` times :data:`TIMEOUT_FACTOR`."""
    return seconds * TIMEOUT_FACTOR


_SCALED = pytest.StashKey[bool]()


def scale_timeout_option(config: pytest.Config) -> None:
    """Scale pytest-timeout's default limit (``--timeout``, ``PYTEST_TIMEOUT`` or the ini).

    Run from a conftest's ``pytest_configure`` ahead of pytest-timeout's own,
    which then reads the scaled value as if it had been given on the command line.
    """
    if not config.pluginmanager.has_plugin("timeout") or config.stash.get(_SCALED, False):
        return
    config.stash[_SCALED] = True  # tests/ and benchmarks/ conftests may both run this
    base = config.getoption("timeout", None)
    if base is None:
        base = os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout") or None
    if base is not None and float(base) > 0:
        config.option.timeout = scaled(float(base))


def scale_timeout_marks(items: list[pytest.Item]) -> None:
    """Scale every test's ``timeout`` mark: a scaled copy goes in front of the original."""
    for item in items:
        mark = item.get_closest_marker("timeout")
        if mark is None or item.stash.get(_SCALED, False):
            continue
        item.stash[_SCALED] = True
        args, kwargs = list(mark.args), dict(mark.kwargs)
        if args and args[0] is not None:
            args[0] = scaled(float(args[0]))
        elif kwargs.get("timeout") is not None:
            kwargs["timeout"] = scaled(float(kwargs["timeout"]))
        else:
            continue
        item.add_marker(pytest.mark.timeout(*args, **kwargs), append=False)


def bound_async_tests(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run every asyncio test under ``asyncio.wait_for`` at 0.9 of its time limit.

    pytest-timeout's signal cannot reach a test whose event loop waits in C
    (uvloop's epoll) with nothing to wake it: such a test hung the suite
    until CI's phase limit. Cancelling the test's coroutine instead fails it
    with a traceback that shows the await it was stuck in, and the rest of
    the suite runs on. pytest-timeout stays behind it (thread method) for a
    test that swallows its cancellation too.
    """
    default = config.getoption("timeout", None)
    for item in items:
        func = getattr(item, "obj", None)
        if not inspect.iscoroutinefunction(func) or getattr(func, "_bounded", False):
            continue
        mark = item.get_closest_marker("timeout")
        limit = mark.args[0] if mark is not None and mark.args else default
        if not limit or float(limit) <= 0:
            continue
        item.obj = _bounded(func, 0.9 * float(limit))  # type: ignore[attr-defined]


def _bounded(func: Callable[..., Any], limit: float) -> Callable[..., Any]:
    @functools.wraps(func)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        # Only our own deadline becomes "still running": a TimeoutError the
        # test itself raised (a recv that waited its bound) stays as it is.
        task = asyncio.ensure_future(func(*args, **kwargs))
        done, _ = await asyncio.wait([task], timeout=limit)
        if task in done:
            return task.result()
        where = awaiting(task)  # before the cancellation unwinds it
        task.cancel()
        await asyncio.wait([task], timeout=TIMEOUT)
        raise AssertionError(f"test still running after {limit:g} s, at {where}")

    bounded._bounded = True  # type: ignore[attr-defined]
    return bounded


def require(ok: bool, reason: str, what: str) -> None:
    """Skip the test for ``reason`` unless ``ok``; with ``CI`` set, fail it instead.

    For a test that needs a program from outside the virtual environment
    (Chromium, redis-server: ``tests/install-deps.sh`` installs them). A
    developer without it still gets the rest of the suite; CI cannot pass
    without having run ``what`` (``CI`` empty, ``0`` or ``false`` counts as unset).
    """
    if ok:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (CI is set, so {what} must run)")
    pytest.skip(reason)


#: The ceiling for any single wait on the server (a frame, a response, a close).
TIMEOUT = scaled(5.0)
SRC = Path(__file__).resolve().parents[1] / "src"
#: The server's own configuration variables, kept out of child processes.
ENV_VARS = ("APHLICT_CONFIG", "CLIENT_PORT", "ADMIN_PORT", "LISTEN_ADDR")


def child_env() -> dict[str, str]:
    """The environment for a ``python -m fastaphlict`` child process.

    The server's own variables are removed; the in-place ``src/`` goes first on
    PYTHONPATH only when it holds a built ``_fanout`` module (a development
    checkout); otherwise the installed package serves.
    """
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    if any((SRC / "fastaphlict").glob("_fanout*.so")):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def exclusive(name: str, within: float | None = None) -> Iterator[None]:
    """Run the block alone among every test run on this machine (a file lock).

    For the few tests that run a documented example verbatim, with its fixed
    ports (22280 and up) and its fixed directory: two checkouts' suites at
    once must take turns, not take each other's ports or remove each other's
    files.
    """
    path = Path(tempfile.gettempdir()) / f"fastaphlict-tests-{name}.lock"
    deadline = time.monotonic() + (scaled(120) if within is None else within)
    with open(path, "a") as held:
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{path} still held by another run"
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def free_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on right now (another process could still take one)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


#: What Phorge's curl sends: raw JSON under the form content type.
PHORGE_CONTENT_TYPE = "application/x-www-form-urlencoded"


#: Deadline for a spawned server to answer ``/healthz``.
STARTUP = scaled(15.0)
#: Deadline for a server to exit after SIGTERM before it is killed.
SHUTDOWN = scaled(10.0)


@dataclass
class ServerProcess:
    """A ``python -m fastaphlict`` child process: where it listens, where it logs.

    Started by :func:`spawn`; ``restart()`` runs the same command again on the
    same ports. Also a context manager: ``with spawn(...) as server:`` stops it
    at the end of the block. What a test wants beyond this (a node's name, the
    files it holds open) is a function over it or a class holding one, not a
    subclass: there is one way to start a server process.
    """

    proc: subprocess.Popen[bytes]
    client_port: int
    admin_port: int
    log_path: Path
    command: list[str]
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def client_url(self) -> str:
        return f"ws://127.0.0.1:{self.client_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def restart(self, log_path: Path | None = None) -> ServerProcess:
        """The same command again, on the same ports; the old process must have exited.

        The log goes to ``log_path``, or is appended to the old one.
        """
        assert self.proc.poll() is not None, "still running"
        log_path = log_path or self.log_path
        proc = _popen(self.command, self.env, log_path)
        return dataclasses.replace(self, proc=proc, log_path=log_path)

    def _probe(self) -> bool:
        """Whether ``/healthz`` answers 200; fails with the log once the process exited."""
        code = self.proc.poll()
        assert code is None, f"server exited with {code}:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"{self.admin_url}/healthz", timeout=scaled(1.0)) as resp:
                return resp.status == 200
        except (OSError, http.client.HTTPException):
            return False

    def wait_ready(self, within: float = STARTUP) -> None:
        """Until the admin port answers ``/healthz`` (the process must stay up)."""
        deadline = time.monotonic() + within
        while not self._probe():
            assert time.monotonic() < deadline, f"not ready after {within:g} s:\n{self.log()}"
            time.sleep(0.05)

    def stop(self, within: float = SHUTDOWN) -> None:
        stop(self, within=within)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Log lines worth reporting next to a benchmark's figures.
LOG_MARKERS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


def log_problems(server: ServerProcess) -> list[str]:
    """Warning, error and traceback lines of ``server``'s log."""
    lines = server.log().splitlines()
    return [line for line in lines if any(marker in line for marker in LOG_MARKERS)]


def _popen(
    command: list[str], env: dict[str, str], log_path: Path, **options: Any
) -> subprocess.Popen[bytes]:
    """Start ``command`` logging to ``log_path``; ``options`` go to :class:`subprocess.Popen`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **options,
        )


def spawn(
    log_path: Path,
    *args: str,
    config: dict[str, Any] | None = None,
    ports: Sequence[int] | None = None,
    env: dict[str, str] | None = None,
    client_options: dict[str, Any] | None = None,
) -> ServerProcess:
    """Start ``python -m fastaphlict ARGS`` on loopback, logging to ``log_path``.

    The one way tests start a server as a process (:func:`run` starts one in
    this process). ``ports`` (client, admin) are free ones unless given.
    Without ``config`` the server is configured by the environment, as a fresh
    install is; with it, by a JSON file next to the log (``config`` plus the
    two listeners), passed as ``--config=``; ``client_options`` add to the
    client listener's entry (``ssl.key``, ``ssl.cert``). ``env`` adds to :func:`child_env`.
    Does not wait: see ``wait_ready()`` and :func:`wait_healthy`. Use the
    result as a context (``with spawn(...) as server:``) to have it stopped.
    """
    client_port, admin_port = ports or free_ports(2)
    child = child_env()
    command = [sys.executable, "-m", "fastaphlict", *args]
    if config is None:
        child.update(
            CLIENT_PORT=str(client_port), ADMIN_PORT=str(admin_port), LISTEN_ADDR="127.0.0.1"
        )
    else:
        listeners = [
            {
                "type": "client",
                "port": client_port,
                "listen": "127.0.0.1",
                **(client_options or {}),
            },
            {"type": "admin", "port": admin_port, "listen": "127.0.0.1"},
        ]
        path = log_path.with_suffix(".json")
        path.write_text(json.dumps({"servers": listeners, **config}))
        command.insert(3, f"--config={path}")
    child.update(env or {})
    proc = _popen(command, child, log_path)
    return ServerProcess(proc, client_port, admin_port, log_path, command, child)


#: Phorge's own ``aphlict_server.js`` (Node Aphlict). CI cannot fetch Phorge:
#: the tests that need it run where a developer names it (see docs/development.md).
NODE_APHLICT = os.environ.get("FASTAPHLICT_NODE_APHLICT", "")


def spawn_node_aphlict(
    log_path: Path,
    ports: Sequence[int],
    cluster: Sequence[dict[str, Any]] = (),
    client_options: dict[str, Any] | None = None,
) -> ServerProcess:
    """Node Aphlict on loopback ``ports`` (client, admin), meshed with ``cluster``.

    ``client_options`` add to the client listener's entry (``ssl.key``, ``ssl.cert``).

    Skips the test where ``FASTAPHLICT_NODE_APHLICT`` names no Node Aphlict.
    Does not wait: it has no ``/healthz``, so wait for its ports
    (:func:`wait_listening` in a synchronous benchmark).
    """
    if not (NODE_APHLICT and shutil.which("node")):
        pytest.skip("FASTAPHLICT_NODE_APHLICT does not name Node Aphlict's aphlict_server.js")
    config = log_path.with_suffix(".json")
    listeners = [
        {"type": "client", "port": ports[0], "listen": "127.0.0.1", **(client_options or {})},
        {"type": "admin", "port": ports[1], "listen": "127.0.0.1"},
    ]
    config.write_text(json.dumps({"servers": listeners, "logs": [], "cluster": list(cluster)}))
    command = ["node", NODE_APHLICT, f"--config={config}"]
    proc = _popen(command, {**os.environ}, log_path)
    return ServerProcess(proc, ports[0], ports[1], log_path, command, {})


def spawn_floor(
    log_path: Path,
    kind: str,
    ports: Sequence[int] | None = None,
    command: Sequence[str] | None = None,
) -> ServerProcess:
    """A benchmark floor on loopback: ``minimal`` (both ports) or ``bare`` (client port only).

    They are the bench package's own processes, not fastaphlict (no ``/healthz``):
    this returns once the client port accepts, and fails with the log if the
    process exits first. ``command`` (a documented one) replaces the usual
    command line; it must listen on ``ports``.
    """
    client_port, admin_port = ports or free_ports(2)
    if command is None:
        command = [sys.executable, "-m", f"fastaphlict.bench.{kind}"]
        command.append(f"--client-port={client_port}")
        if kind == "minimal":
            command.append(f"--admin-port={admin_port}")
    command = list(command)
    env = child_env()
    server = ServerProcess(
        _popen(command, env, log_path), client_port, admin_port, log_path, command, env
    )
    wait_listening(server, f"{kind} floor")
    return server


def wait_listening(server: ServerProcess, what: str) -> None:
    """Until ``server``'s client port accepts (for servers without ``/healthz``).

    Fails with the log if the process exits first or is not listening after
    the start-up bound.
    """
    deadline = time.monotonic() + STARTUP
    while True:
        code = server.proc.poll()
        assert code is None, f"{what} exited with {code}:\n{server.log()}"
        address = ("127.0.0.1", server.client_port)
        with contextlib.suppress(OSError), socket.create_connection(address, 1):
            return
        assert time.monotonic() < deadline, f"{what} not listening:\n{server.log()}"
        time.sleep(0.05)


def stop(*servers: ServerProcess, within: float = SHUTDOWN) -> None:
    """SIGTERM every server still running, then kill what outlives one shared deadline."""
    running = [server.proc for server in servers if server.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + within
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(scaled(5))


def local_config(*, peers: tuple[PeerConfig, ...] = (), clients: int = 1) -> Config:
    """One admin and ``clients`` client listeners on loopback, free ports."""
    servers = tuple(ServerConfig("client", 0, "127.0.0.1") for _ in range(clients))
    return Config(servers=(*servers, ServerConfig("admin", 0, "127.0.0.1")), cluster=peers)


def settings(
    argv: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    config: Config | None = None,
    **overrides: Any,
) -> Settings:
    """What the command line resolves from ``argv`` and ``environ`` (default: none).

    The one way a test builds :class:`Settings`: through
    :func:`~fastaphlict.config.resolve`, as the server's own command line does,
    so ``settings(["--max-subscribers", "8"])`` is what that flag gives an
    operator. Unless ``argv`` or ``environ`` name Aphlict's config (a file or
    its variables), the listeners are :func:`local_config`'s free loopback
    ports, not Aphlict's fixed defaults. ``config`` replaces the config as a
    whole; ``overrides`` replace fields of :class:`Settings` that argv cannot
    express (``limits=`` a Limits, ``broker=`` a parsed BrokerConfig...).
    """
    environ = dict(environ or {})
    resolved = resolve(list(argv), environ)
    if config is None and not _names_config(argv, environ):
        config = dataclasses.replace(resolved.config, servers=local_config().servers)
    if config is not None:
        overrides["config"] = config
    return dataclasses.replace(resolved, **overrides)


def _names_config(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether ``argv`` or ``environ`` say where the server listens (Aphlict's file or env)."""
    flagged = any(arg == "--config" or arg.startswith("--config=") for arg in argv)
    return flagged or any(environ.get(name, "").strip() for name in ENV_VARS)


def as_options(settings: Settings) -> dict[str, Any]:
    """``settings``' fields by name: what a stand-in for the server's run() records."""
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}


class Running:
    """A started in-process server and the URLs to reach it."""

    def __init__(self, server: Server, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.hub = server.hub
        self.session = session

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_ports[0]}"

    def client_url(self, path: str = "/", index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.server.client_ports[index]}{path}"

    async def post(
        self, message: Any, *, instance: str | None = None, raw: bytes | None = None
    ) -> aiohttp.ClientResponse:
        """Post as Phorge does: raw JSON body, form content type."""
        return await post(self.session, self.admin_url, message, instance=instance, raw=raw)

    async def status(self, instance: str | None = None) -> dict[str, Any]:
        params = {"instance": instance} if instance is not None else None
        async with self.session.get(f"{self.admin_url}/status/", params=params) as resp:
            assert resp.status == 200
            return await resp.json()

    @contextlib.asynccontextmanager
    async def client(self, path: str = "/", index: int = 0) -> AsyncIterator[Browser]:
        async with connect(self.client_url(path, index), open_timeout=TIMEOUT) as ws:
            yield Browser(ws)

    async def broker_up(self, within: float = TIMEOUT) -> None:
        """Until this node's broker is connected and in sync (its Settings name one)."""
        broker = self.server.broker
        assert broker is not None, "started without a broker"
        await eventually(lambda: broker.up, within, "the broker is up")


async def post(
    session: aiohttp.ClientSession,
    admin_url: str,
    message: Any,
    *,
    instance: str | None = None,
    raw: bytes | None = None,
) -> aiohttp.ClientResponse:
    body = raw if raw is not None else json.dumps(message, ensure_ascii=False).encode()
    url = f"{admin_url}/" if instance is None else f"{admin_url}/?instance={instance}"
    async with session.post(
        url,
        data=body,
        headers={"Content-Type": PHORGE_CONTENT_TYPE},
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    ) as resp:
        await resp.read()
        return resp


@contextlib.asynccontextmanager
async def run(settings: Settings) -> AsyncIterator[Running]:
    """Start ``Server(settings)`` in this process; close it afterwards (within a bound).

    The one way tests start a server in-process (:func:`spawn` starts one as a
    process). Build ``settings`` with :func:`settings`. A node on a broker
    starts as it does in production (warmed from Redis, or given up on after
    ``broker_timeout``); :meth:`Running.broker_up` waits until it is in sync.
    A start that fails raises here, having closed what it had opened.
    """
    server = Server(settings)
    await asyncio.wait_for(server.start(), STARTUP)
    try:
        async with aiohttp.ClientSession() as session:
            yield Running(server, session)
    finally:
        await asyncio.wait_for(server.close(), TIMEOUT)


class Browser:
    """A WebSocket client speaking JX.Aphlict's commands."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, command: str, data: Any = None) -> None:
        await self.ws.send(json.dumps({"command": command, "data": data}))

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def subscribe(self, *phids: str) -> None:
        """Subscribe and wait until the server has applied it (ping/pong round)."""
        await self.send("subscribe", list(phids))
        await self.sync()

    async def sync(self) -> None:
        """A ping/pong round: when it returns, every earlier command took effect."""
        await self.send("ping", None)
        assert await self.recv_raw() == '{"type":"pong"}'

    async def recv_raw(self) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), TIMEOUT)

    async def recv(self) -> Any:
        frame = await self.recv_raw()
        assert isinstance(frame, str), "server frames are text frames"
        return json.loads(frame)


async def replayed(browser: Browser, age: int = 60000) -> list[str]:
    """Ask for a replay; the keys of what came back before the pong."""
    await browser.send("replay", {"age": age})
    await browser.send("ping", None)
    keys = []
    while True:
        frame = await browser.recv_raw()
        if frame == '{"type":"pong"}':
            return keys
        keys.append(json.loads(frame)["key"])


async def assert_silent(browser: Browser) -> None:
    """Prove nothing is pending for ``browser``: a ping's pong must be the next frame."""
    await browser.send("ping", None)
    assert await browser.recv_raw() == '{"type":"pong"}'


async def cancel_and_wait(*tasks: asyncio.Task[Any], within: float = TIMEOUT) -> None:
    """Cancel ``tasks`` and wait until they have ended.

    Awaiting a cancelled child under ``suppress(CancelledError)`` also eats a
    cancellation aimed at the caller (a test's timeout, a cancelled parent),
    which then runs on as if nothing happened and can hang the suite. Here the
    children's outcome stays on them (read it with ``task.result()``), and a
    cancellation of the caller always propagates. ``asyncio.wait`` raises only
    for the waiter, never for the tasks it waits on.
    """
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=within)
        if pending:
            # A child that ignores its cancellation must fail the test, not hang it.
            where = "; ".join(awaiting(task) for task in pending)
            raise AssertionError(f"still running {within:g} s after cancellation, at {where}")


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a suspended task waits: its chain of awaits, outermost first."""
    steps = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            steps.append(
                f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
            )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(steps) or repr(task)


async def assert_cancelled_promptly(
    task: asyncio.Task[Any], *, then: Callable[[], object] | None = None, within: float = 1.0
) -> None:
    """Cancel ``task``, run ``then()``, and check that the task ends cancelled in time.

    A task that swallowed its cancellation is still running when the bound
    expires (or ended normally): the test fails instead of hanging, and the
    task is cancelled again so nothing outlives the test.
    """
    task.cancel()
    if then is not None:
        then()
    await asyncio.wait([task], timeout=scaled(within))
    try:
        assert task.done(), f"still running {scaled(within):g} s after its cancellation"
        assert task.cancelled(), f"ended without its cancellation: {task!r}"
    finally:
        if not task.done():
            task.cancel()


# -- a bare WebSocket client, for thousands of short connections ------------------

_UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def upgrade_request(path: str) -> bytes:
    """The browser's opening handshake for ``path`` (one fixed key: the tests check no accept)."""
    return _UPGRADE.format(path=path).encode()


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked client frame (a zero mask: the payload stays readable in captures)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


async def bare_session(port: int, path: str, *frames: bytes) -> bytes:
    """Upgrade, send ``frames`` then a ping, read up to and including the pong, close.

    Returns every payload byte the server sent before the pong. The
    ``websockets`` client costs about a millisecond per connection; this one
    a tenth of that, which makes tests of 20000 connections practical.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_UPGRADE.format(path=path).encode())
        for frame in frames:
            writer.write(frame)
        writer.write(client_frame(b'{"command":"ping","data":null}'))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        received = bytearray()
        while True:
            _, b1 = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
            size = b1 & 0x7F
            if size == 126:
                size = int.from_bytes(await reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await reader.readexactly(8), "big")
            payload = await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
            if payload == b'{"type":"pong"}':
                return bytes(received)
            received += payload
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def wait_healthy(
    server: ServerProcess, session: aiohttp.ClientSession, within: float = STARTUP
) -> None:
    """``server.wait_ready()`` for a test's event loop, over the test's own session."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        code = server.proc.poll()
        assert code is None, f"server exited with {code}:\n{server.log()}"
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(
                f"{server.admin_url}/healthz", timeout=aiohttp.ClientTimeout(total=scaled(1.0))
            ) as resp:
                if resp.status == 200:
                    return
        assert asyncio.get_running_loop().time() < deadline, (
            f"not ready after {within:g} s:\n{server.log()}"
        )
        await asyncio.sleep(0.05)


async def metric(session: aiohttp.ClientSession, admin_url: str, name: str) -> float:
    """One unlabelled sample from ``/metrics``."""
    async with session.get(f"{admin_url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- fake connections over socketpairs (for the index, without a server) ---------


class PairTransport:
    """The asyncio-transport surface picows' WSTransport needs, over a real socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.aborted = True

    def abort(self) -> None:
        self.aborted = True


class Conn:
    """One fake client connection: the transport the index sees, and our read end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.theirs.setblocking(False)
        self.transport = WSTransport(False, PairTransport(self.ours), logging.getLogger("t"), loop)

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.theirs.recv(1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = TIMEOUT,
    what: str = "the condition",
    every: float = 0.005,
) -> None:
    """Wait until ``predicate()`` holds; fail the test if it doesn't within ``timeout``.

    The one wait of the tests: ``predicate`` may be sync or async (a check that
    asks a server is awaited). ``timeout`` is a bound already scaled.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert loop.time() < deadline, f"{what} did not hold within {timeout:g} s"
        await asyncio.sleep(every)


def throttles_a_minute_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Move the log throttles' clock past their window, and only theirs (not the loop's)."""
    import fastaphlict.ratelimit as ratelimit

    def later() -> float:
        return time.monotonic() + 61.0

    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=later))


async def stalled_websocket(port: int, path: str = "/") -> socket.socket:
    """A WebSocket that subscribes to PHID-1 and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    await loop.sock_sendall(
        sock,
        b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), key),
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101")
    payload = b'{"command":"subscribe","data":["PHID-1"]}'
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


@contextlib.contextmanager
def blackholed_port() -> Iterator[int]:
    """A loopback port where a TCP connect hangs, as with a firewalled host.

    A listener with a backlog of 0 that never accepts: once one connection
    waits in its queue, the kernel drops further SYNs, and connects hang.
    """
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        yield port


# -- started as systemd starts it: listening sockets handed over as fds 3, 4... ----


def listening(port: int = 0, backlog: int = 4096) -> socket.socket:
    """A listening socket as systemd's ListenStream= makes one (``Backlog=``: ``backlog``).

    The kernel caps the backlog at ``net.core.somaxconn`` without a word.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(backlog)
    return sock


def activated(
    log_path: Path,
    sockets: Sequence[socket.socket],
    *,
    names: str = "",
    config: dict[str, Any] | None = None,
    ports: Sequence[int] = (),
    args: Sequence[str] = (),
) -> ServerProcess:
    """``python -m fastaphlict`` started as systemd starts it, with ``sockets`` as fds 3, 4...

    The config lists a client and an admin server on ``ports`` (default: the
    ports of the first two sockets).
    """
    client_port, admin_port = ports or [s.getsockname()[1] for s in sockets[:2]]
    listeners = [
        {"type": "client", "port": client_port, "listen": "127.0.0.1"},
        {"type": "admin", "port": admin_port, "listen": "127.0.0.1"},
    ]
    for listener in listeners:
        listener.update(config or {})
    path = log_path.with_suffix(".json")
    path.write_text(json.dumps({"servers": listeners}))
    env = child_env()
    env.update(LISTEN_FDS=str(len(sockets)), LISTEN_FDNAMES=names)
    # $$ is the shell's pid, which exec hands on to Python: the server's own.
    command = [
        "/bin/sh",
        "-c",
        'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"',
        sys.executable,
        "-m",
        "fastaphlict",
        f"--config={path}",
        *args,
    ]
    fds = [s.fileno() for s in sockets]

    def place() -> None:
        # Out of the way first: a socket may already sit on 3 or 4.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
        for target, fd in enumerate(high, LISTEN_FDS_START):
            os.dup2(fd, target)
            os.set_inheritable(target, True)
            os.close(fd)

    proc = _popen(command, env, log_path, preexec_fn=place, close_fds=False)
    return ServerProcess(proc, client_port, admin_port, log_path, command, env)
