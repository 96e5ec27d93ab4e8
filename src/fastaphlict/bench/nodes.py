"""The processes the ``broker`` scenario measures: a redis-server and fastaphlict nodes it starts.

The other scenarios measure a server someone else started (``--server-pid``).
The broker scenario compares two set-ups side by side in one run, a two-node
cluster on a Redis broker and one node without it, and both must be fresh,
alike and on loopback; starting them here keeps the command line to one
flag and makes the comparison reproducible. Everything is a child process:
the generator never shares an interpreter (or its CPU readings) with a server.

- Redis runs from ``PATH`` (or ``redis_server``), configured on the command
  line only, with persistence off (``--save "" --appendonly no``): the
  benchmark measures the broker's path, not the disk.
- A node is ``python -m fastaphlict`` with this interpreter, serving the same
  ``fastaphlict`` package the generator imported (so a source tree with an
  in-place build measures itself), configured by ``CLIENT_PORT``,
  ``ADMIN_PORT`` and ``LISTEN_ADDR`` as a fresh install is.
- A node counts as started once ``/healthz`` answers and, with a broker, once
  ``/metrics`` says ``fastaphlict_broker_up 1``: subscribed and caught up.
- Nothing outlives the run: :func:`stop_all` on the way out, and on Linux
  each child gets ``SIGKILL`` should the generator itself die
  (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fastaphlict

#: The server's own configuration variables, kept out of the children.
_SERVER_VARS = ("APHLICT_CONFIG", "CLIENT_PORT", "ADMIN_PORT", "LISTEN_ADDR", "FASTAPHLICT_BROKER")
#: Log lines worth reporting next to the figures.
LOG_MARKERS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
STARTUP_S = 20.0
STOP_S = 10.0


def _die_with_parent() -> None:
    """In the child before exec: ``SIGKILL`` when the generator dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A loopback port nothing listens on right now (a start that loses it is retried)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """One started process: its handle, where it logs, and the ports it took."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    admin_port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def client_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/"

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    def problems(self) -> list[str]:
        """Warning, error and traceback lines of its log."""
        return [f"{self.name}: {line}" for line in self.log().splitlines() if _noteworthy(line)]


def _noteworthy(line: str) -> bool:
    # Redis warns about the host's vm.overcommit_memory at every start: not the run's doing.
    return any(marker in line for marker in LOG_MARKERS) and "overcommit" not in line


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def start_redis(directory: Path, redis_server: str | None = None) -> Child:
    """A ``redis-server`` on a free loopback port, without persistence; waits for its PONG."""
    executable = redis_server or shutil.which("redis-server")
    if not executable:
        raise RuntimeError("the broker scenario needs redis-server (not found on PATH)")
    directory.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        port = free_port()
        command = [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(directory / "redis.log"),
            # Also a unix socket, for --broker-transport=unix.
            "--unixsocket", str(directory / "redis.sock"),
            "--unixsocketperm", "700",
        ]  # fmt: skip
        log_path = directory / "redis.log"
        child = Child("redis", _spawn(command, dict(os.environ), log_path), log_path, port)
        if _wait(child, lambda p=port: _redis_ping(p)):
            return child
        stop_all([child])
        if "Address already in use" not in child.log():
            break
    raise RuntimeError(f"redis-server did not start:\n{child.log()[-2000:]}")


def start_nodes(directory: Path, nodes: list[tuple[str, str | None]]) -> list[Child]:
    """``python -m fastaphlict`` per ``(name, broker URL or None)``, on free loopback ports.

    All are spawned at once (each takes a second to import), then each is
    waited for until it answers ``/healthz`` and, with a broker, reports the
    broker up; one that exits (a port taken meanwhile) is retried on new
    ports. On failure every node started so far is stopped.
    """
    directory.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_VARS}
    package_root = str(Path(fastaphlict.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)

    def spawn(name: str, broker_url: str | None, attempt: int) -> Child:
        command = [sys.executable, "-m", "fastaphlict"]
        if broker_url:
            command.append(f"--broker={broker_url}")
        port, admin_port = free_port(), free_port()
        child_env = {
            **env,
            "CLIENT_PORT": str(port),
            "ADMIN_PORT": str(admin_port),
            "LISTEN_ADDR": "127.0.0.1",
        }
        log_path = directory / f"{name}-{attempt}.log"
        return Child(name, _spawn(command, child_env, log_path), log_path, port, admin_port)

    started = [spawn(name, url, 0) for name, url in nodes]
    try:
        for index, (name, url) in enumerate(nodes):
            for attempt in range(1, 4):
                child = started[index]
                if _wait(child, lambda c=child, b=bool(url): _node_ready(c, b)):
                    break
                stop_all([child])
                if attempt == 3:
                    raise RuntimeError(f"fastaphlict {name} did not start:\n{child.log()[-2000:]}")
                started[index] = spawn(name, url, attempt)
    except BaseException:
        stop_all(started)
        raise
    return started


def _wait(child: Child, ready: Callable[[], bool], within: float = STARTUP_S) -> bool:
    """Poll ``ready()`` until it holds; False once the child exits or ``within`` passes."""
    deadline = time.monotonic() + within
    while child.proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.05)
    return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _node_ready(child: Child, brokered: bool) -> bool:
    path = "metrics" if brokered else "healthz"
    try:
        with urllib.request.urlopen(f"{child.admin_url}{path}", timeout=1.0) as resp:
            body = resp.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return False
    if not brokered:
        return True
    for line in body.splitlines():
        name, _, value = line.partition(" ")
        if name == "fastaphlict_broker_up":
            return value.strip() in ("1", "1.0")
    return False


def stop_all(children: list[Child], within: float = STOP_S) -> None:
    """``SIGTERM`` every child still running, then ``SIGKILL`` what outlives ``within``."""
    running = [c.proc for c in children if c.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + within
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
